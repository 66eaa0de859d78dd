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

from entrypoints.common import (
    StepCommand,
    experiment_option,
    fail,
    load,
    load_source,
    model_dims,
    resolve_base,
    runtime_overrides,
    world_step,
)

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


def dependency(
    exp,
    experiment_path: str,
    hook: str,
    layer: int,
    base: str,
    model_label: str,
    parent_run_id: str | None = None,
    runtime=None,
    shared_forward: str | None = None,
    priority: int = 1,
) -> str:
    """``runs:/<id>/sae`` of the train_sae run for (hook, layer) on ``base``, run now if the experiment lives
    in the tiny world (minutes), else only found: real SAE training takes GPU-days and is started by hand.
    ``parent_run_id`` and ``runtime`` (``--device``/``--dtype``) are for callers in worker threads; ``shared_forward``
    a folder where the layer's trainings share the model's forward passes (train_sae --shared_forward); ``priority``
    its place among the steps waiting for a slot (tracking.run_step)."""
    from entrypoints.train_sae import build_spec, key_for
    from saecomp.names import TINY_MODELS
    from saecomp.tracking import find_finished_run, run_step

    key = key_for(exp, experiment_path, build_spec(exp, hook, layer, None), model_label, None)
    if exp.model in TINY_MODELS:
        run_id = run_step(
            "train_sae",
            {
                "experiment": experiment_path,
                "hook": hook,
                "layer": str(layer),
                "base": base,
                **(runtime or runtime_overrides()),
                **({"shared_forward": shared_forward} if shared_forward else {}),
            },
            key,
            exp.name,
            parent_run_id,
            priority,
        )
    else:
        run_id = find_finished_run("train_sae", key)
        if run_id is None:
            fail(
                f"no finished train_sae run for {hook} layer {layer} on base={base}; run first: "
                f"mlflow run . -e train_sae -P experiment={experiment_path} -P hook={hook} -P layer={layer} -P base={base}"
            )
    return f"runs:/{run_id}/sae"


