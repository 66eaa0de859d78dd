"""main: run a whole experiment file as one pipeline, reusing every finished step.

    mlflow run .                                       # experiments/tiny.yaml, offline
    mlflow run . -P experiment=experiments/gpt2-small.yaml -P jobs=4
    python -m entrypoints.pipeline --experiment experiments/gpt2-small.yaml --executor ray --address head:6379

Steps run as their own MLflow runs (children of this one when they are new); a step whose inputs and
code match a FINISHED run is not run again. The steps are declared in `saecomp.graph`; where they run is the
executor's business (`saecomp.executors`): here `--jobs N` steps at once (auto: one per core for the tiny world on
CPU), or Ray tasks.
Built so far: build_world -> prune_llm -> train_sae (pretrained on the dense model and trained on the pruned one, in
the tiny world) -> prune_sae -> evaluate (SAEBench core), for every hook and layer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import click

from entrypoints.common import StepCommand, experiment_option, fail, load, model_dims, model_source, resolve_base, runtime_overrides
from entrypoints.prune_llm import check_layers


def per_layer_figure(curves, title: str, path: Path) -> list[str]:
    """One sweep curve per layer (the paper's appendix Figures 5-7); returns the curves' labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.cm.viridis([i / max(len(curves) - 1, 1) for i in range(len(curves))])
    for colour, (layer, table) in zip(colours, sorted(curves.items()), strict=True):
        ax.plot(table["sparsity"], table["mse"], "o-", color=colour, label=f"layer {layer}", markersize=3)
    ax.set_xlabel("SAE sparsity")
    ax.set_ylabel("reconstruction MSE (validation)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    labels = [line.get_label() for line in ax.get_lines()]
    plt.close(fig)
    return labels


def evaluation_seeds(exp, suites: list[str]) -> list[int]:
    """The seeds each variant is evaluated under: the replicates' where a suite reads a seed, else the first alone."""
    from saecomp.config import SEEDED_SUITES

    seeds = exp.evaluation.replicate_seeds()
    return seeds if any(s in SEEDED_SUITES for s in suites) else seeds[:1]


def finished_suites(experiment: str, runtime: dict, suites: list[str], seeds: list[int], seed: int, source, model_label: str,
                    variant: str):
    """(the experiment as evaluated under ``seed``, suite -> its finished evaluate run or None) for one variant's SAE
    (``source``, evaluated as ``variant``) on ``model_label``: the first seed asks every suite, the others only those
    that read a seed. What the pipeline reuses, and what its dry run reports."""
    from entrypoints import evaluate
    from saecomp.config import SEEDED_SUITES
    from saecomp.tracking import find_finished_suite

    asked = suites if seed == seeds[0] else [s for s in suites if s in SEEDED_SUITES]
    seed_exp = load(experiment, {**runtime, "evaluation.suites": asked, "evaluation.seed": seed}, check_device=False, writes=False)
    keys = evaluate.suite_keys(seed_exp, experiment, source, model_label, variant)
    return seed_exp, {s: find_finished_suite(s, k) for s, k in keys.items()}


def cell_variants(pretrained: str, sweep: str, selected: float, trained: str) -> dict[str, str]:
    """The SAEs a cell evaluates, by the variant name compare shows them under: the paper's four, and the sweep's
    selected level where it is neither 0.25 nor 0.5."""
    from saecomp.names import pruned_variant

    variants = {"pretrained": pretrained, "pruned25": f"runs:/{sweep}/saes/pruned-0.25",
                "pruned50": f"runs:/{sweep}/saes/pruned-0.5", "trained": trained}  # fmt: skip
    if selected not in (0.25, 0.5):
        variants[pruned_variant(selected)] = f"runs:/{sweep}/saes/pruned-{selected:g}"
    return variants


def evaluations_status(exp, experiment: str, suites: list[str], pretrained: str, trained: str, sweep: str, model_label: str) -> str:
    """How many of a cell's suite results (every variant, every seed) its finished evaluate runs hold, as the pipeline
    would find them, and how many will run."""
    import mlflow

    from saecomp.saes import SAESource

    selected = mlflow.MlflowClient().get_run(sweep).data.metrics["selected_sparsity"]
    variants = cell_variants(pretrained, sweep, selected, trained)
    runtime = runtime_overrides()
    seeds = evaluation_seeds(exp, suites)
    found = [
        run_id
        for variant, ref in variants.items()
        for seed in seeds
        for run_id in finished_suites(experiment, runtime, suites, seeds, seed, SAESource.parse(ref), model_label, variant)[1].values()
    ]
    missing = sum(run_id is None for run_id in found)
    if not missing:
        return f"reuses finished runs for all {len(found)} suite results"
    return f"{missing} of {len(found)} suite results will run"


def dry_run_plan(exp, experiment: str, layers: list[int], suites: list[str], dims) -> list[str]:
    """The pipeline's steps in order, each with what it processes and whether a finished run will be reused: found
    by key lookups alone (nothing is computed or started). Steps downstream of one not run yet have no key yet."""
    from entrypoints import prune_llm, prune_sae, train_sae
    from entrypoints.common import world_step
    from saecomp.config import SEEDED_SUITES
    from saecomp.names import TINY_MODELS, SAESource, hook_d_in
    from saecomp.tracking import find_finished_run

    def status(step: str, key: str | None) -> str:
        if key is None:
            return "will run (after its upstream steps)"
        found = find_finished_run(step, key)
        return f"reuses finished run {found}" if found else "will run"

    lines = [f"pipeline for {experiment} ({exp.name}): {exp.model} on {exp.device} in {exp.dtype}"]
    if exp.model in TINY_MODELS:
        lines.append(f"  build_world      {status('build_world', world_step(exp, experiment)[0])}")
    calibration = f"{exp.calibration.n_sequences} x {exp.calibration.seq_len or dims.n_ctx} calibration tokens"
    prune_key = prune_llm.key_for(exp, experiment)
    prune_run = find_finished_run("prune_llm", prune_key)
    amount = exp.llm_pruning.nm or exp.llm_pruning.sparsity
    lines.append(f"  prune_llm        {exp.llm_pruning.method} {amount}, {calibration}: {status('prune_llm', prune_key)}")
    pruned_label = f"{exp.model}+prune_llm:{prune_run}" if prune_run else None
    by_hand = exp.model not in TINY_MODELS  # real SAE training is started by hand; the pipeline only finds it

    def training(key: str | None) -> str:
        if by_hand and (key is None or find_finished_run("train_sae", key) is None):
            return "not run by the pipeline: start it by hand (mlflow run . -e train_sae ...), or the pipeline stops here"
        return status("train_sae", key)

    for layer in layers:
        for hook in exp.sae.hooks:
            spec = train_sae.build_spec(exp, hook, layer, None)
            width = spec.d_sae or spec.expansion_factor * hook_d_in(dims, hook)
            what = f"{spec.architecture} SAE, {width} latents, {spec.training_tokens:,} tokens"
            cell = f"blocks.{layer}.{hook}"
            source = exp.pretrained_source(hook, layer)
            if source:
                lines.append(f"  {cell}: pretrained SAE {SAESource.parse(source).describe()}")
            else:
                dense = train_sae.key_for(exp, experiment, spec, exp.model, None)
                lines.append(f"  {cell}: train_sae on the dense model ({what}): {training(dense)}")
                found = find_finished_run("train_sae", dense)
                source = f"runs:/{found}/sae" if found else None
            pruned = train_sae.key_for(exp, experiment, spec, pruned_label, None) if pruned_label else None
            lines.append(f"  {cell}: train_sae on the pruned model ({what}): {training(pruned)}")
            found = find_finished_run("train_sae", pruned) if pruned else None
            trained = f"runs:/{found}/sae" if found else None
            # the sweep's key names the SAEs it prunes and compares: known once both exist (as the pipeline finds them)
            sweep_key = (
                prune_sae.key_for(exp, experiment, hook, layer, None, exp.sae_pruning.selection_metric, prune_run,
                                  SAESource.parse(source), SAESource.parse(trained))  # fmt: skip
                if source and trained
                else None
            )
            levels = ", ".join(f"{s:g}" for s in exp.sae_pruning.sparsities)
            lines.append(
                f"  {cell}: prune_sae {exp.sae_pruning.method} at {levels}, select by {exp.sae_pruning.selection_metric}: "
                f"{status('prune_sae', sweep_key)}"
            )
            sweep = find_finished_run("prune_sae", sweep_key) if sweep_key else None
            if suites:
                ev = exp.evaluation
                reads = []
                if "core" in suites:
                    reads.append(f"core: {ev.n_sequences} test windows of {ev.context_size or spec.context_size} tokens")
                if {"scr", "tpp"} & set(suites):
                    reads.append(
                        f"SCR/TPP: probes on {ev.scr_tpp_train_size}/{ev.scr_tpp_test_size} labelled texts, n = {ev.scr_tpp_n_values}"
                    )
                if "sparse_probing" in suites:
                    reads.append(
                        f"sparse probing: {ev.sparse_probing_train_size}/{ev.sparse_probing_test_size} texts, k = {ev.sparse_probing_k}"
                    )
                if "ravel" in suites:
                    reads.append(
                        f"RAVEL: up to {ev.ravel_pairs_per_attribute} pairs per attribute, top {ev.ravel_top_n_entities} entities "
                        "(hook_resid_post of Gemma-2 only)"
                    )
                seeded = [s for s in suites if s in SEEDED_SUITES]
                if ev.replicates > 1 and seeded:
                    reads.append(f"{', '.join(seeded)} under seeds {', '.join(map(str, ev.replicate_seeds()))}")
                tokens = "; ".join(reads)
                lines.append(
                    f"  {cell}: evaluate {', '.join(suites)} for pretrained, pruned25, pruned50, trained (+ the selected level), {tokens}: "
                    + (evaluations_status(exp, experiment, suites, source, trained, sweep, pruned_label) if sweep else
                       "will run (after its upstream steps)")  # fmt: skip
                )
    lines.append("  compare          the paper's tables and figures from this pipeline's runs (report.html, tables.md/.tex, cells.csv)")
    return lines


@click.command(cls=StepCommand)
@experiment_option
@click.option(
    "--jobs",
    default="auto",
    show_default=True,
    help="Steps computed at once on this machine, each its own process with its share of the cores' torch threads: a "
    "number, or auto (one per core for the tiny world on CPU, as many as its memory holds; one on a GPU or for a real "
    "model on CPU).",
)
@click.option(
    "--executor",
    "executor_name",
    default="local",
    show_default=True,
    type=click.Choice(["local", "ray"]),
    help="Where steps run: this machine, or a Ray cluster (each step a task with its resources).",
)
@click.option(
    "--address",
    default=None,
    help="Ray cluster address (ray://host:10001 or host:6379; default: RAY_ADDRESS, else a local Ray started here).",
)
@click.option("--dry-run", is_flag=True, help="Print the steps, what each processes and what is reused; compute nothing.")
def main(experiment: str, jobs: str, executor_name: str, address: str | None, dry_run: bool) -> None:
    from saecomp import executors

    if address and executor_name != "ray":  # else the whole experiment would run here, not on the cluster named
        fail(f"--address {address} is for --executor ray; valid: add --executor ray, or leave --address out")
    # A plan needs no GPU, nor does a Ray driver (its GPU steps run on the cluster's GPU nodes).
    exp = load(experiment, {}, check_device=not dry_run and executor_name != "ray", check_store=not dry_run, writes=not dry_run)
    if jobs == "auto":
        jobs = 1 if executor_name == "ray" else executors.automatic_jobs(exp.model, exp.device)
    elif not str(jobs).isdigit() or int(jobs) < 1:
        fail(f"--jobs {jobs!r} is not valid; valid: a whole number of at least 1, or auto")
    jobs = int(jobs)
    runtime = runtime_overrides()  # worker threads have no click context: hand the overrides on explicitly
    dims = model_dims(exp)
    check_layers(exp, dims)
    from saecomp.names import check_hook

    layers = exp.sae_layers(dims.n_layers)
    for layer in layers:
        for hook in exp.sae.hooks:
            try:
                check_hook(dims, hook, layer)
            except ValueError as error:
                fail(f"sae.layers: {error}")
    import mlflow

    suites = list(exp.evaluation.suites)
    if dry_run:
        click.echo("\n".join(dry_run_plan(exp, experiment, layers, suites, dims)))
        return
    if executor_name == "ray" and jobs > 1:
        fail("--jobs is for --executor local; on Ray every cell runs as soon as the cluster has its resources")

    from saecomp.tracking import experiment_id_for, prepare_store

    prepare_store(concurrent=jobs > 1 or executor_name == "ray")
    try:
        executor = executors.make(executor_name, jobs, address or os.environ.get("RAY_ADDRESS"), exp.device)
    except ValueError as error:
        fail(str(error))
    except ConnectionError as error:  # no Ray cluster at that address
        fail(f"--address {address or os.environ.get('RAY_ADDRESS')}: {str(error).splitlines()[0][:300]}")
    try:
        artifacts = mlflow.MlflowClient().get_experiment(experiment_id_for(exp.name)).artifact_location
        executors.check_store(executor, mlflow.get_tracking_uri(), artifacts)
    except ValueError as error:
        executor.close()
        fail(str(error))
    from saecomp.tracking import STOPPING

    STOPPING.clear()  # a pipeline that failed earlier in this process stopped its own steps, not this one's
    executors.use(executor)
    click.echo(f"[pipeline] executor: {executor.describe()}", err=True)
    interrupted = False
    try:
        _run_pipeline(exp, experiment, layers, suites, executor, runtime)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        executors.use(executors.InProcess())
        executor.close()
        if not interrupted:  # a failed step's map has waited for every worker thread; after Ctrl-C this process ends
            STOPPING.clear()  # this pipeline's stop is over: what runs next in this process may start steps


def _run_pipeline(exp, experiment: str, layers: list[int], suites: list[str], executor, runtime: dict) -> None:
    import mlflow
    import pandas as pd

    from entrypoints import evaluate, prune_sae
    from entrypoints.common import pruning_label
    from saecomp.config import SEEDED_SUITES
    from saecomp.names import TINY_MODELS, SAESource
    from saecomp.tracking import (
        STEP_TAG,
        STOPPING,
        alive,
        experiment_id_for,
        library_versions,
        local_artifacts,
        note_reused,
        reap_dead_runs,
        remove_orphaned_scratch,
        run_step,
        scratch_folder,
    )  # fmt: skip

    # Under `mlflow run`, MLflow has placed this run (`--experiment-name`); run directly, it goes to the
    # experiment named after the file. The steps it starts go there either way.
    placed = os.environ.get("MLFLOW_RUN_ID")
    reap_dead_runs()  # runs a killed pipeline left RUNNING: KILLED, with the reason, before anything is reused
    for orphan in remove_orphaned_scratch():  # and the temporary folders it left
        click.echo(f"[pipeline] deleted {orphan}: its pipeline is gone", err=True)
    with mlflow.start_run(experiment_id=None if placed else experiment_id_for(exp.name)) as run, alive(mlflow.active_run().info.run_id):
        mlflow.set_tags(
            {
                STEP_TAG: "pipeline",
                "mlflow.runName": f"pipeline · {exp.name} · {pruning_label(exp)}",
                "mlflow.note.content": f"The whole experiment file {experiment}: every step, reusing finished ones; "
                f"the summary tables are this run's artifacts (summary.csv, evaluation.csv).",
                **library_versions(),
            }
        )
        if run.info.experiment_id == "0":
            click.echo(
                f"[saecomp] this pipeline run is in MLflow's Default experiment; its steps go to the experiment {exp.name!r}. "
                f"`mlflow run . --experiment-name {exp.name}` files the pipeline run there too.",
                err=True,
            )
        mlflow.log_param("experiment_name", exp.name)
        model_source(exp, experiment)  # the tiny world, when the experiment needs one
        _, model_label, prune_run = resolve_base(exp, experiment, "pruned")
        llm = mlflow.MlflowClient().get_run(prune_run).data.metrics
        mlflow.log_metrics({f"prune_llm.{k}": llm[k] for k in ("ce_loss_dense", "ce_loss_pruned", "sparsity_actual")})
        parent = run.info.run_id

        # Within a cell, steps side by side where the executor runs several at once (this machine's pool: as its slots
        # allow; Ray: as the cluster's resources allow); in-process one after another.
        side_by_side = executor.map if executor.concurrency > 1 else (lambda function, items: [function(i) for i in items])

        def cell(layer: int, hook: str) -> dict:
            """One hook at one layer: its SAEs (trained as needed), the sweep, the variants' evaluations."""
            # The SAE on the dense model (unless the experiment names a pretrained one) and the one trained on the pruned
            # model: side by side where the executor runs steps side by side. Trainings go before any waiting sweep or
            # evaluation (they unblock a whole cell).
            # The layer's hooks read the same windows of the same model: their trainings share its forward passes
            # through a folder on this machine (the same SAEs; train_sae --shared_forward). A layer's first hook trains
            # first on each model and computes those passes; the layer's other hooks start their trainings on that
            # model once it is done, and read them.
            forward = {"shared_forward": str(forward_root)} if forward_root else {}

            def training(base: str, label: str) -> str:
                if base == "dense" and exp.pretrained_source(hook, layer):
                    return exp.pretrained_source(hook, layer)
                gate, first = forward_gates[(layer, base == "dense")], hook == exp.sae.hooks[0]
                while forward and not first and not gate.wait(1):
                    if STOPPING.is_set():  # the first hook's training may never start: a failed step stopped the pipeline
                        raise RuntimeError(f"not training {hook}: the pipeline is stopping")
                try:
                    return prune_sae.dependency(exp, experiment, hook, layer, base, label, parent, runtime, **forward, priority=-1)
                finally:
                    if first:
                        gate.set()  # also when it failed: the pipeline is stopping, and nothing may wait forever

            pretrained, trained = side_by_side(lambda args: training(*args), [("dense", exp.model), (prune_run, model_label)])
            key = prune_sae.key_for(
                exp, experiment, hook, layer, None, exp.sae_pruning.selection_metric, prune_run,
                SAESource.parse(pretrained), SAESource.parse(trained),
            )  # fmt: skip
            # The SAEs this key names, handed over as they are: the step must not look them up again, since a step of a
            # killed pipeline that outlived it may have finished a second run with the same key meanwhile.
            named = {"trained": trained} if exp.pretrained_source(hook, layer) else {"source": pretrained, "trained": trained}
            parameters = {"experiment": experiment, "hook": hook, "layer": str(layer), **named, **runtime}
            run_id = run_step("prune_sae", parameters, key, exp.name, parent)
            table = pd.read_csv(local_artifacts(run_id, "test_table.csv"))
            table.insert(0, "hook", f"blocks.{layer}.{hook}")
            chosen = mlflow.MlflowClient().get_run(run_id).data.metrics
            selected = chosen["selected_sparsity"]
            table.insert(2, "selected", selected)
            # whether that level met the selection rule (else it is the fallback, and publish leaves it out)
            table.insert(3, "selection_met", bool(chosen.get("selection_met", 1.0)))
            out = {"run": run_id, "table": table, "sweep": pd.read_csv(local_artifacts(run_id, "sweep.csv")), "evaluations": []}
            if not suites:
                return out
            # The paper's four variants (and the selected level), evaluated on the pruned model.
            variants = cell_variants(pretrained, run_id, selected, trained)
            eval_exp = load(experiment, {**runtime, "evaluation.suites": suites}, check_device=False)  # checked once, above
            # The variants' evaluate runs share the model-side work of SCR, TPP and sparse probing, as SAEBench's run_eval
            # shares it across its SAE list (same numbers; evaluate --shared_activations). Only on this machine; deleted
            # once the cell is done.
            shared = {"shared_activations": str(shared_root / f"blocks.{layer}.{hook}")} if shared_root else {}

            seeds = evaluation_seeds(eval_exp, suites)  # core alone reads no seed: one evaluation per variant

            def evaluation(item: tuple[str, str, int], priority: int = 1) -> dict:
                """One variant's suites under one seed: their finished runs, and one evaluate run for those without
                one. The first seed asks every suite; the others only the suites that read a seed."""
                variant, ref, seed = item
                source = SAESource.parse(ref)
                # Each suite is reused alone: only the suites without a finished result run (in one evaluate run).
                _, found = finished_suites(experiment, runtime, suites, seeds, seed, source, model_label, variant)
                missing = [s for s, run_id in found.items() if run_id is None]
                if missing:
                    missing_exp = load(experiment, {**runtime, "evaluation.suites": missing, "evaluation.seed": seed}, check_device=False)
                    key = evaluate.key_for(missing_exp, experiment, source, model_label, variant)
                    parameters = {
                        "experiment": experiment,
                        "sae": source.describe(),
                        "variant": variant,
                        "suites": ",".join(missing),
                        "seed": str(seed),
                        "inapplicable": "tag",  # the experiment's suites, not the user's request: RAVEL on GPT-2 is tagged
                        **shared,
                        **runtime,
                    }
                    note_reused(parent, sorted({run_id for run_id in found.values() if run_id is not None}))
                    new_run = run_step("evaluate", parameters, key, exp.name, parent, priority)
                    found.update({s: new_run for s in missing})
                else:
                    note_reused(parent, sorted(set(found.values())))
                    reused = ", ".join(sorted(set(found.values())))
                    print(f"[saecomp] reusing finished evaluate run {reused} ({variant} at blocks.{layer}.{hook}, seed {seed})", flush=True)
                row = {"hook": f"blocks.{layer}.{hook}", "variant": variant, "seed": seed, "runs": sorted(set(found.values()))}
                # One read per run, not per suite: a run holds several suites, and reading a run reads all its metrics.
                datas = {run_id: mlflow.MlflowClient().get_run(run_id).data for run_id in set(found.values())}
                for suite, run_id in found.items():
                    data = datas[run_id]
                    row.update({k: v for k, v in data.metrics.items() if k.startswith(f"{suite}.")})
                    if f"saecomp.{suite}.not_applicable" in data.tags:
                        row[f"{suite}.not_applicable"] = data.tags[f"saecomp.{suite}.not_applicable"]
                return row

            def variant_row(rows: list[dict]) -> dict:
                """A variant's row: the first seed's numbers; for the seeded suites with several seeds, the mean over
                the seeds whose run has the number, as compare's cells (which give its standard error and say where
                only one seed has it)."""
                row = {**rows[0], "runs": ",".join(sorted({r for each in rows for r in each["runs"]}))}
                del row["seed"]
                if len(rows) > 1:
                    row["seeds"] = len(rows)
                    for name in {k for each in rows for k in each if k.split(".", 1)[0] in SEEDED_SUITES}:
                        if name.endswith("_se"):  # one run's standard error is not that of the mean over seeds (compare's)
                            row.pop(name, None)
                            continue
                        values = [each[name] for each in rows if isinstance(each.get(name), float)]
                        if values:
                            row[name] = sum(values) / len(values)
                return row

            # With a shared folder, the first variant of each seed first (the seeds' model sides differ), so that each
            # computes its shared model sides once (unless they are reused: then the others may each compute them,
            # safely, see evaluate.model_side_folder); then the others, as far as the executor runs steps side by side
            # (one at a time in-process). Rows keep the variants' order.
            (first_variant, first_ref), *_ = variants.items()
            firsts = [(first_variant, first_ref, seed) for seed in seeds]
            rest = [(variant, ref, seed) for seed in seeds for variant, ref in variants.items() if variant != first_variant]
            # Waiting for a slot, a hook's first evaluation (about twice the others: it computes the model sides three
            # more wait for) goes before the sweeps, which go before the later evaluations: the longest work that holds up
            # other work first, so that the run does not end on one evaluation beside an idle core (benchmarks/README.md).
            if shared:
                rows = [*side_by_side(lambda item: evaluation(item, 0), firsts), *side_by_side(lambda item: evaluation(item, 2), rest)]
            else:  # no model sides to share (Ray's workers do not see this machine's folders): every evaluation at once
                rows = side_by_side(lambda item: evaluation(*item), [*((f, 0) for f in firsts), *((r, 2) for r in rest)])
            out["evaluations"] = [variant_row([r for r in rows if r["variant"] == variant]) for variant in variants]
            if shared:
                shutil.rmtree(shared["shared_activations"], ignore_errors=True)
            return out

        cells = [(layer, hook) for layer in layers for hook in exp.sae.hooks]
        click.echo(f"[pipeline] {len(cells)} hook/layer cell(s) on {executor.describe()}", err=True)
        # A failed cell or Ctrl-C cancels the steps running now (their own process sessions never see the terminal's
        # Ctrl-C) and starts no new one.
        local = executor.name in ("in-process", "local pool")  # Ray's workers do not see this machine's folders
        shared_root = scratch_folder("shared-activations") if local and suites else None
        # (only where train_sae trains here, on the CPU: SharedForward refuses a GPU, where the forward beats the disk)
        sharing = local and len(exp.sae.hooks) > 1 and exp.model in TINY_MODELS and str(exp.device).startswith("cpu")
        forward_root = scratch_folder("shared-forward") if sharing else None
        forward_gates = {(layer, dense): threading.Event() for layer in layers for dense in (True, False)}
        try:
            done = executor.map(lambda c: cell(*c), cells)  # in the order of `cells`
        finally:
            for root in (shared_root, forward_root):
                if root:
                    shutil.rmtree(root, ignore_errors=True)
        tables = [d["table"] for d in done]
        sae_runs = [d["run"] for d in done]
        evaluations = [e for d in done for e in d["evaluations"]]
        sweeps = {c: d["sweep"] for c, d in zip(cells, done, strict=True)}
        summary = pd.concat(tables, ignore_index=True)
        core_columns = ["core.kl_div_score", "core.ce_loss_score", "core.cossim", "core.mse", "core.explained_variance",
                        "core.explained_variance_centred", "core.l0"]  # fmt: skip
        core_table = pd.DataFrame(evaluations)
        with tempfile.TemporaryDirectory() as tmp:
            summary.to_csv(Path(tmp) / "summary.csv", index=False)
            mlflow.log_artifact(str(Path(tmp) / "summary.csv"))
            if evaluations:
                core_table.to_csv(Path(tmp) / "evaluation.csv", index=False)
                mlflow.log_artifact(str(Path(tmp) / "evaluation.csv"))
            if len(layers) > 1:
                for hook in exp.sae.hooks:
                    path = Path(tmp) / f"sweep_by_layer_{hook}.png"
                    per_layer_figure({layer: sweeps[(layer, hook)] for layer in layers}, f"{exp.name}: {hook} of {model_label}", path)
                    mlflow.log_artifact(str(path))
        mlflow.set_tags({"saecomp.prune_llm_run": prune_run, "saecomp.prune_sae_runs": ",".join(sae_runs)})
        # compare: the paper's tables and figures from this pipeline's runs in the store, a report among its artifacts.
        from entrypoints import compare as compare_step
        from saecomp.tracking import PIPELINE_RUNS_ARTIFACT, collect_runs

        used = {"prune_llm": [prune_run], "prune_sae": sae_runs, "evaluate": sorted({r for e in evaluations for r in e["runs"].split(",")})}
        mlflow.log_dict(used, PIPELINE_RUNS_ARTIFACT)  # exactly what compare reads for this pipeline (tags get cut)
        compared = collect_runs([experiment_id_for(exp.name)], parent)
        compare_key = compare_step.key_for(compared, parent, {})
        compare_run = run_step("compare", {"experiment": experiment, "pipeline_run": parent}, compare_key, exp.name, parent)
        mlflow.log_artifacts(str(local_artifacts(compare_run, "report")), "compare")
        columns = ["hook", "variant", "selected", "selection_met", "mse", "explained_variance", "cossim", "l0", "ce_loss_with_sae",
                   "ce_loss_without_sae"]  # fmt: skip
        core_text = ""
        if evaluations:
            shown = core_table[["hook", "variant", *[c for c in core_columns if c in core_table]]].round(4)
            if len(shown.columns) > 2:
                core_text = (
                    "SAEBench core on the pruned model (the paper's Table 1: SAEBench's run_evals on evaluate's own test windows, "
                    f"so its clean cross-entropy is not the table above's):\n{shown.to_string(index=False)}\n\n"
                )
            others = [c for suite in suites if suite != "core" for c in evaluate.HEADLINES.get(suite, ()) if c in core_table]
            # SCR's and TPP's headline k (10, 50) where the file's k list has them, else its own smallest and largest k
            ks = exp.evaluation.scr_tpp_n_values
            others += [
                name
                for suite, name_at in (("scr", "scr.scr_metric_threshold_{}"), ("tpp", "tpp.tpp_threshold_{}_total_metric"))
                if not any(c.startswith(f"{suite}.") for c in others)
                for name in dict.fromkeys(name_at.format(k) for k in (min(ks), max(ks)))
                if name in core_table
            ]
            if others:  # under the metrics' own names, as MLflow's search and evaluation.csv know them
                shown = core_table[["hook", "variant", *others]].round(4).fillna("—")
                core_text += f"SAEBench's other suites on the pruned model:\n{shown.to_string(index=False)}\n\n"
            for suite in suites:  # one line per reason, not a column of cut-off reasons
                reasons = core_table.get(f"{suite}.not_applicable", pd.Series(dtype=object)).dropna()
                for reason, hooks in core_table.loc[reasons.index].groupby(reasons)["hook"]:
                    core_text += f"{suite}: not applicable at {', '.join(sorted(set(hooks)))}: {reason}\n"
            core_text += "\n" if "not applicable at" in core_text else ""
        click.echo(
            f"\n{exp.name}: {exp.model} pruned with {exp.llm_pruning.method} to sparsity {llm['sparsity_actual']:.3f}: "
            f"held-out cross-entropy {llm['ce_loss_dense']:.4f} (dense) -> {llm['ce_loss_pruned']:.4f} (pruned)\n\n"
            f"SAEs on the pruned model (test tokens: prune_sae's held-out windows; summary.csv):\n"
            f"{summary[columns].round(4).to_string(index=False)}\n\n"
            f"{core_text}"
            f"pipeline run {run.info.run_id} (summary.csv, evaluation.csv, compare/report.html); prune_llm run {prune_run}; "
            f"prune_sae runs {', '.join(sae_runs)}\n"
            f"tracking store: {mlflow.get_tracking_uri()} -- browse with `mlflow ui` and open http://127.0.0.1:5000"
        )


if __name__ == "__main__":
    main()
