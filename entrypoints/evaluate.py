"""evaluate: SAEBench's suites for one SAE spliced into the pruned (or a named) model.

    mlflow run . -e evaluate                                        # the experiment's pretrained SAE, core
    mlflow run . -e evaluate -P sae=runs:/<prune_sae run>/saes/pruned-0.25 -P variant=pruned25
    mlflow run . -e evaluate -P model=dense -P suites=core

The model is the experiment's pruned model unless told otherwise; the text is the test pool (`document_plan`),
BOS first where the SAE saw it. Only `core` is built so far.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import click

from entrypoints.common import experiment_option, fail, load, load_source, model_dims, resolve_base, world_step


@click.command()
@experiment_option
@click.option("--sae", help="The SAE: release:sae_id, runs:/<id>/<path>, models:/<name>/<version>, or a SAELens folder.")
@click.option("--model", "base", help="pruned (the experiment's prune_llm run; default), dense, or a prune_llm run id.")
@click.option("--suites", help="Comma-separated SAEBench suites: core, absorption, scr, tpp, sparse_probing, ravel.")
@click.option("--hook", help="With no --sae: the hook of the experiment's pretrained SAE (default: the experiment's first).")
@click.option("--layer", help="With no --sae: its layer (default: the experiment's first).")
@click.option("--variant", help="What the SAE is, for the tables: pretrained, pruned25, pruned50, trained, ... (a tag).")
def main(experiment, sae, base, suites, hook, layer, variant) -> None:
    check_sae_bench()
    from saecomp.evaluate import check_suites
    from saecomp.saes import HOOKS, check_hook

    suite_list = [s.strip() for s in str(suites).split(",") if s.strip()] if suites else None
    exp = load(experiment, {"evaluation.suites": suite_list})
    try:
        check_suites(exp.evaluation.suites)
    except ValueError as error:
        fail(str(error))
    dims = model_dims(exp)
    hook = hook or exp.sae.hooks[0]
    if hook not in HOOKS:
        fail(f"hook={hook!r} is not valid; valid: {', '.join(HOOKS)}")
    try:
        layer = int(layer) if layer not in (None, "") else exp.sae_layers(dims.n_layers)[0]
        check_hook(dims, hook, layer)
    except ValueError as error:
        fail(str(error) if "layer" in str(error) else f"layer={layer!r} is not an integer")
    base = base or "pruned"
    resolved = None
    if base not in ("pruned", "dense"):  # a run id: checked now, before anything is computed
        resolved = resolve_base(exp, experiment, base, name="model")
    reference = sae or exp.pretrained_source(hook, layer)
    if reference is not None:
        source, sae_object = check_sae(load_source("sae", reference), dims, exp.model)
    checkpoint, model_label, prune_run = resolved or resolve_base(exp, experiment, base, name="model")
    if reference is None:  # the tiny world's pretrained SAE: trained now unless a finished run has it
        from entrypoints.prune_sae import dependency

        reference = dependency(exp, experiment, hook, layer, "dense", exp.model)
        source, sae_object = check_sae(load_source("sae", reference), dims, exp.model)
    run_evaluate(exp, experiment, source, sae_object, checkpoint, model_label, prune_run, variant or "unnamed")


def check_sae_bench() -> None:
    """SAEBench present, and importable beside transformers' model classes, or one line naming the fix."""
    import importlib.util

    if importlib.util.find_spec("sae_bench") is None:
        fail(
            "sae-bench is not installed in this environment; install it without its declared torchvision "
            "(whose PyPI build breaks a CPU torch): pip install --no-deps sae-bench==0.6.0"
        )
    try:
        from transformers import GPT2LMHeadModel  # noqa: F401  (fails when a mismatched torchvision is installed)
    except Exception as error:
        first = str(error).splitlines()[0][:200]
        fail(f"transformers cannot load its model classes ({first}); if torchvision is installed: pip uninstall -y torchvision")


def check_sae(loaded, dims, model: str):
    """(source, SAE), after checking that its hook is one of ours and exists in the model with its width."""
    from saecomp.saes import HOOKS, check_hook, hook_d_in

    source, sae = loaded
    name = sae.cfg.metadata.hook_name or ""
    parts = name.split(".", 2)
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in HOOKS:
        fail(f"the SAE's hook {name!r} is not valid; valid: blocks.<layer>.{{{', '.join(HOOKS)}}}")
    try:
        check_hook(dims, parts[2], int(parts[1]))
    except ValueError as error:
        fail(f"the SAE's hook {name} does not fit {model}: {error}")
    width = hook_d_in(dims, parts[2])
    if sae.cfg.d_in != width:
        fail(f"the SAE's d_in={sae.cfg.d_in} does not fit {name} of {model}, whose width is {width}")
    return source, sae


def key_for(exp, experiment_path: str, source, model_label: str) -> str:
    from saecomp.models import TINY_MODELS
    from saecomp.tracking import step_key

    inputs = {
        "sae": source.describe(),
        "model": model_label,
        **exp.runtime(),
        **{section: exp.to_dict()[section] for section in ("data", "calibration", "held_out", "evaluation")},
    }
    if exp.model in TINY_MODELS:
        inputs["world"] = world_step(exp, experiment_path)[0]
    return step_key("evaluate", inputs)


