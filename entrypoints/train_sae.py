"""train_sae: train an SAE with SAELens on the pruned (or dense) model, streamed to MLflow.

mlflow run . -e train_sae -P hook=hook_resid_post -P layer=2            # on the experiment's pruned model
mlflow run . -e train_sae -P hook=attn.hook_z -P base=dense             # the tiny world's "pretrained" SAE
mlflow run . -e train_sae -P like=pretrained -P experiment=experiments/gpt2-small.yaml
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import click

from entrypoints.common import StepCommand, experiment_option, fail, flat_params, load, load_source, model_dims, resolve_base, world_step

OPTIONS = {
    "hook": "Hook: attn.hook_z, hook_mlp_out, hook_resid_post (default: the experiment's first).",
    "layer": "Layer (default: the experiment's first).",
    "architecture": "standard, topk, batchtopk, jumprelu.",
    "d_sae": "Latents (default: expansion_factor * d_in).",
    "expansion_factor": "d_sae / d_in when d_sae is not given.",
    "k": "Active latents for topk/batchtopk.",
    "sparsity_coefficient": "L1 (standard) or L0 (jumprelu) coefficient.",
    "training_tokens": "Training tokens.",
    "batch_size_tokens": "Tokens per training batch.",
    "learning_rate": "Adam learning rate.",
    "context_size": "Tokens per training sequence.",
    "dataset": "Text dataset: tiny, or a Hugging Face dataset id (e.g. Skylion007/openwebtext).",
    "max_passes": "Passes over the training stream allowed (default 1: no text repeats).",
    "base": "pruned (the experiment's prune_llm run; default), dense, or a prune_llm run id.",
    "like": "Copy the configuration of a pretrained SAE: 'pretrained' (the experiment's for this hook) or a source.",
}
SCHEMA_FIELD = {
    "architecture": "sae.architecture",
    "d_sae": "sae.d_sae",
    "expansion_factor": "sae.expansion_factor",
    "k": "sae.k",
    "sparsity_coefficient": "sae.l1_coefficient",
    "training_tokens": "sae.training_tokens",
    "batch_size_tokens": "sae.batch_size_tokens",
    "learning_rate": "sae.learning_rate",
    "context_size": "sae.context_size",
    "dataset": "data.dataset",
    "max_passes": "sae.max_passes",
}


def with_options(function):
    for name, text in reversed(OPTIONS.items()):
        function = click.option(f"--{name}", help=text)(function)
    return experiment_option(function)


def parse_int(name: str, value) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(str(value))
    except ValueError:
        fail(f"{name}={value!r} is not an integer")


def build_spec(exp, hook: str | None, layer: int | None, like_sae):
    from saecomp.names import SAETrainingSpec

    s = exp.sae
    spec = SAETrainingSpec(
        hook=hook or s.hooks[0],
        layer=layer if layer is not None else exp.sae_layers(model_dims(exp).n_layers)[0],
        architecture=s.architecture,
        d_sae=s.d_sae,
        expansion_factor=s.expansion_factor,
        k=s.k,
        sparsity_coefficient=s.l1_coefficient,
        training_tokens=s.training_tokens,
        batch_size_tokens=s.batch_size_tokens,
        learning_rate=s.learning_rate,
        context_size=s.context_size,
        normalize_activations=s.normalize_activations,
        prepend_bos=s.prepend_bos,
    )
    if like_sae is None:
        return spec
    from saecomp.train_sae import spec_like

    return spec_like(spec, like_sae)


@click.command(cls=StepCommand)
@with_options
@click.option(
    "--shared_forward",
    help="A folder on this machine where the trainings of one layer's hooks share the model's forward passes "
    "(the pipeline's; the same SAE either way).",
)
def main(experiment, hook, layer, base, like, shared_forward, **fields) -> None:
    exp = load(experiment, {SCHEMA_FIELD[k]: v for k, v in fields.items()})
    layer = parse_int("layer", layer)
    base = base or "pruned"
    like_sae, like_source = None, None
    if like:
        default_layer = layer if layer is not None else exp.sae_layers(model_dims(exp).n_layers)[0]
        source = exp.pretrained_source(hook or exp.sae.hooks[0], default_layer) if like == "pretrained" else like
        if source is None:
            fail(f"like=pretrained, but the experiment names no pretrained SAE for hook={hook or exp.sae.hooks[0]}")
        like_source, like_sae = load_source("like", source)
    try:
        spec = build_spec(exp, hook, layer, like_sae)
    except ValueError as error:
        fail(str(error))
    from saecomp.names import check_spec, hook_d_in

    dims = model_dims(exp)
    width = hook_d_in(dims, spec.hook)
    if like_sae is not None and like_sae.cfg.d_in != width:
        fail(f"the SAE's d_in={like_sae.cfg.d_in} does not match blocks.{spec.layer}.{spec.hook}, whose width is {width}")
    try:
        check_spec(spec, dims)
    except ValueError as error:
        fail(str(error))
    checkpoint, model_label, prune_run = resolve_base(exp, experiment, base)
    run_train_sae(exp, experiment, spec, checkpoint, model_label, prune_run, like_source, shared_forward)


def key_for(exp, experiment_path: str, spec, model_label: str, like_source) -> str:
    import dataclasses

    from saecomp.data import document_plan
    from saecomp.names import TINY_MODELS, hook_d_in, resolved_d_sae
    from saecomp.tracking import step_key

    d_in = hook_d_in(model_dims(exp), spec.hook)
    inputs = {
        "spec": spec.to_dict(),
        # The SAE's shape as resolved (names.py, whose source is in no key, computes it): a change there changes it here.
        "d_in": d_in,
        "d_sae": resolved_d_sae(spec, d_in),
        "model": model_label,
        **exp.runtime(),
        # What the SAE reads: its training stream and the validation windows it is scored on. The calibration and test
        # pools count only as far as they move those (WANDA's own calibration fields reach a pruned model through its
        # prune_llm run, in the model's label): a dense SAE is not retrained for another calibration seed.
        "pools": {role: dataclasses.asdict(pool) for role, pool in document_plan(exp).items() if role in ("sae_train", "validation")},
        "held_out_sequences": exp.held_out.n_sequences,
        "max_passes": exp.sae.max_passes,
        "like": like_source.describe() if like_source else None,
    }
    if exp.model in TINY_MODELS:
        inputs["world"] = world_step(exp, experiment_path)[0]
    return step_key("train_sae", inputs)


class _QuietViewFallback(logging.Filter):
    # SAELens logs an ERROR, then reshapes correctly, whenever hook_z activations are not contiguous.
    def filter(self, record):
        return "Error during view operation" not in record.getMessage() and "Attempting to use reshape" not in record.getMessage()


def run_train_sae(exp, experiment_path, spec, checkpoint, model_label, prune_run, like_source, shared_forward=None) -> str:
    import mlflow

    from saecomp.data import TokenStream, document_plan, held_out_tokens, iter_documents, sae_prepends_bos, special_token_ids
    from saecomp.models import NO_PROCESSING_KWARGS, TINY_MODELS, load_model
    from saecomp.saes import evaluate_sae
    from saecomp.tracking import CACHE_DIR, register_sae, run_is_open, step_run, training_metrics_logger
    from saecomp.train_sae import SharedForward, latest_checkpoint, store_tokens, train_sae

    logging.getLogger("sae_lens").addFilter(_QuietViewFallback())
    key = key_for(exp, experiment_path, spec, model_label, like_source)
    variant = "pretrained" if prune_run is None else "trained"
    params = {
        **exp.runtime(),
        "hook": spec.hook,
        "layer": spec.layer,
        "architecture": spec.architecture,
        "model": exp.model,
        "base_model": model_label,
        "pruned_model_run": prune_run or "none (dense)",
        "variant": variant,
        "like": like_source.describe() if like_source else "none",
        **flat_params(spec.to_dict(), "sae."),
    }
    world = None
    if exp.model in TINY_MODELS:
        world = Path(checkpoint).parent if prune_run is None else None
    say = lambda line: click.echo(f"[train_sae] {line}", err=True)  # noqa: E731
    checkpoint_dir = CACHE_DIR.parent / "checkpoints" / "train_sae" / key
    from entrypoints.common import pruning_label

    on = pruning_label(exp) if prune_run else f"{exp.model} dense"
    run_name = f"train_sae · blocks.{spec.layer}.{spec.hook} · {on} ({variant})"
    description = (
        f"Trained a {spec.architecture} SAE with SAELens at blocks.{spec.layer}.{spec.hook} of {on} on {spec.training_tokens} streamed "
        f"tokens: the {variant} SAE." + (f" Pruned model: prune_llm run `{prune_run}`." if prune_run else "")
    )
    tags = {"variant": variant, "hook": spec.hook, "layer": str(spec.layer), "base_model": exp.model, "pruned_model_run": prune_run or ""}
    with step_run("train_sae", key, params, exp.name, run_name, description, tags) as run:
        loaded = load_model(exp.model, checkpoint, exp.dtype, device=exp.device)
        if exp.model in TINY_MODELS and world is None:
            from entrypoints.common import resolve_world

            world = resolve_world(exp, experiment_path)
        prepend_bos = sae_prepends_bos(spec.prepend_bos, loaded.architecture, loaded.tokenizer)
        special = special_token_ids(loaded.tokenizer)
        plan = document_plan(exp)
        # Streamed from the documents after the calibration and held-out pools: never held in memory, never
        # overlapping the text the SAE is tested on, and never repeated unless sae.max_passes allows it.
        stream = TokenStream(plan["sae_train"], loaded.tokenizer, spec.context_size, prepend_bos, world, exp.sae.max_passes)
        heldout = held_out_tokens(
            iter_documents(plan["validation"], world),
            loaded.tokenizer,
            exp.held_out.n_sequences,
            spec.context_size,
            prepend_bos,
            "validation",
        )
        say(
            f"{variant} SAE at blocks.{spec.layer}.{spec.hook} of {model_label}: {spec.training_tokens} training tokens "
            f"streamed from {plan['sae_train'].describe()}" + (", BOS first" if prepend_bos else "")
        )
        if checkpoint_dir.exists():
            complete = latest_checkpoint(checkpoint_dir)
            say(
                f"checkpoints of an interrupted run with the same inputs are in {checkpoint_dir}: "
                + (f"resuming from {complete.name} samples" if complete else "none complete, so training from the start")
            )
        shared = None
        if shared_forward:
            # the layer's hooks this experiment trains on this model (the same windows: only their activations differ)
            hooks = (spec.hook, *exp.sae.hooks)
            # the model by what it is, not where this process downloaded it (each step has its own temporary copy)
            world_run = world_step(exp, experiment_path)[0] if exp.model in TINY_MODELS else None
            identity = json.dumps([model_label, prune_run, world_run, exp.dtype, exp.device])
            shared, why_not = SharedForward.open(shared_forward, loaded.tl, identity, spec.layer, hooks, store_tokens(spec))
            if shared is None:
                mlflow.set_tag("saecomp.shared_forward", f"not shared: {why_not}")
                say(f"the model's forward passes are not shared with the layer's other hooks: {why_not}")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "sae"
            started = time.perf_counter()
            sae, resumed = train_sae(
                spec,
                loaded.tl,
                stream,
                model_name=model_label,
                model_kwargs=NO_PROCESSING_KWARGS,
                checkpoint_dir=checkpoint_dir,
                output_dir=out,
                dataset_name=plan["sae_train"].describe(),
                on_metrics=training_metrics_logger(),
                prepend_bos=prepend_bos,
                special_ids=sorted(special),
                shared_forward=shared,
                still_wanted=lambda: run_is_open(run.info.run_id),  # closed under it (its launcher died): no checkpoint
            )
            train_seconds = time.perf_counter() - started
            if shared is not None:
                mlflow.set_tag("saecomp.shared_forward", shared.describe())
                say(shared.describe())
            if resumed is not None:
                say(f"resumed from the checkpoint at {resumed} samples")
                mlflow.set_tag("saecomp.resumed_from_samples", str(resumed))
            final = evaluate_sae(loaded.tl, sae, heldout, exp.calibration.batch_size, special_ids=special)  # batch: memory only
            final["train_seconds"] = train_seconds
            final["training_text_tokens_consumed"] = stream.tokens
            final["training_stream_passes"] = stream.passes
            final["tokens_per_second"] = (spec.training_tokens - (resumed or 0)) / train_seconds
            mlflow.log_metrics(final)
            (out / "training.json").write_text(json.dumps({"final": final, "spec": spec.to_dict()}, indent=1))
            mlflow.log_artifacts(str(out), "sae")
            tags = {
                "base_model": exp.model,
                "pruned_model_run": prune_run or "",
                "hook": spec.hook,
                "layer": str(spec.layer),
                "variant": variant,
                "architecture": spec.architecture,
                "experiment": exp.name,
                "source_run": run.info.run_id,
            }
            registered = register_sae("sae", f"{exp.name}.{exp.model.replace('/', '_')}.blocks.{spec.layer}.{spec.hook}", tags)
            mlflow.set_tag("saecomp.registered_model", registered)
        say(
            f"explained variance {final['explained_variance']:.4f}, L0 {final['l0']:.2f}, dead {final['dead_fraction']:.3f}, "
            f"spliced CE {final['ce_loss_with_sae']:.4f} (clean {final['ce_loss_without_sae']:.4f}), "
            f"{final['tokens_per_second']:.0f} tokens/s; run {run.info.run_id}, registered {registered}"
        )
    import shutil

    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # finished: the checkpoints have served
    return run.info.run_id


if __name__ == "__main__":
    main()