@click.command(cls=StepCommand)
@experiment_option
@click.option("--hook", help="attn.hook_z, hook_mlp_out or hook_resid_post (default: the experiment's first).")
@click.option("--layer", help="Layer (default: the experiment's first).")
@click.option("--sparsity", help="A level to keep besides 0.25 and 0.5 (and the selected one), in [0, 1).")
@click.option("--method", help="wanda, magnitude, wanda-seed (the paper's code) or latents (smaller SAE).")
@click.option("--sparsities", help="Comma-separated sweep levels in [0, 1).")
@click.option("--tolerance", help="Selection: mse within (1 + tolerance) x the trained SAE's, or CE within tolerance x clean CE.")
@click.option("--selection_metric", help="mse, ce_loss_with_sae or ce_loss_increase.")
@click.option("--selection_rule", help="tolerance (our reading of the paper) or argmin (the paper's code: lowest spliced CE).")
@click.option("--source", help="The SAE to prune (default: the experiment's pretrained SAE for the hook).")
@click.option("--trained", help="The SAE trained on the pruned model (default: the train_sae run for the hook).")
def main(experiment, hook, layer, sparsity, method, sparsities, tolerance, selection_metric, selection_rule, source, trained) -> None:
    from saecomp.names import HOOKS, SAE_PRUNING_METHODS, check_hook

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
            "sae_pruning.selection_rule": selection_rule,
        },
    )
    if exp.sae_pruning.method not in SAE_PRUNING_METHODS:
        fail(f"method={exp.sae_pruning.method!r} is not valid; valid: {', '.join(SAE_PRUNING_METHODS)}")
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

    # SAEs the user or the experiment named are checked before anything is computed; the rest are produced
    # (tiny world) or found.
    named = {"source": source or exp.pretrained_source(hook, layer), "trained": trained}
    given = {name: load_source(name, ref) for name, ref in named.items() if ref}
    for name, (_, sae) in given.items():
        if sae.cfg.metadata.hook_name != f"blocks.{layer}.{hook}":
            fail(f"{name} SAE is at {sae.cfg.metadata.hook_name}, not blocks.{layer}.{hook}; pass -P hook=... -P layer=...")
    if "source" in given:
        d_sae, k = given["source"][1].cfg.d_sae, getattr(given["source"][1].cfg, "k", None)
    else:  # the pretrained SAE train_sae will make: its shape is known from the experiment
        from entrypoints.train_sae import build_spec
        from saecomp.names import hook_d_in, resolved_d_sae

        spec = build_spec(exp, hook, layer, None)
        d_sae = resolved_d_sae(spec, hook_d_in(model_dims(exp), hook))
        k = spec.k if spec.architecture in ("topk", "batchtopk") else None
    # Keyed by the sweep asked for: what is dropped follows from it and the source SAE (in the key too), and the
    # pipeline, which knows no SAE yet, looks the step up by that key (a key of the dropped sweep never matched it).
    asked = exp.model_copy(deep=True)  # drop_unreachable_levels edits exp in place
    exp = drop_unreachable_levels(exp, d_sae, k, sparsity, levels is not None)
    checkpoint, model_label, prune_run = resolve_base(exp, experiment, "pruned")
    if "source" not in given:
        given["source"] = load_source("source", dependency(exp, experiment, hook, layer, "dense", exp.model))
    if "trained" not in given:
        given["trained"] = load_source("trained", dependency(exp, experiment, hook, layer, prune_run, model_label))
    (pretrained_source, pretrained), (trained_source, trained_sae) = given["source"], given["trained"]
    for name, sae in (("source", pretrained), ("trained", trained_sae)):
        if sae.cfg.metadata.hook_name != f"blocks.{layer}.{hook}":
            fail(f"{name} SAE is at {sae.cfg.metadata.hook_name}, not blocks.{layer}.{hook}; pass -P hook=... -P layer=...")
    run_prune_sae(exp, experiment, hook, layer, sparsity, metric, checkpoint, model_label, prune_run,
                  (pretrained_source, pretrained), (trained_source, trained_sae), keyed_by=asked)  # fmt: skip


def drop_unreachable_levels(exp, d_sae: int, k: int | None, sparsity, sweep_given: bool):
    """Levels the method cannot produce for an SAE of ``d_sae`` latents and top ``k`` (`latents` below k
    latents): an error when the user asked for them, dropped with a message when they come from the
    experiment's default sweep."""

    from saecomp.prune_sae import unreachable_levels

    method = exp.sae_pruning.method
    asked = ([sparsity] if sparsity is not None else []) + (list(exp.sae_pruning.sparsities) if sweep_given else [])
    bad = unreachable_levels(d_sae, k, asked, method)
    if bad:
        highest = max(level / 1000 for level in range(1000) if not unreachable_levels(d_sae, k, [level / 1000], method))
        fail(
            f"sparsity={bad[0]:g} is not valid for method={method}: it leaves {d_sae - int(d_sae * bad[0])} "
            f"of {d_sae} latents, fewer than the SAE's k={k}; valid: at most {highest:g}"
        )
    dropped = unreachable_levels(d_sae, k, exp.sae_pruning.sparsities, method)
    if dropped:
        click.echo(
            f"[prune_sae] method={method} cannot reach {', '.join(f'{d:g}' for d in dropped)} (fewer latents than k): dropped", err=True
        )
        exp.sae_pruning = exp.sae_pruning.model_copy(update={"sparsities": [s for s in exp.sae_pruning.sparsities if s not in dropped]})
    return exp


