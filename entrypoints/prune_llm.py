"""prune_llm: prune the base model's attention and MLP weights (WANDA, magnitude, or the paper's code).

mlflow run . -e prune_llm -P sparsity=0.5
mlflow run . -e prune_llm -P method=wanda -P nm=2:4 -P model=tiny-gemma2
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click

from entrypoints.common import experiment_option, fail, flat_params, load, model_dims, model_source, world_step


def step_inputs(exp, experiment_path: str) -> dict:
    """Everything the pruned model depends on (the code is added by the tracking key)."""
    from saecomp.models import TINY_MODELS

    inputs = {"model": exp.model, **{s: exp.to_dict()[s] for s in ("data", "calibration", "llm_pruning", "held_out")}}
    if exp.model in TINY_MODELS:
        inputs["world"] = world_step(exp, experiment_path)[0]
    return inputs


def key_for(exp, experiment_path: str) -> str:
    from saecomp.tracking import step_key

    return step_key("prune_llm", step_inputs(exp, experiment_path))


def check_layers(exp, n_layers: int) -> None:
    for layer in exp.llm_pruning.layers or []:
        if not 0 <= layer < n_layers:
            fail(f"layer={layer} is outside {exp.model}; valid: 0..{n_layers - 1}")


@click.command()
@experiment_option
@click.option("--model", help="Base model: gpt2, google/gemma-2-2b, tiny-gpt2, tiny-gemma2.")
@click.option("--method", help="wanda, magnitude, or wanda-seed (the paper's code).")
@click.option("--sparsity", help="Fraction of weights pruned per comparison group, in [0, 1).")
@click.option("--nm", help="N:M pattern such as 2:4; overrides sparsity.")
@click.option("--layers", help="Comma-separated blocks to prune; default all.")
@click.option("--calibration_sequences", help="Calibration sequences (default 128).")
@click.option("--seq_len", help="Calibration tokens per sequence (default: the model's context).")
def main(experiment, model, method, sparsity, nm, layers, calibration_sequences, seq_len) -> None:
    layer_list = None
    if layers not in (None, ""):
        try:
            layer_list = [int(x) for x in str(layers).split(",")]
        except ValueError:
            fail(f"layers={layers!r} is not a comma-separated list of integers")
    exp = load(
        experiment,
        {
            "model": model,
            "llm_pruning.method": method,
            "llm_pruning.sparsity": sparsity,
            "llm_pruning.nm": nm,
            "llm_pruning.layers": layer_list,
            "calibration.n_sequences": calibration_sequences,
            "calibration.seq_len": seq_len,
        },
    )
    check_layers(exp, model_dims(exp).n_layers)
    checkpoint, world = model_source(exp, experiment)
    run_prune_llm(exp, experiment, checkpoint, world)


def run_prune_llm(exp, experiment_path: str, checkpoint: Path | None, world: Path | None) -> None:
    import mlflow
    import torch
    from safetensors.torch import save_file

    from saecomp.data import contiguous_tokens, cross_entropy, load_documents, sample_calibration
    from saecomp.models import load_model, save_checkpoint
    from saecomp.prune_llm import PruneSpec, prune_model
    from saecomp.tracking import step_run

    spec = PruneSpec(exp.llm_pruning.method, exp.llm_pruning.sparsity, exp.nm_tuple())
    key = key_for(exp, experiment_path)
    params = {
        "model": exp.model,
        "method": spec.method,
        "sparsity": spec.effective_sparsity,
        "nm": exp.llm_pruning.nm or "unstructured",
        **flat_params({k: v for k, v in exp.to_dict().items() if k in ("data", "calibration", "llm_pruning", "held_out")}),
    }
    say = lambda line: click.echo(f"[prune_llm] {line}", err=True)  # noqa: E731
    with step_run("prune_llm", key, params) as run:
        started = time.perf_counter()
        loaded = load_model(exp.model, checkpoint)
        seq_len = exp.calibration.seq_len or loaded.tl.cfg.n_ctx
        documents = load_documents(exp.data.dataset, exp.data.split, exp.data.text_column, world, exp.data.max_documents)
        calibration = sample_calibration(documents, loaded.tokenizer, exp.calibration.n_sequences, seq_len, exp.calibration.seed)
        if exp.data.heldout_split == exp.data.split and exp.data.dataset != "tiny":
            heldout_docs, skip = documents, len(documents) // 2  # the far half of the pool
        else:
            heldout_docs, skip = (
                load_documents(exp.data.dataset, exp.data.heldout_split, exp.data.text_column, world, exp.data.max_documents),
                0,
            )
        heldout = contiguous_tokens(
            heldout_docs, loaded.tokenizer, exp.held_out.n_sequences, exp.held_out.seq_len or loaded.tl.cfg.n_ctx, skip
        )
        calibration_seconds = time.perf_counter() - started
        say(f"{exp.model}: {calibration.shape[0]} x {calibration.shape[1]} calibration tokens, {heldout.numel()} held-out tokens")

        ce_dense = cross_entropy(loaded.tl, heldout, exp.calibration.batch_size)
        say(f"dense held-out cross-entropy {ce_dense:.4f}")
        report = prune_model(
            loaded.tl,
            calibration,
            spec,
            batch_size=exp.calibration.batch_size,
            layers=exp.llm_pruning.layers,
            progress=lambda done, total: say(f"pruned block {done}/{total}"),
        )
        ce_pruned = cross_entropy(loaded.tl, heldout, exp.calibration.batch_size)
        say(f"pruned ({spec.method}, sparsity {report.sparsity_actual:.4f}) held-out cross-entropy {ce_pruned:.4f}")

        mlflow.log_metrics(
            {
                "sparsity_actual": report.sparsity_actual,
                "ce_loss_dense": ce_dense,
                "ce_loss_pruned": ce_pruned,
                "perplexity_dense": float(torch.exp(torch.tensor(ce_dense))),
                "perplexity_pruned": float(torch.exp(torch.tensor(ce_pruned))),
                "calibration_seconds": calibration_seconds,
                "pruning_seconds": report.seconds,
                "n_pruned_parameters": report.n_pruned_parameters,
                "n_prunable_parameters": report.n_prunable_parameters,
                **{f"sparsity.{name}": value for name, value in report.sparsity_per_matrix.items()},
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            save_checkpoint(loaded, tmp / "pruned_model")
            save_file(
                {"calibration_tokens": calibration.contiguous(), "heldout_tokens": heldout.contiguous()},
                tmp / "tokens.safetensors",
            )
            (tmp / "sparsity.json").write_text(json.dumps(report.sparsity_per_matrix, indent=1))
            (tmp / "experiment.json").write_text(json.dumps(exp.to_dict(), indent=1))
            mlflow.log_artifacts(str(tmp / "pruned_model"), "pruned_model")
            for name in ("tokens.safetensors", "sparsity.json", "experiment.json"):
                mlflow.log_artifact(str(tmp / name))
        say(f"done: run {run.info.run_id}, pruned model under its artifacts at pruned_model/")


if __name__ == "__main__":
    main()
