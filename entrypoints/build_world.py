"""build_world: generate the tiny world's corpus and tokenizer and train the experiment's base model (once), tracked in MLflow."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from entrypoints.common import StepCommand, experiment_option, flat_params, load, world_needed, world_step


@click.command(cls=StepCommand)
@experiment_option
@click.option("--model", help="The tiny model to build the world for: tiny-gpt2 or tiny-gemma2 (default: the file's).")
def main(experiment: str, model: str | None) -> None:
    exp = load(experiment, {"model": model})
    import mlflow

    from saecomp.tracking import step_run, training_metrics_logger
    from saecomp.world.build import build_world

    world_cfg = world_needed(exp)
    key, _ = world_step(exp, experiment)
    models = ", ".join(world_cfg.models)
    with step_run(
        "build_world",
        key,
        flat_params(world_cfg.to_dict(), "world."),
        experiment_name=exp.name,
        run_name=f"build_world · {world_cfg.corpus.n_documents} documents · {models}",
        description=(
            f"Generated the tiny world: {world_cfg.corpus.n_documents} documents, a {world_cfg.vocab_size}-token tokenizer, "
            f"and trained {models} on it."
        ),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "world"
            # One step counter across models so the MLflow charts show each model's curve.
            log_metrics = training_metrics_logger()
            summary = build_world(
                world_cfg,
                out,
                on_metrics=lambda model, step, metrics: log_metrics(step, {f"{model}.{name}": value for name, value in metrics.items()}),
                log=lambda line: click.echo(f"[build_world] {line}", err=True),
            )
            mlflow.log_metrics(
                {
                    "unigram_entropy": summary["unigram_entropy"],
                    "n_train_tokens": summary["n_train_tokens"],
                    "n_word_types": summary["n_word_types"],
                    **{f"{m}.test_loss": s["test_loss"] for m, s in summary["models"].items()},
                    **{f"{m}.train_seconds": s["train_seconds"] for m, s in summary["models"].items()},
                }
            )
            mlflow.log_artifacts(str(out), "world")


if __name__ == "__main__":
    main()