def key_for(exp, experiment_path, hook, layer, sparsity, metric, prune_run, pretrained_source, trained_source) -> str:
    from saecomp.names import TINY_MODELS
    from saecomp.tracking import step_key

    inputs = {
        "hook": hook,
        "layer": layer,
        **exp.runtime(),
        "sparsity": sparsity,
        "metric": metric,
        "rule": exp.sae_pruning.selection_rule,
        "fixed_levels": list(FIXED_LEVELS),  # always swept and kept: this file is in no digest
        "prune_run": prune_run,
        "pretrained": pretrained_source.identity(),
        "trained": trained_source.identity(),
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


def run_prune_sae(
    exp, experiment_path, hook, layer, sparsity, metric, checkpoint, model_label, prune_run, pretrained, trained, keyed_by=None
) -> str:
    """The sweep of ``exp`` (its reachable levels), under the key of ``keyed_by`` (default ``exp``): the experiment
    before unreachable levels were dropped."""
    import mlflow
    import pandas as pd
    from safetensors.torch import save_file

    from saecomp.data import sae_prepends_bos, sae_tokens, special_token_ids
    from saecomp.models import TINY_MODELS, load_model
    from saecomp.names import pruned_variant
    from saecomp.prune_sae import cache_activations, evaluate_cached, sae_statistics, seed_sae_statistics, select_level, sweep
    from saecomp.saes import processing_kwargs
    from saecomp.tracking import register_sae, step_run

    (pretrained_source, pretrained_sae), (trained_source, trained_sae) = pretrained, trained
    method = exp.sae_pruning.method
    rule = exp.sae_pruning.selection_rule
    levels = sorted(set(exp.sae_pruning.sparsities) | set(FIXED_LEVELS) | ({sparsity} if sparsity is not None else set()))
    key = key_for(keyed_by or exp, experiment_path, hook, layer, sparsity, metric, prune_run, pretrained_source, trained_source)
    params = {
        **exp.runtime(),
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
        "selection_rule": rule,
    }
    say = lambda line: click.echo(f"[prune_sae] {line}", err=True)  # noqa: E731
    name = f"blocks.{layer}.{hook}"
    from entrypoints.common import pruning_label

    run_name = f"prune_sae · {name} · {pruning_label(exp)}"
    description = (
        f"Pruned the pretrained SAE at {name} ({pretrained_source.describe()}) with {method} over {len(levels)} levels on prune_llm "
        f"run `{prune_run}`, against the trained SAE ({trained_source.describe()}); selected a level by the {rule} rule."
    )
    tags = {
        "hook": hook,
        "layer": str(layer),
        "method": method,
        "variant": "pruned",
        "base_model": exp.model,
        "pruned_model_run": prune_run or "",
    }
    with step_run("prune_sae", key, params, exp.name, run_name, description, tags) as run:
        models = {}

        def model_for(sae):
            # Each SAE is spliced into the pruned model loaded the way its metadata asks (GUIDE §3).
            kwargs = tuple(sorted(processing_kwargs(sae).items()))
            if kwargs not in models:
                models[kwargs] = load_model(exp.model, checkpoint, exp.dtype, dict(kwargs), exp.device)
            return models[kwargs]

        pretrained_sae = pretrained_sae.to(exp.device)
        trained_sae = trained_sae.to(exp.device)
        model = model_for(pretrained_sae)
        world = None
        if exp.model in TINY_MODELS:
            from entrypoints.common import resolve_world

            world = resolve_world(exp, experiment_path)
        ctx = min(pretrained_sae.cfg.metadata.context_size or model.tl.cfg.n_ctx, model.tl.cfg.n_ctx)
        # Windows start with BOS where the SAE was trained with it (its metadata), else where the model was.
        prepend_bos = sae_prepends_bos(pretrained_sae.cfg.metadata.prepend_bos, model.architecture, model.tokenizer)
        special = special_token_ids(model.tokenizer)
        tokens = sae_tokens(exp, model.tokenizer, ctx, bool(prepend_bos), world, model.tl.cfg.n_ctx,
                            seed_documents=exp.calibration.n_sequences if method == "wanda-seed" else 0)  # fmt: skip
        say(
            f"{name} of {model_label}: {tokens.calibration.numel()} calibration, {tokens.validation.numel()} validation, "
            f"{tokens.test.numel()} test tokens" + (", BOS first" if prepend_bos else "") + "; BOS/EOS/padding never spliced or measured"
        )

        started = time.perf_counter()
        batch = exp.calibration.batch_size  # sequences per forward pass: memory (Gemma-2's 256k-vocabulary logits), not numbers
        if method == "wanda-seed":  # the paper's code's own batches of 8 whole documents, padded per batch
            stats = seed_sae_statistics(model.tl, pretrained_sae, name, tokens.seed_documents)
        else:
            stats = sae_statistics(
                pretrained_sae,
                cache_activations(model.tl, name, tokens.calibration, batch_size=batch, special_ids=special).ordinary_activations(),
            )
        statistics_seconds = time.perf_counter() - started

        caches = {}  # one activation cache per (model, role) within this run

        def cache_for(sae_model, role: str):
            if (id(sae_model), role) not in caches:
                caches[(id(sae_model), role)] = cache_activations(sae_model.tl, name, getattr(tokens, role), batch, special_ids=special)
            return caches[(id(sae_model), role)]

        def measure(sae, role: str):
            return evaluate_cached(model_for(sae).tl, sae, cache_for(model_for(sae), role), batch)

        pretrained_val = measure(pretrained_sae, "validation")
        trained_val = measure(trained_sae, "validation")
        mlflow.log_metrics({**{f"validation.pretrained.{k}": v for k, v in pretrained_val.items()},
                            **{f"validation.trained.{k}": v for k, v in trained_val.items()}})  # fmt: skip

        def progress(level, metrics):
            mlflow.log_metrics({f"sweep.{k}": v for k, v in metrics.items()}, step=round(level * 1000))
            say(f"sparsity {level:g}: {metric} {metrics[metric]:.4f} (trained {trained_val[metric]:.4f})")

        result = sweep(model.tl, pretrained_sae, stats, cache_for(model, "validation"), levels, method, progress, batch)
        selected, met = select_level(result.metrics, trained_val, exp.sae_pruning.tolerance, metric, rule)
        say(
            f"selected sparsity {selected:g} ({rule})" + ("" if met else f" (even 0.25 misses the tolerance {exp.sae_pruning.tolerance:g})")
        )

        kept = sorted(set(FIXED_LEVELS) | {selected} | ({sparsity} if sparsity is not None else set()))
        table = {"pretrained": measure(pretrained_sae, "test")}
        for level in kept:
            table[pruned_variant(level)] = measure(result.saes[level], "test")
        table["trained"] = measure(trained_sae, "test")
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
                        "rule": rule,
                        "reference": trained_val[metric],
                        "clean_ce": trained_val["ce_loss_without_sae"],
                        "tolerance": exp.sae_pruning.tolerance,
                    },
                    indent=1,
                )  # fmt: skip
            )
            registered, registrations = [], []
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
                registrations.append((f"saes/pruned-{level:g}", tags))
            mlflow.log_artifacts(str(tmp / "saes"), "saes")
            for artifact_path, tags in registrations:  # each registered version is the run's folder, stored once
                registered.append(register_sae(artifact_path, f"{exp.name}.{exp.model.replace('/', '_')}.{name}", tags))
            # The token ids it used, so that anyone can re-derive its statistics, masks and numbers.
            save_file(tokens.as_dict(), tmp / "tokens.safetensors")
            for file in ("sweep.csv", "test_table.csv", "sweep.png", "selection.json", "tokens.safetensors"):
                mlflow.log_artifact(str(tmp / file))
        mlflow.set_tag("saecomp.registered_models", ",".join(registered))
        kept_text = ", ".join(f"{level:g}" for level in kept)
        say(f"done: run {run.info.run_id}; kept {kept_text}; sweep of {len(levels)} levels in {result.seconds:.1f} s")
    return run.info.run_id


if __name__ == "__main__":
    main()
