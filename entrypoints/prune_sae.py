"""prune_sae: prune the pretrained SAE's encoder and decoder, sweep the sparsity, select a level.

    mlflow run . -e prune_sae -P sparsity=0.25
    mlflow run . -e prune_sae -P hook=attn.hook_z -P method=latents -P sparsities=0.25,0.5,0.75

Statistics come from the *pruned* model; the sweep is measured on validation tokens from one cached pass,
the selected level (the paper's rule) once more on test tokens, next to the pretrained and trained SAEs.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click

from entrypoints.common import experiment_option, fail, load, load_source, model_dims, resolve_base, world_step

FIXED_LEVELS = (0.25, 0.5)  # the levels the paper tabulates (Pruned25, Pruned50): always kept


def parse_float(name: str, value, low: float, high: float | None, valid: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        number = float(str(value))
    except ValueError:
        fail(f"{name}={value!r} is not a number; valid: {valid}")
    if not (low <= number and (high is None or number < high)):
        fail(f"{name}={value} is not valid; valid: {valid}")
    return number


def parse_levels(value) -> list[float] | None:
    if value in (None, ""):
        return None
    levels = [parse_float("sparsities", part, 0.0, 1.0, "numbers in [0, 1)") for part in str(value).split(",") if part.strip()]
    if not levels:
        fail(f"sparsities={value!r} is empty; valid: a comma-separated list such as 0.25,0.5,0.9")
    return levels


def dependency(exp, experiment_path: str, hook: str, layer: int, base: str, model_label: str) -> str:
    """``runs:/<id>/sae`` of the train_sae run for (hook, layer) on ``base``, run now if the experiment lives
    in the tiny world (minutes), else only found: real SAE training takes GPU-days and is started by hand."""
    from entrypoints.train_sae import build_spec, key_for
    from saecomp.models import TINY_MODELS
    from saecomp.tracking import find_finished_run, run_step

    key = key_for(exp, experiment_path, build_spec(exp, hook, layer, None), model_label, None)
    if exp.model in TINY_MODELS:
        run_id = run_step("train_sae", {"experiment": experiment_path, "hook": hook, "layer": str(layer), "base": base}, key)
    else:
        run_id = find_finished_run("train_sae", key)
        if run_id is None:
            fail(
                f"no finished train_sae run for {hook} layer {layer} on base={base}; run first: "
                f"mlflow run . -e train_sae -P experiment={experiment_path} -P hook={hook} -P layer={layer} -P base={base}"
            )
    return f"runs:/{run_id}/sae"


@click.command()
@experiment_option
@click.option("--hook", help="attn.hook_z, hook_mlp_out or hook_resid_post (default: the experiment's first).")
@click.option("--layer", help="Layer (default: the experiment's first).")
@click.option("--sparsity", help="A level to keep besides 0.25 and 0.5 (and the selected one), in [0, 1).")
@click.option("--method", help="wanda, magnitude, wanda-seed (the paper's code) or latents (smaller SAE).")
@click.option("--sparsities", help="Comma-separated sweep levels in [0, 1).")
@click.option("--tolerance", help="Selection: loss within this fraction of the trained SAE's (>= 0).")
@click.option("--selection_metric", help="mse (the paper's reconstruction loss) or ce_loss_increase.")
@click.option("--source", help="The SAE to prune (default: the experiment's pretrained SAE for the hook).")
@click.option("--trained", help="The SAE trained on the pruned model (default: the train_sae run for the hook).")
def main(experiment, hook, layer, sparsity, method, sparsities, tolerance, selection_metric, source, trained) -> None:
    from saecomp.prune_sae import METHODS
    from saecomp.saes import HOOKS, check_hook

    levels = parse_levels(sparsities)
    sparsity = parse_float("sparsity", sparsity, 0.0, 1.0, "a number in [0, 1)")
    tolerance_value = parse_float("tolerance", tolerance, 0.0, None, "a number >= 0")
    exp = load(
        experiment,
        {
            "sae_pruning.method": method,
            "sae_pruning.sparsities": levels,
            "sae_pruning.tolerance": tolerance_value,
            "sae_pruning.selection_metric": selection_metric,
        },
    )
    if exp.sae_pruning.method not in METHODS:
        fail(f"method={exp.sae_pruning.method!r} is not valid; valid: {', '.join(METHODS)}")
    if not exp.sae_pruning.sparsities:
        fail("sae_pruning.sparsities is empty; valid: a list of numbers in [0, 1)")
    metric = exp.sae_pruning.selection_metric
    hook = hook or exp.sae.hooks[0]
    if hook not in HOOKS:
        fail(f"hook={hook!r} is not valid; valid: {', '.join(HOOKS)}")
    try:
        layer = int(layer) if layer not in (None, "") else exp.sae_layers(model_dims(exp).n_layers)[0]
        check_hook(model_dims(exp), hook, layer)
    except ValueError as error:
        fail(str(error) if "layer" in str(error) else f"layer={layer!r} is not an integer")

    # SAEs the user named are checked before anything is computed; the rest are produced (tiny world) or found.
    given = {name: load_source(name, ref) for name, ref in (("source", source), ("trained", trained)) if ref}
    for name, (_, sae) in given.items():
        if sae.cfg.metadata.hook_name != f"blocks.{layer}.{hook}":
            fail(f"{name} SAE is at {sae.cfg.metadata.hook_name}, not blocks.{layer}.{hook}; pass -P hook=... -P layer=...")
    checkpoint, model_label, prune_run = resolve_base(exp, experiment, "pruned")
    if "source" not in given:
        ref = exp.sae.pretrained.get(hook) or dependency(exp, experiment, hook, layer, "dense", exp.model)
        given["source"] = load_source("source", ref)
    if "trained" not in given:
        given["trained"] = load_source("trained", dependency(exp, experiment, hook, layer, prune_run, model_label))
    (pretrained_source, pretrained), (trained_source, trained_sae) = given["source"], given["trained"]
    for name, sae in (("source", pretrained), ("trained", trained_sae)):
        if sae.cfg.metadata.hook_name != f"blocks.{layer}.{hook}":
            fail(f"{name} SAE is at {sae.cfg.metadata.hook_name}, not blocks.{layer}.{hook}; pass -P hook=... -P layer=...")
    run_prune_sae(exp, experiment, hook, layer, sparsity, metric, checkpoint, model_label, prune_run,
                  (pretrained_source, pretrained), (trained_source, trained_sae))  # fmt: skip


def key_for(exp, experiment_path, hook, layer, sparsity, metric, prune_run, pretrained_source, trained_source) -> str:
    from saecomp.models import TINY_MODELS
    from saecomp.tracking import step_key

    inputs = {
        "hook": hook,
        "layer": layer,
        "sparsity": sparsity,
        "metric": metric,
        "prune_run": prune_run,
        "pretrained": pretrained_source.describe(),
        "trained": trained_source.describe(),
        **{s: exp.to_dict()[s] for s in ("data", "calibration", "held_out", "sae_pruning")},
    }
    if exp.model in TINY_MODELS:
        inputs["world"] = world_step(exp, experiment_path)[0]
    return step_key("prune_sae", inputs)


def sweep_figure(result, pretrained_val: dict, trained_val: dict, selected: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in zip(
        axes, ("ce_loss_with_sae", "mse"), ("cross-entropy with SAE spliced in (nats)", "reconstruction MSE"), strict=True
    ):
        ax.plot(result.levels, [result.metrics[level][metric] for level in result.levels], "o-", color="C0", label="pruned pretrained SAE")
        ax.axhline(pretrained_val[metric], color="C1", linestyle="--", label="pretrained (unpruned)")
        ax.axhline(trained_val[metric], color="C2", linestyle=":", label="trained on the pruned model")
        if metric == "ce_loss_with_sae":
            ax.axhline(pretrained_val["ce_loss_without_sae"], color="grey", linewidth=0.8, label="no SAE")
        ax.axvline(selected, color="C3", alpha=0.4, label=f"selected ({selected:g})")
        ax.set_xlabel("SAE sparsity (fraction of W_enc and W_dec pruned)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_prune_sae(exp, experiment_path, hook, layer, sparsity, metric, checkpoint, model_label, prune_run, pretrained, trained) -> str:
    import mlflow
    import pandas as pd

    from saecomp.data import contiguous_tokens, load_documents, sample_calibration
    from saecomp.models import TINY_MODELS, load_model
    from saecomp.prune_sae import cache_activations, evaluate_cached, sae_statistics, select_level, sweep
    from saecomp.saes import processing_kwargs
    from saecomp.tracking import register_sae, step_run

    (pretrained_source, pretrained_sae), (trained_source, trained_sae) = pretrained, trained
    method = exp.sae_pruning.method
    levels = sorted(set(exp.sae_pruning.sparsities) | set(FIXED_LEVELS) | ({sparsity} if sparsity is not None else set()))
    key = key_for(exp, experiment_path, hook, layer, sparsity, metric, prune_run, pretrained_source, trained_source)
    params = {
        "sparsity": sparsity if sparsity is not None else "none",
        "method": method,
        "source": pretrained_source.describe(),
        "trained": trained_source.describe(),
        "hook": hook,
        "layer": layer,
        "model": exp.model,
        "pruned_model_run": prune_run,
        "levels": ",".join(f"{level:g}" for level in levels),
        "tolerance": exp.sae_pruning.tolerance,
        "selection_metric": metric,
    }
    say = lambda line: click.echo(f"[prune_sae] {line}", err=True)  # noqa: E731
    name = f"blocks.{layer}.{hook}"
    with step_run("prune_sae", key, params) as run:
        models = {}

        def model_for(sae):
            # Each SAE is spliced into the pruned model loaded the way its metadata asks (GUIDE §3).
            kwargs = tuple(sorted(processing_kwargs(sae).items()))
            if kwargs not in models:
                models[kwargs] = load_model(exp.model, checkpoint, processing=dict(kwargs))
            return models[kwargs]

        model = model_for(pretrained_sae)
        world = None
        if exp.model in TINY_MODELS:
            from entrypoints.common import resolve_world

            world = resolve_world(exp, experiment_path)
        ctx = min(pretrained_sae.cfg.metadata.context_size or model.tl.cfg.n_ctx, model.tl.cfg.n_ctx)
        docs = lambda split: load_documents(exp.data.dataset, split, exp.data.text_column, world, exp.data.max_documents)  # noqa: E731
        train_docs = docs(exp.data.split)
        calibration = sample_calibration(train_docs, model.tokenizer, exp.calibration.n_sequences, ctx, exp.calibration.seed)
        if exp.data.dataset == "tiny":
            validation = contiguous_tokens(docs(exp.data.heldout_split), model.tokenizer, exp.held_out.n_sequences, ctx)
            test = contiguous_tokens(docs("test"), model.tokenizer, exp.held_out.n_sequences, ctx)
        else:  # one split: validation and test come from the far half of the pool, apart from each other
            half = len(train_docs) // 2
            validation = contiguous_tokens(train_docs, model.tokenizer, exp.held_out.n_sequences, ctx, half)
            test = contiguous_tokens(train_docs, model.tokenizer, exp.held_out.n_sequences, ctx, half + half // 2)
        say(f"{name} of {model_label}: {calibration.numel()} calibration, {validation.numel()} validation, {test.numel()} test tokens")

        started = time.perf_counter()
        calibration_cache = cache_activations(model.tl, name, calibration)
        stats = sae_statistics(pretrained_sae, calibration_cache.activations.reshape(-1, *calibration_cache.activations.shape[2:]))
        statistics_seconds = time.perf_counter() - started
        validation_cache = cache_activations(model.tl, name, validation)
        pretrained_val = evaluate_cached(model.tl, pretrained_sae, validation_cache)
        trained_model = model_for(trained_sae)
        trained_val = (
            evaluate_cached(model.tl, trained_sae, validation_cache)
            if trained_model is model
            else evaluate_cached(trained_model.tl, trained_sae, cache_activations(trained_model.tl, name, validation))
        )
        mlflow.log_metrics({**{f"validation.pretrained.{k}": v for k, v in pretrained_val.items()},
                            **{f"validation.trained.{k}": v for k, v in trained_val.items()}})  # fmt: skip

        def progress(level, metrics):
            mlflow.log_metrics({f"sweep.{k}": v for k, v in metrics.items()}, step=round(level * 1000))
            say(f"sparsity {level:g}: {metric} {metrics[metric]:.4f} (trained {trained_val[metric]:.4f})")

        result = sweep(model.tl, pretrained_sae, stats, validation_cache, levels, method, progress)
        selected, met = select_level(result.metrics, trained_val[metric], exp.sae_pruning.tolerance, metric)
        say(f"selected sparsity {selected:g}" + ("" if met else f" (no level at or above 0.25 within {exp.sae_pruning.tolerance:g})"))

        kept = sorted(set(FIXED_LEVELS) | {selected} | ({sparsity} if sparsity is not None else set()))
        test_cache = cache_activations(model.tl, name, test)
        table = {"pretrained": evaluate_cached(model.tl, pretrained_sae, test_cache)}
        for level in kept:
            table[f"pruned{round(level * 100):d}"] = evaluate_cached(model.tl, result.saes[level], test_cache)
        table["trained"] = (
            evaluate_cached(model.tl, trained_sae, test_cache)
            if trained_model is model
            else evaluate_cached(trained_model.tl, trained_sae, cache_activations(trained_model.tl, name, test))
        )
        mlflow.log_metrics(
            {
                "selected_sparsity": selected,
                "selection_met": float(met),
                "sweep_seconds": result.seconds,
                "statistics_seconds": statistics_seconds,
                **{f"test.{variant}.{k}": v for variant, m in table.items() for k, v in m.items()},
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            rows = [{"sparsity": level, **result.metrics[level]} for level in result.levels]
            pd.DataFrame(rows).to_csv(tmp / "sweep.csv", index=False)
            pd.DataFrame(table).T.rename_axis("variant").to_csv(tmp / "test_table.csv")
            sweep_figure(
                result, pretrained_val, trained_val, selected, f"{exp.name}: {name} of {model_label} ({method})", tmp / "sweep.png"
            )
            (tmp / "selection.json").write_text(
                json.dumps(
                    {
                        "selected": selected,
                        "met": met,
                        "metric": metric,
                        "reference": trained_val[metric],
                        "tolerance": exp.sae_pruning.tolerance,
                    },
                    indent=1,
                )  # fmt: skip
            )
            registered = []
            for level in kept:
                folder = tmp / "saes" / f"pruned-{level:g}"
                sae = result.saes[level]
                sae.cfg.metadata.model_name = model_label
                sae.save_model(str(folder))
                tags = {
                    "variant": "pruned",
                    "sparsity": f"{level:g}",
                    "method": method,
                    "source": pretrained_source.describe(),
                    "hook": hook,
                    "layer": str(layer),
                    "base_model": exp.model,
                    "pruned_model_run": prune_run or "",
                    "experiment": exp.name,
                    "selected": str(level == selected).lower(),
                    "source_run": run.info.run_id,
                }
                registered.append(register_sae(folder, f"{exp.name}.{exp.model.replace('/', '_')}.{name}", tags))
            mlflow.log_artifacts(str(tmp / "saes"), "saes")
            for file in ("sweep.csv", "test_table.csv", "sweep.png", "selection.json"):
                mlflow.log_artifact(str(tmp / file))
        mlflow.set_tag("saecomp.registered_models", ",".join(registered))
        kept_text = ", ".join(f"{level:g}" for level in kept)
        say(f"done: run {run.info.run_id}; kept {kept_text}; sweep of {len(levels)} levels in {result.seconds:.1f} s")
    return run.info.run_id


if __name__ == "__main__":
    main()