def run_evaluate(exp, experiment_path, source, sae, checkpoint, model_label, prune_run, variant) -> str:
    import mlflow
    from safetensors.torch import save_file

    from saecomp.data import document_plan, held_out_tokens, iter_documents, model_prepends_bos, special_token_ids
    from saecomp.evaluate import CoreSizes, run_core
    from saecomp.models import TINY_MODELS, load_model
    from saecomp.saes import processing_kwargs
    from saecomp.tracking import step_run

    say = lambda line: click.echo(f"[evaluate] {line}", err=True)  # noqa: E731
    ev = exp.evaluation
    hook_name = sae.cfg.metadata.hook_name
    _, layer, hook = hook_name.split(".", 2)
    params = {
        **exp.runtime(),
        "sae": source.describe(),
        "model": exp.model,
        "base_model": model_label,
        "pruned_model_run": prune_run or "none (dense)",
        "suites": ",".join(ev.suites),
        "hook": hook,
        "layer": layer,
        "variant": variant,
        "n_sequences": ev.n_sequences,
        "batch_size_prompts": ev.batch_size_prompts,
        "n_reconstruction_batches": ev.n_reconstruction_batches,
        "n_sparsity_variance_batches": ev.n_sparsity_variance_batches,
    }
    key = key_for(exp, experiment_path, source, model_label)
    from entrypoints.common import pruning_label

    on = pruning_label(exp) if prune_run else f"{exp.model} dense"
    run_name = f"evaluate · {hook_name} · {variant} · {on}"
    description = f"SAEBench ({', '.join(ev.suites)}) for the {variant} SAE {source.describe()} spliced into {on}" + (
        f" (prune_llm run `{prune_run}`)." if prune_run else "."
    )
    tags = {"variant": variant, "hook": hook, "layer": layer, "sae_source": source.describe(), "pruned_model_run": prune_run or ""}
    sparsity = re.search(r"pruned-([0-9.]+)$", source.describe())
    if sparsity:
        tags["sparsity"] = sparsity.group(1)
    with step_run("evaluate", key, params, exp.name, run_name, description, tags) as run:
        world = None
        if exp.model in TINY_MODELS:
            from entrypoints.common import resolve_world

            world = resolve_world(exp, experiment_path)
        # The SAE is spliced into the model loaded the way its metadata asks (GUIDE §3).
        loaded = load_model(exp.model, checkpoint, exp.dtype, processing_kwargs(sae), exp.device)
        sae = sae.to(exp.device)
        context = min(ev.context_size or sae.cfg.metadata.context_size or loaded.tl.cfg.n_ctx, loaded.tl.cfg.n_ctx)
        prepend_bos = sae.cfg.metadata.prepend_bos
        if prepend_bos is None:
            prepend_bos = model_prepends_bos(loaded.architecture, loaded.tokenizer)
        plan = document_plan(exp)
        tokens = held_out_tokens(
            iter_documents(plan["test"], world),
            loaded.tokenizer,
            ev.n_sequences,
            context,
            bool(prepend_bos),
            "test",
            "evaluation.n_sequences",
        )
        special = special_token_ids(loaded.tokenizer)
        say(f"{hook_name} of {model_label}: {variant} SAE {source.describe()}, {tokens.numel()} test tokens from {plan['test'].describe()}")
        failures = {}
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            save_file({"test_tokens": tokens.contiguous()}, tmp / "tokens.safetensors")
            mlflow.log_artifact(str(tmp / "tokens.safetensors"))
            for suite in ev.suites:
                say(f"{suite}: running")
                try:
                    sizes = CoreSizes(ev.batch_size_prompts, ev.n_reconstruction_batches, ev.n_sparsity_variance_batches)
                    result = run_core(loaded.tl, sae, tokens, special, sizes, model_name=model_label, sae_name=source.describe())
                except Exception as error:  # one suite's failure must not stop the others; the run then FAILS
                    failures[suite] = f"{type(error).__name__}: {str(error).splitlines()[0][:500] if str(error) else ''}"
                    mlflow.set_tag(f"saecomp.{suite}.failed", failures[suite])
                    say(f"{suite}: failed ({failures[suite]})")
                    continue
                mlflow.log_metrics({**result.metrics, f"{suite}.seconds": result.seconds})
                (tmp / f"{suite}.json").write_text(json.dumps(result.output, indent=1))
                mlflow.log_artifact(str(tmp / f"{suite}.json"), "saebench")
                headline = {
                    k: result.metrics[k]
                    for k in ("core.ce_loss_score", "core.kl_div_score", "core.explained_variance")
                    if k in result.metrics
                }
                say(f"{suite}: done in {result.seconds:.1f} s; " + ", ".join(f"{k} {v:.4f}" for k, v in headline.items()))
        if failures:
            raise RuntimeError(f"suites failed: {', '.join(failures)} (see the run's saecomp.<suite>.failed tags)")
        say(f"done: run {run.info.run_id}")
    return run.info.run_id


if __name__ == "__main__":
    main()
