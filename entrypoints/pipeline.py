"""main: run a whole experiment file as one pipeline, reusing every finished step.

    mlflow run .                                       # experiments/tiny.yaml, offline
    mlflow run . -P experiment=experiments/gpt2-small.yaml

Steps run as their own MLflow runs (children of this one when they are new); a step whose inputs and
code match a FINISHED run is not run again. Built so far: build_world -> prune_llm.
"""

from __future__ import annotations

import click

from entrypoints.common import experiment_option, load, model_dims, model_source
from entrypoints.prune_llm import check_layers, key_for


@click.command()
@experiment_option
def main(experiment: str) -> None:
    exp = load(experiment, {})
    check_layers(exp, model_dims(exp).n_layers)
    import mlflow

    from saecomp.tracking import STEP_TAG, run_step

    with mlflow.start_run() as run:
        mlflow.set_tag(STEP_TAG, "pipeline")
        mlflow.log_param("experiment_name", exp.name)
        model_source(exp, experiment)  # the tiny world, when the experiment needs one
        prune_run = run_step("prune_llm", {"experiment": experiment}, key_for(exp, experiment))
        metrics = mlflow.MlflowClient().get_run(prune_run).data.metrics
        mlflow.log_metrics({k: metrics[k] for k in ("ce_loss_dense", "ce_loss_pruned", "sparsity_actual")})
        mlflow.set_tag("saecomp.prune_llm_run", prune_run)
        click.echo(
            f"\n{exp.name}: {exp.model} pruned with {exp.llm_pruning.method} to sparsity {metrics['sparsity_actual']:.3f}: "
            f"held-out cross-entropy {metrics['ce_loss_dense']:.4f} (dense) -> {metrics['ce_loss_pruned']:.4f} (pruned)\n"
            f"pipeline run {run.info.run_id}; prune_llm run {prune_run} (pruned model: its artifact pruned_model/)\n"
            f"tracking store: {mlflow.get_tracking_uri()} -- browse with `mlflow ui` and open http://127.0.0.1:5000"
        )


if __name__ == "__main__":
    main()
