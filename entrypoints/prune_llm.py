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

from entrypoints.common import StepCommand, experiment_option, fail, flat_params, load, model_dims, model_source, world_step


def step_inputs(exp, experiment_path: str) -> dict:
    """Everything the pruned model depends on (the code is added by the tracking key)."""
    from saecomp.names import TINY_MODELS

    inputs = {"model": exp.model, **exp.runtime(), **{s: exp.to_dict()[s] for s in ("data", "calibration", "llm_pruning", "held_out")}}
    if exp.model in TINY_MODELS:
        inputs["world"] = world_step(exp, experiment_path)[0]
    return inputs


def logged_settings(exp) -> dict[str, str]:
    """The model and the pruning settings as a prune_llm run logs them (params): what a run is recognised by where its key
    cannot be recomputed (the key holds the code too)."""
    sections = {k: v for k, v in exp.to_dict().items() if k in ("data", "calibration", "llm_pruning", "held_out")}
    return {"model": exp.model, **flat_params(sections)}


def key_for(exp, experiment_path: str) -> str:
    from saecomp.tracking import step_key

    return step_key("prune_llm", step_inputs(exp, experiment_path))


def check_layers(exp, dims) -> None:
    """The blocks to prune and the calibration and held-out sequences fit the model (``dims``: its `ModelDims`)."""
    for layer in exp.llm_pruning.layers or []:
        if not 0 <= layer < dims.n_layers:
            fail(f"layer={layer} is outside {exp.model}; valid: 0..{dims.n_layers - 1}")
    for name, value in (("calibration.seq_len", exp.calibration.seq_len), ("held_out.seq_len", exp.held_out.seq_len)):
        if value is not None and value > dims.n_ctx:
            fail(f"{name}={value} is longer than {exp.model}'s context; valid: 2..{dims.n_ctx}, or null for the whole context")


@click.command(cls=StepCommand)
@experiment_option
@click.option("--model", help="Base model: gpt2, google/gemma-2-2b, tiny-gpt2, tiny-gemma2, or a folder holding a Hugging Face checkpoint.")
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
    dims = model_dims(exp)
    check_layers(exp, dims)
    from saecomp.prune_llm import check_nm_fits

    try:
        check_nm_fits(exp.nm_tuple(), dims)
    except ValueError as error:
        fail(str(error))
    checkpoint, world = model_source(exp, experiment)
    run_prune_llm(exp, experiment, checkpoint, world)


def run_prune_llm(exp, experiment_path: str, checkpoint: Path | None, world: Path | None) -> None:
    import mlflow
    import torch
    from safetensors.torch import save_file

    from saecomp.data import (
        cross_entropy,
        document_plan,
        held_out_tokens,
        iter_documents,
        load_documents,
        model_prepends_bos,
        sample_calibration,
        seed_calibration,
    )
    from saecomp.models import load_model, save_checkpoint
    from saecomp.prune_llm import PruneSpec, measure_sparsity, prune_model, pruning_processing
    from saecomp.tracking import step_run

    spec = PruneSpec(exp.llm_pruning.method, exp.llm_pruning.sparsity, exp.nm_tuple())
    key = key_for(exp, experiment_path)
    params = {
        **exp.runtime(),
        "method": spec.method,
        "sparsity": spec.effective_sparsity,
        "nm": exp.llm_pruning.nm or "unstructured",
        **logged_settings(exp),
    }
    say = lambda line: click.echo(f"[prune_llm] {line}", err=True)  # noqa: E731
    from entrypoints.common import pruning_label

    run_name = f"prune_llm · {pruning_label(exp)}"
    description = (
        f"Pruned the attention and MLP weights of {exp.model} with {spec.method} to sparsity {spec.effective_sparsity:g}"
        f"{f' ({exp.llm_pruning.nm})' if exp.llm_pruning.nm else ''}, calibrated on {exp.calibration.n_sequences} sequences of the "
        f"calibration pool; held-out cross-entropy before and after."
    )
    tags = {"method": spec.method, "sparsity": f"{spec.effective_sparsity:g}", "base_model": exp.model}
    with step_run("prune_llm", key, params, exp.name, run_name, description, tags) as run:
        started = time.perf_counter()
        architecture = model_dims(exp).architecture
        processing = pruning_processing(spec.method, architecture)
        loaded = load_model(exp.model, checkpoint, exp.dtype, processing, exp.device)
        seq_len = exp.calibration.seq_len or loaded.tl.cfg.n_ctx
        plan = document_plan(exp)
        documents = load_documents(plan["calibration"], world)
        if spec.method == "wanda-seed":
            calibration = seed_calibration(documents, loaded.tokenizer, loaded.tl.cfg.n_ctx)
        else:
            calibration = sample_calibration(documents, loaded.tokenizer, exp.calibration.n_sequences, seq_len, exp.calibration.seed)
        heldout = held_out_tokens(
            iter_documents(plan["validation"], world),
            loaded.tokenizer,
            exp.held_out.n_sequences,
            exp.held_out.seq_len or loaded.tl.cfg.n_ctx,
            model_prepends_bos(architecture, loaded.tokenizer),
            "validation",
        )
        calibration_seconds = time.perf_counter() - started
        say(
            f"{exp.model}: {calibration.shape[0]} x {calibration.shape[1]} calibration tokens from {plan['calibration'].describe()}, "
            f"{heldout.numel()} held-out tokens from {plan['validation'].describe()}"
            + (" (TransformerLens-processed weights, as the paper's code)" if processing else "")
        )

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

        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            save_checkpoint(loaded, tmp / "pruned_model", processing)
            # What was saved is what counts: reload it and count its zeros again (processing a pruned model
            # again would fill them; the recorded processing stops that).
            reloaded = load_model(exp.model, tmp / "pruned_model", exp.dtype)
            report_saved = measure_sparsity(reloaded.tl)
            if report_saved.sparsity_actual != report.sparsity_actual:
                raise RuntimeError(
                    f"the saved model's sparsity {report_saved.sparsity_actual} is not the pruned one's {report.sparsity_actual}"
                )
            mlflow.log_metrics(
                {
                    "sparsity_actual": report_saved.sparsity_actual,
                    "ce_loss_dense": ce_dense,
                    "ce_loss_pruned": ce_pruned,
                    "perplexity_dense": float(torch.exp(torch.tensor(ce_dense))),
                    "perplexity_pruned": float(torch.exp(torch.tensor(ce_pruned))),
                    "calibration_seconds": calibration_seconds,
                    "pruning_seconds": report.seconds,
                    "n_pruned_parameters": report_saved.n_pruned_parameters,
                    "n_prunable_parameters": report_saved.n_prunable_parameters,
                    **{f"sparsity.{name}": value for name, value in report_saved.sparsity_per_matrix.items()},
                }
            )
            mlflow.set_tag("saecomp.weight_processing", json.dumps(processing or {}))
            save_file(
                {"calibration_tokens": calibration.contiguous(), "heldout_tokens": heldout.contiguous()},
                tmp / "tokens.safetensors",
            )
            (tmp / "sparsity.json").write_text(json.dumps(report_saved.sparsity_per_matrix, indent=1))
            (tmp / "experiment.json").write_text(json.dumps(exp.to_dict(), indent=1))
            mlflow.log_artifacts(str(tmp / "pruned_model"), "pruned_model")
            for name in ("tokens.safetensors", "sparsity.json", "experiment.json"):
                mlflow.log_artifact(str(tmp / name))
        say(f"done: run {run.info.run_id}, pruned model under its artifacts at pruned_model/")


if __name__ == "__main__":
    main()
