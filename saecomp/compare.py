"""The paper's tables and figures, built from finished runs of the tracking store (and nothing else).

Input: ``RunRecord``s (``tracking.collect_runs`` reads them from the store) and, for the figures, the prune_sae runs'
sweep tables. Every number in a table is one cell of ``cells()``: a (table, model, hook, metric, variant) with its
value, its status (``ok``, ``missing``, ``not applicable`` or ``not a number``) and the run it comes from. A cell no run fills stays
missing; nothing is filled in. Where several finished runs fill one cell, the newest wins and the cell says how many
there were.

Tables (SAEBench metric names; each per model, rows hook x metric, columns the SAE variants):

- ``table1``: the paper's Table 1, SAEBench core's reconstruction metrics;
- ``core``: the appendix's other core metrics (and our centred explained variance beside SAEBench's);
- ``absorption``, ``scr`` and ``tpp`` per number of latents k, ``sparse_probing`` top-k, ``ravel`` and
  ``ravel_attributes`` (per entity class and cause attribute);
- ``llm_pruning``: dense against pruned cross-entropy per pruned model (prune_llm runs);
- for Gemma-2-2B at layer 12, ``<table>_vs_paper`` for every table the paper also prints (Table 1 and the appendix's
  Tables 4-13 and sparse-probing table): ours beside the paper's published number and the difference
  (``saecomp/paper/``, ``paper_numbers``).

Uncertainties: a cell carries the standard error its run logged beside the value (``SE_KINDS``): core's
``<metric>.bootstrap_se`` (its spliced losses and scores, reconstruction and sparsity means, explained variances: a
bootstrap over the test documents, every window cut from a drawn text, ``evaluate.core_bootstrap``), SCR's and TPP's
``<metric>.bootstrap_se`` (a bootstrap of the texts their probes were tested on, through SAEBench's scoring,
``evaluate.scr_tpp_uncertainty``; where the tests could not be traced, and in older runs, ``binomial_se``, a
conservative parametric one), sparse probing's ``<metric>.bootstrap_se`` (a bootstrap of the texts its probes were
tested on, ``evaluate.sparse_probing_bootstrap``; untraced and older runs: ``binomial_se``, in closed form,
``evaluate.sparse_probing_uncertainty``), RAVEL's ``<metric>.cluster_se`` (dyadic-robust over the entities its
validation pairs share, ``evaluate.ravel_standard_errors``; untraced and older runs: ``binomial_se`` over the pairs,
``evaluate.ravel_uncertainty``), and absorption's ``<metric>.word_se`` (its means over words,
``evaluate.absorption_uncertainty``), and core's ``frac_alive.jackknife_se`` (a delete-one jackknife over the test
documents, ``evaluate.frac_alive_jackknife``; older runs resampled core's windows one by one, ``CORE_BY_WINDOW``).
The cell's ``se_kind`` says which.
A variant whose value differs from the pretrained SAE's in its row by no more than the standard error of that
difference is marked ``≈``: not a finding. That standard error is paired where both runs logged their replicates over
the same resamples of the same test documents or texts (the differences replicate by replicate; for SCR's and TPP's
parametric draws over the same draws of the clean accuracies, which every SAE on one model shares; for frac_alive's
jackknife deletion by deletion), else sqrt(se_a^2 + se_b^2).
Where runs with different ``evaluation.seed`` fill one cell of a suite that reads the seed (``SEEDED_SUITES``), the
cell is their mean (the newest run per seed) with the standard error over seeds, and it names every run. Core's
summaries of the per-latent densities (``freq_over_1_percent``, ...) carry the same bootstrap, rougher for shares of
latents over a threshold; ``frac_alive`` carries the jackknife, conservative where a bootstrap runs low (older runs'
bootstrap is read as logged). RAVEL's entities
kept carry none; the numbers computed from the SAE's weights alone (``FROM_WEIGHTS``)
have no sampling error, and their cells say so.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from saecomp.config import ACCELERATOR_TAG, SEEDED_SUITES

VARIANTS = ("pretrained", "pruned25", "pruned50", "trained")
"""The paper's four SAE variants, in its column order; other variants (a selected level) follow them."""

SE_KINDS = {
    "bootstrap_se": "bootstrap over test documents",
    "jackknife_se": "delete-one jackknife over test documents (conservative)",
    "cluster_se": "dyadic-robust over the entities RAVEL's validation pairs share",
    "binomial_se": "binomial over test texts or pairs",
    "word_se": "over the words tested",
}
"""The standard errors evaluate logs as ``<suite>.<metric>.<kind>``, and what each is over."""
SE_KINDS_OF_SUITE = {
    ("scr", "bootstrap_se"): "bootstrap over test texts",
    ("tpp", "bootstrap_se"): "bootstrap over test texts",
    ("scr", "binomial_se"): "binomial draws per accuracy over test texts (conservative; tests not traced)",
    ("tpp", "binomial_se"): "binomial draws per accuracy over test texts (conservative; tests not traced)",
    ("sparse_probing", "bootstrap_se"): "bootstrap over test texts",
    ("sparse_probing", "binomial_se"): "binomial over the test texts of each class (tests not traced)",
}
"""Where a suite's standard error of one kind is over something else than ``SE_KINDS`` says."""
CORE_BY_WINDOW = {
    "bootstrap_se": "bootstrap over test windows (an older run: windows of one text drawn apart, so too small)",
    "jackknife_se": "delete-one jackknife over test windows (an older run: windows of one text deleted apart)",
}
"""Core's errors in runs from before it resampled documents (their ``uncertainty/core.json`` says ``unit: sequence``)."""


RAVEL_OWN_SHARES = ("fact_accuracy", "residual_patch_cause")
"""RAVEL metrics of ours that are shares of independent draws (prompts, swapped pairs): binomial is their right error."""


def _se_kind(suite: str, se_kind: str | None, boot: dict, metric: str = "") -> str | None:
    """What a cell's standard error is over, in words (``SE_KINDS``)."""
    if suite == "core" and se_kind in CORE_BY_WINDOW and boot.get("unit") == "sequence":
        return CORE_BY_WINDOW[se_kind]
    if suite == "ravel" and se_kind == "binomial_se" and metric not in RAVEL_OWN_SHARES:  # SAEBench's scores, untraced
        return "binomial over validation pairs (too small: the pairs share entities; pairs not traced, or an older run)"
    return SE_KINDS_OF_SUITE.get((suite, se_kind), SE_KINDS.get(se_kind, se_kind))

SEED_SPREAD = "spread over seeds"
FROM_WEIGHTS = {"average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim"}
"""Core's numbers computed from the SAE's weights alone: no test text enters them, so no sampling error."""

HOOK_LABELS = {"attn.hook_z": "Attention", "hook_mlp_out": "MLP", "hook_resid_post": "Post Residual"}
"""The paper's names for the outputs an SAE reads."""


@dataclass(frozen=True)
class RunRecord:
    """What compare reads of one finished run."""

    run_id: str
    step: str
    name: str
    start_time: int  # ms since the epoch: the newest run fills a cell
    experiment_id: str = "0"
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    bootstrap: dict[str, dict] = field(default_factory=dict)  # suite -> its uncertainty/<suite>.json (replicates)


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    suite: str
    metrics: tuple[str, ...] = ()  # fixed rows; else ``pattern`` picks them from the runs' metric names
    pattern: str | None = None  # a regex on the metric name (after ``<suite>.``), its group the k


TABLES = (
    TableSpec(
        "table1",
        "Table 1: SAEBench core reconstruction metrics",
        "core",
        ("kl_div_score", "kl_div_with_sae", "ce_loss_score", "ce_loss_with_sae", "ce_loss_without_sae", "explained_variance", "mse",
         "cossim"),
    ),  # fmt: skip
    TableSpec(
        "core",
        "Core metrics (the appendix's Tables 6-8; explained_variance_centred is ours, SAEBench's explained_variance does not centre)",
        "core",
        ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae", "ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae",
         "ce_loss_without_sae", "explained_variance", "explained_variance_centred", "explained_variance_legacy", "mse", "cossim",
         "l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias", "l0", "l1", "freq_over_1_percent",
         "freq_over_10_percent", "normalized_freq_over_1_percent", "normalized_freq_over_10_percent",
         "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim", "frac_alive"),
    ),  # fmt: skip
    TableSpec(
        "absorption",
        "Feature absorption (Figure 2; the appendix's Tables 4-5)",
        "absorption",
        ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features", "std_dev_absorption_fraction_score",
         "std_dev_full_absorption_score", "std_dev_num_split_features"),
    ),  # fmt: skip
    TableSpec(
        "scr",
        "SCR per number of ablated latents k (Figure 3: scr_metric; the appendix's Tables 9-10 add both directions; "
        "rows ending _padding_masked are ours: SAEBench's ablation leaks into padded positions, README)",
        "scr",
        pattern=r"scr_(?:metric|dir1|dir2)_threshold_(\d+)(?:_padding_masked)?",
    ),
    TableSpec(
        "tpp",
        "TPP per number of ablated latents k (Figure 4: total_metric; the appendix's Tables 11-12 add its two parts; "
        "rows ending _padding_masked are ours: SAEBench's ablation leaks into padded positions, README)",
        "tpp",
        pattern=r"tpp_threshold_(\d+)_(?:total_metric|intended_diff_only|unintended_diff_only)(?:_padding_masked)?",
    ),
    TableSpec(
        "sparse_probing",
        "Sparse probing: test accuracy of the model's and the SAE's top-k latents' probes",
        "sparse_probing",
        pattern=r"((?:llm|sae)(?:_top_\d+)?_test_accuracy)",
    ),
    TableSpec(
        "ravel",
        "RAVEL (SAEBench's scores; residual_patch_cause, fact_accuracy and n_entities_kept are ours)",
        "ravel",
        ("disentanglement_score", "cause_score", "isolation_score", "residual_patch_cause", "fact_accuracy", "n_entities_kept"),
    ),
    TableSpec(
        "ravel_attributes",
        "RAVEL per entity class and cause attribute (SAEBench's per-attribute scores; the RAVEL table's are their means)",
        "ravel",
        pattern=r"([^.]+\.[^.]+\.(?:disentanglement|cause|isolation)_score)",
    ),
)


EVERY_METRIC = "(every metric)"
"""The one row of a table whose rows come from the runs' metric names (``TableSpec.pattern``) when none of its runs
has a number, only a not-applicable reason: the cells then say why rather than the table vanishing."""


def hook_of(record: RunRecord) -> str:
    return f"blocks.{record.tags.get('layer', '?')}.{record.tags.get('hook', '?')}"


def hook_order(hook: str):
    """Sort key of ``blocks.<layer>.<hook>``: by layer as a number (10 after 2), then by hook."""
    layer = hook.split(".")[1] if hook.count(".") >= 2 else ""
    return (int(layer) if layer.isdigit() else -1, hook)


def model_of(record: RunRecord) -> str:
    """The model an evaluate or prune_sae run measured: ``<base>+prune_llm:<run id>`` (or the dense base's name)."""
    if "base_model" in record.params and record.step == "evaluate":
        return record.params["base_model"]
    pruned = record.params.get("pruned_model_run") or record.tags.get("pruned_model_run")
    base = record.params.get("model", record.params.get("base_model", "?"))
    return f"{base}+prune_llm:{pruned}" if pruned and pruned not in ("none (dense)",) else base


def _variant_order(variants: Iterable[str]) -> list[str]:
    variants = set(variants)
    beside_paper = [v.rpartition(": ") for v in variants]  # <table>_vs_paper: "<variant>: ours | paper | ours - paper"
    if variants and all(sep and column in PAPER_COLUMNS for _, sep, column in beside_paper):  # (a variant may hold ": " too)
        bases = _variant_order({base for base, _, _ in beside_paper})
        return [f"{b}: {c}" for b in bases for c in PAPER_COLUMNS if f"{b}: {c}" in variants]
    rest = sorted(variants - set(VARIANTS), key=lambda v: (not v.startswith("pruned"), v))
    return [v for v in VARIANTS if v in variants] + rest


def _k_sort(metric: str):
    """Rows of one kind together, k ascending: by the name without its numbers, then by every number in it
    (``scr_dir1_threshold_5`` -> (1, 5), so all of dir1 by k, then all of dir2)."""
    return (re.sub(r"\d+", "", metric), tuple(int(n) for n in re.findall(r"\d+", metric)))


def cells(records: Iterable[RunRecord], variants: Iterable[str] | None = None) -> pd.DataFrame:
    """Every cell of every table, one row each: table, model, hook, metric, variant, value, status, run_id,
    run_name, candidates (finished runs that filled it), note. Expected cells are the tables' metrics for every
    (model, hook) an evaluate run covers, for the paper's four variants and any other variant a run there has (a
    selected level), or for ``variants`` alone where the selection named them (``--tag variant=...``: the others were
    left out, not lost): what no run fills is a ``missing`` row, never a number. A cell is filled by the newest
    finished run that has its value; failing that, it is ``not applicable`` when the newest run asked for it says so."""
    expected = set(VARIANTS) if variants is None else set(variants)
    evaluations = [r for r in records if r.step == "evaluate"]
    rows = []
    for model in sorted({model_of(r) for r in evaluations}):
        on_model = [r for r in evaluations if model_of(r) == model]
        hooks = sorted({hook_of(r) for r in on_model}, key=hook_order)
        for spec in TABLES:
            asked = [r for r in on_model if spec.suite in r.params.get("suites", "").split(",")]
            if not asked:
                continue  # no run of this selection was asked for the suite: no table, rather than one of gaps
            metrics = list(spec.metrics)
            if spec.pattern:
                found = {m.split(".", 1)[1] for r in asked for m in r.metrics if m.startswith(f"{spec.suite}.")}
                metrics = sorted((m for m in found if re.fullmatch(spec.pattern, m)), key=_k_sort)
                if not metrics and any(f"saecomp.{spec.suite}.not_applicable" in r.tags for r in asked):
                    metrics = [EVERY_METRIC]  # no run has a number to name the rows: one row per cell says why
            for hook in hooks:
                here = {r.tags.get("variant", "unnamed") for r in on_model if hook_of(r) == hook}
                for variant in _variant_order(expected | (here if variants is None else set())):
                    asked_here = sorted(
                        (r for r in asked if hook_of(r) == hook and r.tags.get("variant", "unnamed") == variant),
                        key=lambda r: r.start_time,
                    )
                    for metric in metrics:
                        name = f"{spec.suite}.{metric}"
                        candidates = [r for r in asked_here if name in r.metrics]
                        newest = candidates[-1] if candidates else (asked_here[-1] if asked_here else None)
                        value = newest.metrics.get(name) if newest else None
                        se, se_kind = None, None
                        if value is not None:
                            se_kind = next((kind for kind in SE_KINDS if f"{name}.{kind}" in newest.metrics), None)
                            se = newest.metrics[f"{name}.{se_kind}"] if se_kind else None
                        boot = newest.bootstrap.get(spec.suite, {}) if se is not None else {}
                        not_applicable = newest.tags.get(f"saecomp.{spec.suite}.not_applicable") if newest else None
                        status = "ok" if value is not None else "not applicable" if not_applicable else "missing"
                        run_ids, run_names, note = (newest.run_id, newest.name, "") if newest and status != "missing" else ("", "", "")
                        if status == "ok" and not _finite(value):  # the run's own result, but no number to compare
                            status, se, note = NOT_A_NUMBER, None, f"the run logged {value} for it"
                        if status == "ok" and metric in FROM_WEIGHTS:
                            note = "from the SAE's weights alone: no sampling error"
                        seeds = _newest_per_seed(candidates) if spec.suite in SEEDED_SUITES else {}
                        unusable = [seed for seed, r in seeds.items() if not _finite(r.metrics[name])]
                        usable = {seed: r for seed, r in seeds.items() if seed not in unusable}
                        if len(seeds) > 1 and len(usable) > 1:  # several seeds fill the cell: their mean, and its error over seeds
                            values = pd.Series([r.metrics[name] for r in usable.values()], dtype=float)
                            value, se, boot = float(values.mean()), float(values.std() / len(values) ** 0.5), {}
                            se_kind, status = SEED_SPREAD, "ok"
                            run_ids = ",".join(r.run_id for r in usable.values())
                            run_names = " | ".join(r.name for r in usable.values())
                            note = f"mean over {len(usable)} seeds ({', '.join(usable)}) ± its standard error over seeds"
                            if unusable:  # pandas would skip them silently and divide by the wrong count
                                note += f"; seed {', '.join(unusable)} left out: its run logged no number (NaN)"
                        elif len(seeds) > 1 and len(usable) == 1:
                            (seed, only), = usable.items()
                            value, status, run_ids, run_names = only.metrics[name], "ok", only.run_id, only.name
                            se_kind = next((kind for kind in SE_KINDS if f"{name}.{kind}" in only.metrics), None)
                            se = only.metrics[f"{name}.{se_kind}"] if se_kind else None
                            boot = only.bootstrap.get(spec.suite, {}) if se is not None else {}
                            note = f"seed {seed} only: the runs with seed {', '.join(unusable)} logged no number (NaN)"
                        elif len(seeds) == 1 and spec.suite in SEEDED_SUITES:
                            asked_seeds = _newest_per_seed(asked_here, like=candidates[-1])
                            if len(asked_seeds) > 1:  # replicates ran, but only one seed's run has this number
                                others = ", ".join(s for s in asked_seeds if s not in seeds)
                                note = f"seed {next(iter(seeds))} only: the runs with seed {others} have no value for it"
                        if seeds:  # other seeds' runs that measured elsewhere: not averaged in, and the note says so
                            elsewhere = {}
                            for r in candidates:
                                seed = r.params.get("evaluation.seed", "42")
                                if seed not in seeds and _runtime(r) != _runtime(candidates[-1]):
                                    elsewhere.setdefault(_describe_runtime(_runtime(r)), set()).add(seed)
                            note = "; ".join(filter(None, [note] + [
                                f"seed {', '.join(sorted(s))} left out: evaluated on {where}, this cell on "
                                f"{_describe_runtime(_runtime(candidates[-1]))}" for where, s in elsewhere.items()]))  # fmt: skip
                        rows.append(
                            {
                                "table": spec.name,
                                "model": model,
                                "hook": hook,
                                "metric": metric,
                                "variant": variant,
                                "value": value,
                                "se": se,
                                "se_kind": _se_kind(spec.suite, se_kind, boot, metric),
                                "_replicates": boot.get("jackknife" if se_kind == "jackknife_se" else "samples", {}).get(metric),
                                "_resamples": (boot.get("sample_id"), se_kind, boot.get("seed"), boot.get("replicates"),
                                               boot.get("unit")),
                                "_runtime": _runtime(newest) if status == "ok" else None,
                                "status": status,
                                "run_id": run_ids,
                                "run_name": run_names,
                                "candidates": len(candidates),
                                "note": (not_applicable or "") if status == "not applicable" else note,
                            }
                        )
    _mark_within_uncertainty(rows)
    rows += _paper_cells(rows)
    rows += _llm_pruning_cells([r for r in records if r.step == "prune_llm"])
    columns = ["table", "model", "hook", "metric", "variant", "value", "se", "se_kind", "difference_se", "paired", "within_uncertainty",
               "status", "run_id", "run_name", "candidates", "note"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


NOT_A_NUMBER = "not a number"
"""A cell's status where its run logged NaN (or an infinity): the run's result, shown as such, never compared."""


def _newest_per_seed(candidates: list[RunRecord], like: RunRecord | None = None) -> dict[str, RunRecord]:
    """The newest of ``candidates`` (oldest first) per ``evaluation.seed``, by seed, among the runs that measured the
    same thing as ``like`` (default: the newest candidate): the same SAE and the same evaluation settings but the seed
    (a setting one of them did not log, its suite not asked, does not count). Runs from before the seed was logged
    used SAEBench's 42."""
    if not candidates:
        return {}

    def settings(run: RunRecord) -> dict[str, str]:
        return {k: v for k, v in run.params.items() if (k.startswith("evaluation.") or k == "sae") and k != "evaluation.seed"}

    reference = settings(like or candidates[-1])
    reference_runtime = _runtime(like or candidates[-1])
    newest = {}
    for run in candidates:
        own = settings(run)
        # the device, dtype and processor too, and strictly: numbers move with them (benchmarks/README.md), and a run
        # that did not record them may have run anywhere
        same_runtime = reference_runtime is not None and _runtime(run) == reference_runtime
        if same_runtime and all(own[k] == reference[k] for k in own.keys() & reference.keys()):
            newest[run.params.get("evaluation.seed", "42")] = run
    return dict(sorted(newest.items(), key=lambda item: (len(item[0]), item[0])))


RUNTIME_PARAMS = ("device", "dtype")
"""Where and in what precision a step computed (every step logs them): an evaluation's numbers move with them, in TPP
at many ablated latents by up to 5.0 of their standard errors between a CPU and a GPU, in RAVEL by up to 1.4
(benchmarks/README.md, 2026-11-28), and no standard error covers that."""


def _runtime(run: RunRecord) -> tuple[str, str, str] | None:
    """The run's kind of device, dtype and processor (``saecomp.accelerator``: "" where a run from before that tag did
    not record it), or None where it did not log its device and dtype (older runs): then nobody knows where it ran."""
    device, dtype = (run.params.get(name, "") for name in RUNTIME_PARAMS)
    if not device or not dtype:
        return None
    return device.split(":")[0], dtype, run.tags.get(ACCELERATOR_TAG, "")  # cuda:0 is cuda: the kind of device


def _describe_runtime(runtime: tuple[str, str, str] | None) -> str:
    if runtime is None:
        return "an unrecorded device"
    device, dtype, accelerator = runtime
    return f"{device}/{dtype} ({accelerator or 'processor not recorded'})"


REFERENCE_VARIANT = "pretrained"


def _mark_within_uncertainty(rows: list[dict]) -> None:
    """Per variant's cell, against the pretrained SAE's value in the same (table, model, hook, metric) row:
    ``difference_se``, the standard error of the difference, and ``within_uncertainty``, whether the difference is
    no larger than it (None where either cell has no standard error: nothing can be said).

    Where both runs logged their bootstrap replicates over the same resamples of the same test documents
    (``paired``), the standard error is that of the replicate-wise differences: both variants read the same texts,
    so most of each one's sampling error (which texts are hard) cancels in the difference. SCR's and TPP's bootstrap
    resamples the test texts the same way for every SAE on one model (``evaluate.scr_tpp_uncertainty``), so it pairs
    text by text too; their older parametric draws shared only the clean accuracies (the ablated ones independent,
    still conservative). A replicate that
    lacks the metric in either run (None: SCR's direction tied) is left out. frac_alive's jackknife pairs deletion by
    deletion where both runs deleted the same documents (`_jackknife_difference_se`). Otherwise it is the conservative
    sqrt(se_a^2 + se_b^2)."""
    reference = {(r["table"], r["model"], r["hook"], r["metric"]): r for r in rows if r["variant"] == REFERENCE_VARIANT}
    bootstrap = {id(r): (r.pop("_replicates", None), r.pop("_resamples", None)) for r in rows}
    runtimes = {id(r): r.pop("_runtime", None) for r in rows}
    for row in rows:
        row.update(difference_se=None, paired=None, within_uncertainty=None)
        ref = reference.get((row["table"], row["model"], row["hook"], row["metric"]))
        if row["variant"] == REFERENCE_VARIANT or ref is None or not _finite(row["se"]) or not _finite(ref["se"]):
            continue  # no standard error (or a NaN one): nothing can be said
        if row["status"] != "ok" or ref["status"] != "ok":
            continue  # a value that is no number (NaN) is no finding either way
        runtime, ref_runtime = runtimes[id(row)], runtimes[id(ref)]
        if runtime is None or runtime != ref_runtime:  # the difference may hold what the device moved: no error covers it
            row["note"] = "; ".join(filter(None, [row["note"], (
                f"evaluated on {_describe_runtime(runtime)}, the {REFERENCE_VARIANT} SAE on {_describe_runtime(ref_runtime)}: the "
                "standard errors cover the test texts, not what the device, dtype or processor moves, so the difference is not marked"
            )]))  # fmt: skip
            continue
        (replicates, resamples), (ref_replicates, ref_resamples) = bootstrap[id(row)], bootstrap[id(ref)]
        same_resamples = resamples is not None and resamples[0] is not None and resamples == ref_resamples
        jackknives = isinstance(replicates, dict) and isinstance(ref_replicates, dict)  # frac_alive's
        n = _jackknife_units(replicates) if jackknives else 0
        jackknives = jackknives and n > 1 and n == _jackknife_units(ref_replicates) and replicates.get("unit") == ref_replicates.get("unit")
        lists = isinstance(replicates, list) and isinstance(ref_replicates, list) and len(replicates) == len(ref_replicates)
        differences = (pd.Series(replicates, dtype=float) - pd.Series(ref_replicates, dtype=float)).dropna() if lists else None
        if same_resamples and jackknives:
            row.update(difference_se=_jackknife_difference_se(replicates, ref_replicates), paired=True)
        elif same_resamples and differences is not None and len(differences) > 1:
            row.update(difference_se=float(differences.std()), paired=True)
        else:
            row.update(difference_se=(row["se"] ** 2 + ref["se"] ** 2) ** 0.5, paired=False)
            same_kind = resamples and ref_resamples and resamples[1] == ref_resamples[1]  # (a traced and a parametric id differ anyway)
            other_units = same_kind and resamples[4:] != ref_resamples[4:]
            if other_units:  # the same texts, perhaps: but an older run resampled core's windows, a newer its documents
                row["note"] = "; ".join(filter(None, [row["note"], (
                    f"resampled other units than the {REFERENCE_VARIANT} SAE's run ({resamples[4]} against "
                    f"{ref_resamples[4]}; one is older): its error unpaired"
                )]))  # fmt: skip
            elif same_kind and None not in (resamples[0], ref_resamples[0]) and resamples[0] != ref_resamples[0]:
                # one table's variants should read the same text (a trained SAE whose windows open with BOS where the
                # pretrained one's do not reads other core windows): say so, not only pair less
                row["note"] = "; ".join(filter(None, [row["note"], (
                    f"read other test texts than the {REFERENCE_VARIANT} SAE (sample_id {resamples[0]} against "
                    f"{ref_resamples[0]}): the difference is partly the texts', and its error unpaired"
                )]))  # fmt: skip
        # SAEBench computes its numbers in float32: a difference within its rounding is no difference, even where the
        # error is 0 (a share that is 1 in every resample, SAEBench's own sum printing 0.99999994 or 1.0000001)
        rounding = FLOAT32_ROUNDING * max(abs(row["value"]), abs(ref["value"]))
        row["within_uncertainty"] = bool(abs(row["value"] - ref["value"]) <= row["difference_se"] + rounding)


FLOAT32_ROUNDING = 4 * 2.0**-23  # a few float32 ulps, relative


def _finite(value) -> bool:
    return value is not None and pd.notna(value) and abs(float(value)) != float("inf")


def _jackknife_units(record: dict) -> int:
    """How many units (documents; sequences in runs before documents) a frac_alive jackknife deleted in turn."""
    return int(record.get("n_units", record.get("n_sequences", 0)))


def _jackknife_difference_se(a: dict, b: dict) -> float:
    """The delete-one jackknife's standard error of the difference between two SAEs' frac_alive on the same units
    (`evaluate.frac_alive_jackknife`): deleting unit i moves each by its own latents alive through i alone."""
    import numpy as np

    n = _jackknife_units(a)
    moved = np.zeros(n)  # [n]: a's frac_alive without unit i minus b's, less their full-sample difference
    for record, sign in ((a, -1.0), (b, 1.0)):
        for unit, count in record["dies_without"].items():
            moved[int(unit)] += sign * count / record["d_sae"]
    return float(((n - 1) / n * ((moved - moved.mean()) ** 2).sum()) ** 0.5)


PAPER_FOLDER = Path(__file__).parent / "paper"
PAPER_TABLE1 = PAPER_FOLDER / "gemma-2-2b_table1.csv"
PAPER_APPENDIX = PAPER_FOLDER / "gemma-2-2b_appendix.csv"
PAPER_MODEL, PAPER_LAYER = "google/gemma-2-2b", 12
PAPER_COLUMNS = ("ours", "paper", "ours - paper")
PAPER_TABLES = {"Table 1": "table1", "Table 4": "absorption", "Table 5": "absorption", "Table 6": "core", "Table 7": "core",
                "Table 8": "core", "Table 9": "scr", "Table 10": "scr", "Table 11": "tpp", "Table 12": "tpp",
                "Table 13": "ravel_attributes", "A.7 sparse probing table": "sparse_probing"}  # fmt: skip
"""The paper's tables (Gemma-2-2B, layer 12) -> ours that hold the same numbers."""


def paper_table1() -> pd.DataFrame:
    """The paper's Table 1 (Gemma-2-2B, layer 12), as transcribed in ``saecomp/paper/``: output, metric, variant, value."""
    return pd.read_csv(PAPER_TABLE1, comment="#")


def paper_numbers() -> pd.DataFrame:
    """Every published number of the paper for Gemma-2-2B at layer 12 (``saecomp/paper/``): table (ours that holds it),
    paper_table (the paper's that prints it), output, metric (SAEBench's name), variant, value, source (the file)."""
    table1 = paper_table1().assign(paper_table="Table 1", source=PAPER_TABLE1.name)
    appendix = pd.read_csv(PAPER_APPENDIX, comment="#").assign(source=PAPER_APPENDIX.name)
    both = pd.concat([table1, appendix], ignore_index=True)
    return both.assign(table=both["paper_table"].map(PAPER_TABLES))


NOT_LIKE_FOR_LIKE = "not like-for-like with ours"
PAPER_CLEAN_CE_AGREEMENT = 0.01
"""Nats. The paper prints three decimals, and the columns of one output that read one model and the same tokens agree on
the clean cross-entropy to 0.001 (3.124 against 3.125 is its rounding); a column further off read something else."""


def paper_columns_on_another_model(paper: pd.DataFrame | None = None) -> dict[tuple[str, str, str], str]:
    """(paper table, output, variant) -> why its numbers are not like-for-like with ours: the paper's columns whose own
    clean cross-entropy (``ce_loss_without_sae``: the model alone, no SAE, the same for every variant of one output when
    they read the same model and tokens) is off its other columns'. In Table 1 and Table 7 the MLP's pretrained column
    reads 5.056 against 3.125, so the paper measured it on another model or other tokens (found by checking the
    transcription; the paper does not say)."""
    paper = paper_numbers() if paper is None else paper
    clean = paper[paper["metric"] == "ce_loss_without_sae"]
    off = {}
    for (table, output), column in clean.groupby(["paper_table", "output"]):
        typical = float(column["value"].median())
        agreeing = (column["value"] - typical).abs() <= PAPER_CLEAN_CE_AGREEMENT
        if agreeing.all():
            continue
        if agreeing.sum() * 2 > len(column):  # most columns agree: the others read something else
            for row in column[~agreeing].itertuples():
                off[(table, output, row.variant)] = (
                    f"the paper's own clean cross-entropy in this column is {row.value:g} against {typical:g} in its other "
                    f"columns: it measured this column on another model or other tokens, so its numbers here are {NOT_LIKE_FOR_LIKE}"
                )
        else:  # no majority: which column is the odd one is not known, so every one is said
            values = ", ".join(f"{row.variant} {row.value:g}" for row in column.itertuples())
            for row in column.itertuples():
                off[(table, output, row.variant)] = (
                    f"the paper's columns disagree on their own clean cross-entropy ({values}): they did not all read one "
                    f"model and the same tokens, so its numbers here may be {NOT_LIKE_FOR_LIKE}"
                )
    return off


def _paper_cells(rows: list[dict]) -> list[dict]:
    """``<table>_vs_paper``: for Gemma-2-2B, each of our cells at layer 12 that the paper also prints (Table 1 and the
    appendix's tables) beside the paper's published number and the difference, per variant. The paper's numbers come
    from its code (its WANDA and SAEBench deviations, which our ``wanda-seed`` reproduces); they print beside every
    Gemma-2-2B model we pruned, ``wanda`` and ``wanda-seed`` alike."""
    numbers = paper_numbers()
    paper = {(r.table, r.output, r.metric, r.variant): r for r in numbers.itertuples()}
    elsewhere = paper_columns_on_another_model(numbers)
    printed = {(table, output, metric) for table, output, metric, _ in paper}
    outputs = {f"blocks.{PAPER_LAYER}.{hook}": label for hook, label in HOOK_LABELS.items()}
    out = []
    for row in rows:
        pruned_gemma = row["model"].startswith(f"{PAPER_MODEL}+prune_llm:")  # not the dense model, not gemma-2-2b-it
        if not pruned_gemma or row["hook"] not in outputs or (row["table"], outputs[row["hook"]], row["metric"]) not in printed:
            continue
        published = paper.get((row["table"], outputs[row["hook"]], row["metric"], row["variant"]))
        theirs = None if published is None else published.value
        ours = row["value"] if row["status"] == "ok" else None
        values = {"ours": ours, "paper": theirs, "ours - paper": None if ours is None or theirs is None else ours - theirs}
        cited = f"the paper's {published.paper_table} (saecomp/paper/{published.source})" if published else ""
        for column, value in values.items():
            # ours and the difference come from our run (traced to it, with its notes and standard error); the paper's
            # number from its table
            source = {"run_id": "", "run_name": "", "candidates": 0} if column == "paper" else row
            note = {"ours": row["note"], "paper": cited, "ours - paper": f"ours minus {cited}" if value is not None else ""}[column]
            if column != "ours" and published is not None and (published.paper_table, published.output, published.variant) in elsewhere:
                note = "; ".join(filter(None, [note, elsewhere[(published.paper_table, published.output, published.variant)]]))
            se = row["se"] if column != "paper" and value is not None else None  # the paper prints no error: ours is the difference's
            ours_nan = column == "ours - paper" and row["status"] == NOT_A_NUMBER  # our run's NaN, not a gap
            traced = column == "ours" or value is not None or ours_nan
            within = None
            if column == "ours - paper" and value is not None and _finite(se):
                within = bool(abs(value) <= se + FLOAT32_ROUNDING * max(abs(ours), abs(theirs)))  # no finding, as ≈ says
            out.append(
                {
                    **row,
                    "table": f"{row['table']}_vs_paper",
                    "variant": f"{row['variant']}: {column}",
                    "value": value,
                    "se": se,
                    "se_kind": row["se_kind"] if se is not None else None,
                    "difference_se": se if column == "ours - paper" else None,
                    "paired": None,
                    "within_uncertainty": within,
                    "status": "ok" if value is not None else row["status"] if ours_nan or column == "ours" else "missing",
                    "run_id": source["run_id"] if traced else "",
                    "run_name": source["run_name"] if traced else "",
                    "candidates": source["candidates"] if traced else 0,
                    "note": note,
                }
            )
    return out


LLM_PRUNING_METRICS = ("ce_loss_dense", "ce_loss_pruned", "sparsity_actual")


PRUNED_MODEL_SETTINGS = ("llm_pruning.layers", "dtype", "data.", "calibration.", "held_out.")
"""What else makes one row of the LLM pruning table another (beside the base model, method and amount): the layers
pruned, the dtype, and every text and size setting of the calibration and the held-out CE (a name ending in "." is a
prefix); runs that differ in any are rows of their own, never one cell's candidates. ``calibration.batch_size`` changes
speed and memory only."""
SPEED_ONLY = ("calibration.batch_size",)


def _pruned_model_settings(params: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((name, value) for name, value in params.items() if name not in SPEED_ONLY and any(
        name == setting or (setting.endswith(".") and name.startswith(setting)) for setting in PRUNED_MODEL_SETTINGS)))  # fmt: skip


def _llm_pruning_cells(runs: list[RunRecord]) -> list[dict]:
    """The LLM pruning table: per pruned model (base model, method, exact amount and ``PRUNED_MODEL_SETTINGS``), dense
    against pruned held-out CE. A row is labelled by method and amount, and by the settings that tell it from another
    row with that label."""
    rows, groups = [], {}
    for run in sorted(runs, key=lambda r: r.start_time):
        p = run.params
        structured = p.get("nm") not in (None, "", "unstructured", "None")
        amount = p.get("nm") if structured else f"{float(p.get('sparsity', 'nan')) * 100:g}%"  # 33.3% and 33.4% stay apart
        groups.setdefault((p.get("model", "?"), p.get("method", "?"), amount, _pruned_model_settings(p)), []).append(run)
    labels = {}
    for model, method, amount, settings in groups:
        labels.setdefault((model, method, amount), []).append(dict(settings))
    for (model, method, amount, settings), group in sorted(groups.items()):
        alike, own = labels[(model, method, amount)], dict(settings)
        differing = sorted({name for other in alike for name in other.keys() | own.keys() if other.get(name) != own.get(name)})
        label = f"{method} {amount}" + "".join(f", {name}={own.get(name, '(not logged)')}" for name in differing)
        newest = group[-1]
        for metric in LLM_PRUNING_METRICS:
            value = newest.metrics.get(metric)
            rows.append(
                {
                    "table": "llm_pruning",
                    "model": model,
                    "hook": label,
                    "metric": metric,
                    "variant": "value",
                    "value": value,
                    "se": None,
                    "difference_se": None,
                    "paired": None,
                    "within_uncertainty": None,
                    "status": "missing" if value is None else "ok" if _finite(value) else NOT_A_NUMBER,
                    "run_id": newest.run_id,
                    "run_name": newest.name,
                    "candidates": len(group),
                    "note": "",
                }
            )
    return rows


def wide(table_cells: pd.DataFrame) -> pd.DataFrame:
    """One table's cells as the paper prints it: rows (hook, metric; for ``llm_pruning`` the pruning, metric), per
    variant its value, ``<variant>_se`` (the standard error, NaN where none) and ``<variant>_status`` (ok, missing,
    not applicable, not a number: the value is NaN for the last three, and this says which). Numbers stay numbers, so pandas
    reads the values back as floats."""
    variants = _variant_order(table_cells["variant"].unique())
    order = {key: i for i, key in enumerate(dict.fromkeys(zip(table_cells["hook"], table_cells["metric"], strict=True)))}
    parts = {}
    for column in ("value", "se", "status"):
        pivoted = table_cells.pivot_table(index=["hook", "metric"], columns="variant", values=column, aggfunc="first", dropna=False)
        parts[column] = pivoted.reindex(columns=variants)
    frame = pd.concat(
        {f"{v}{'' if column == 'value' else '_' + column}": parts[column][v] for v in variants for column in ("value", "se", "status")},
        axis=1,
    )
    frame = frame.reindex(sorted(frame.index, key=lambda k: order.get(k, len(order))))
    if table_cells["table"].iloc[0] == "llm_pruning":  # its rows are pruned models, not hooks (as the Markdown says)
        frame = frame.rename_axis(index=["pruning", "metric"])
    return frame


def _number(value: float) -> str:
    if value.is_integer() and abs(value) >= 1:
        return f"{value:.0f}"
    return f"{value:.4f}" if value == 0 or abs(value) >= 0.01 else f"{value:.3g}"


def _display(cell: pd.Series) -> str:
    """``value``, ``value ± se`` where a standard error exists, and `` ≈`` where the value is within uncertainty of
    the pretrained SAE's."""
    if cell["status"] == "ok":
        text = _number(float(cell["value"]))
        se = cell.get("se")
        if se is not None and pd.notna(se):
            text += f" ± {float(se):.2g}"
        if cell.get("within_uncertainty") is True:
            text += " ≈"
        return text
    return {"not applicable": "n/a", NOT_A_NUMBER: "NaN"}.get(cell["status"], "—")


LEGEND = (
    "— missing (no finished run fills the cell); n/a not applicable (the run's tag says why); NaN the run logged no number "
    "(not a number or infinite); ± one standard error, where "
    "computed: a bootstrap over the test documents for core (spliced losses and scores, reconstruction and sparsity means, "
    "explained variances, the per-latent densities' summaries but frac_alive), a delete-one jackknife over the test "
    "documents for frac_alive (conservative), a bootstrap over the test texts for SCR's and TPP's scores and sparse "
    "probing's accuracies (binomial where the tests could not be traced), dyadic-robust over the entities the "
    "validation pairs share for RAVEL's scores (binomial over the pairs where untraced), over the words tested for "
    "absorption's means and its count of split latents, the spread "
    "over seeds where replicates ran (cells.csv: se_kind); "
    "≈ differs from the pretrained SAE's value in its row by no more than the standard error of the difference (paired "
    "over the same resampled test documents or texts where both runs logged their replicates; cells.csv: difference_se, "
    "paired): not a finding; in a table beside the paper's, ≈ on ours - paper: the difference is within our standard "
    "error (the paper prints none)."
)


def display_grid(table_cells: pd.DataFrame) -> tuple[list[str], list[list[str]], list[list[pd.Series | None]]]:
    """(header, rows of display strings, the cell behind each value) for one table of one model."""
    variants = _variant_order(table_cells["variant"].unique())
    keys = list(dict.fromkeys(zip(table_cells["hook"], table_cells["metric"], strict=True)))
    index = {(c["hook"], c["metric"], c["variant"]): c for _, c in table_cells.iterrows()}
    header = ["pruning" if table_cells["table"].iloc[0] == "llm_pruning" else "hook", "metric", *variants]
    rows, sources = [], []
    for hook, metric in keys:
        found = [index.get((hook, metric, v)) for v in variants]
        rows.append([hook, metric, *[_display(c) if c is not None else "" for c in found]])  # "": no such variant here
        sources.append([None, None, *found])
    return header, rows, sources


def markdown(all_cells: pd.DataFrame) -> str:
    """Every table, per model, as Markdown: what compare prints and logs."""
    parts = []
    for (table, model), group in _groups(all_cells):
        header, rows, _ = display_grid(group)
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        # a paper column that read another model is said under the table, not only in the CSV's and the HTML's notes
        elsewhere = sorted({(hook, variant.split(": ")[0], note.split("; ")[-1]) for hook, variant, note
                            in zip(group["hook"], group["variant"], group["note"], strict=True) if NOT_LIKE_FOR_LIKE in note})  # fmt: skip
        lines += ["", *(f"Not like-for-like: the paper's {variant} column at {hook}: {why}." for hook, variant, why in elsewhere)]
        parts.append(f"### {title_of(table)}\n\non `{model}`\n\n" + "\n".join(lines).rstrip())
    return "\n\n".join(parts) + f"\n\n{LEGEND}\n"


LATEX_SPECIALS = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "^": r"\^{}", "~": r"\textasciitilde{}",
                  "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$"}  # fmt: skip


def _latex_escape(text: str) -> str:
    """``text`` as LaTeX prints it: a model path or a variant tag may hold any of LaTeX's special characters."""
    escaped = "".join(LATEX_SPECIALS.get(char, char) for char in str(text)).replace("—", "--")
    return escaped.replace("±", r"$\pm$").replace("≈", r"$\approx$")


def latex(all_cells: pd.DataFrame) -> str:
    """Every table, per model, as a LaTeX tabular (booktabs)."""
    parts = []
    for (table, model), group in _groups(all_cells):
        header, rows, _ = display_grid(group)
        spec = "ll" + "r" * (len(header) - 2)
        body = [" & ".join(_latex_escape(h) for h in header) + r" \\", r"\midrule"]
        body += [" & ".join(_latex_escape(c) for c in row) + r" \\" for row in rows]
        head = f"% {title_of(table)} -- on {model}\n\\begin{{tabular}}{{{spec}}}\n\\toprule\n"
        parts.append(head + "\n".join(body) + "\n\\bottomrule\n\\end{tabular}")
    return "\n\n".join(parts) + "\n"


def title_of(table: str) -> str:
    for spec in TABLES:
        if spec.name == table:
            return spec.title
    if table.endswith("_vs_paper"):
        ours = table.removesuffix("_vs_paper")
        papers = sorted({p for p, t in PAPER_TABLES.items() if t == ours}, key=lambda p: (len(p), p))
        return (f"{title_of(ours).split(' (')[0]} beside the paper's {' and '.join(papers)} (Gemma-2-2B, layer 12; the paper's "
                "numbers come from its own code)")  # fmt: skip
    titles = {"llm_pruning": "LLM pruning: held-out cross-entropy, dense against pruned"}
    return titles.get(table, table)


def _groups(all_cells: pd.DataFrame):
    order = [name for spec in TABLES for name in (spec.name, f"{spec.name}_vs_paper")] + ["llm_pruning"]
    keys = set(zip(all_cells["table"], all_cells["model"], strict=True))
    keys = sorted(keys, key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k[1]))
    for table, model in keys:
        yield (table, model), all_cells[(all_cells["table"] == table) & (all_cells["model"] == model)]


# --- figures ----------------------------------------------------------------------------------------------------


def _figure_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return buffer.getvalue()


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", model)


def figures(all_cells: pd.DataFrame, sweeps: dict[tuple[str, str], tuple[pd.DataFrame, dict[str, float]]]) -> dict[str, bytes]:
    """PNG figures by file name, per model (the model's name is in the file name when there are several).
    ``sweeps``: per (model, hook name), prune_sae's validation sweep (sparsity, mse) and the pretrained and trained
    SAEs' validation MSE on the same tokens (the levels drawn beside it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = all_cells[all_cells["table"].isin([s.name for s in TABLES])]
    models = sorted(set(evaluated["model"]) | {model for model, _ in sweeps})
    out = {}
    for model in models:
        suffix = f"__{_slug(model)}" if len(models) > 1 else ""
        mine = {hook: value for (m, hook), value in sweeps.items() if m == model}
        by_output = {}
        for hook, (sweep, _) in mine.items():
            by_output.setdefault(hook.split(".", 2)[2], {})[hook_order(hook)[0]] = sweep
        # Figure 1 at one layer per output (the first swept), as the paper draws it; every layer is in Figures 5-7.
        first = sorted((f"blocks.{min(layers)}.{name}" for name, layers in by_output.items()), key=hook_order)
        if first:
            figure, axes = plt.subplots(1, len(first), figsize=(4.2 * len(first), 3.4), squeeze=False, layout="constrained")
            for axis, hook in zip(axes[0], first, strict=True):
                sweep, levels = mine[hook]
                axis.plot(sweep["sparsity"], sweep["mse"], marker="o", label="pruned SAE")
                for variant, style, color in (("pretrained", "--", "grey"), ("trained", ":", "black")):
                    if variant in levels:
                        axis.axhline(levels[variant], linestyle=style, color=color, label=variant)
                axis.set(title=hook, xlabel="SAE sparsity", ylabel="MSE (validation tokens)")
                axis.legend(fontsize=7)
            figure.suptitle(f"Figure 1: reconstruction against SAE sparsity, on {model}")
            out[f"figure1_reconstruction{suffix}.png"] = _figure_bytes(figure)
        if any(len(layers) > 1 for layers in by_output.values()):  # Figures 5-7: one panel per output, a curve per layer
            figure, axes = plt.subplots(1, len(by_output), figsize=(4.2 * len(by_output), 3.4), squeeze=False, layout="constrained")
            for axis, (name, layers) in zip(axes[0], sorted(by_output.items()), strict=True):
                for layer, sweep in sorted(layers.items()):
                    axis.plot(sweep["sparsity"], sweep["mse"], marker=".", label=f"layer {layer}")
                axis.set(title=name, xlabel="SAE sparsity", ylabel="MSE (validation tokens)")
                axis.legend(fontsize=6)
            figure.suptitle(f"Figures 5-7: the sweep at every layer, on {model}")
            out[f"figures5-7_per_layer{suffix}.png"] = _figure_bytes(figure)
        ok = evaluated[(evaluated["status"] == "ok") & (evaluated["model"] == model)]
        absorption = ok[(ok["table"] == "absorption") & (ok["metric"] == "mean_absorption_fraction_score")]
        if len(absorption):  # Figure 2
            frame = absorption.pivot_table(index="hook", columns="variant", values="value", aggfunc="first")
            frame = frame.reindex(index=sorted(frame.index, key=hook_order), columns=_variant_order(frame.columns))
            axis = frame.plot.bar(figsize=(6, 3.4), rot=0)
            axis.set(ylabel="mean absorption fraction", title=f"Figure 2: absorption (lower is better), on {model}")
            out[f"figure2_absorption{suffix}.png"] = _figure_bytes(axis.figure)
        headlines = ((3, "scr", "SCR", r"scr_metric_threshold_\d+"), (4, "tpp", "TPP", r"tpp_threshold_\d+_total_metric"))
        for number, table, label, headline in headlines:
            rows = ok[(ok["table"] == table) & ok["metric"].str.fullmatch(headline)]
            if not len(rows):
                continue
            hooks = sorted(rows["hook"].unique(), key=hook_order)
            figure, axes = plt.subplots(1, len(hooks), figsize=(4.2 * len(hooks), 3.4), squeeze=False, layout="constrained")
            masked = ok[(ok["table"] == table) & ok["metric"].str.fullmatch(headline + "_padding_masked")]
            for axis, hook in zip(axes[0], hooks, strict=True):
                here, here_masked = rows[rows["hook"] == hook], masked[masked["hook"] == hook]
                for variant in _variant_order(here["variant"].unique()):
                    line = here[here["variant"] == variant]
                    ks = [int(re.findall(r"\d+", m)[0]) for m in line["metric"]]
                    (drawn,) = axis.plot(ks, line["value"], marker="o", label=variant)
                    twin = here_masked[here_masked["variant"] == variant]
                    if len(twin):  # ours beside SAEBench's, dashed in the same colour
                        ks = [int(re.findall(r"\d+", m)[0]) for m in twin["metric"]]
                        axis.plot(ks, twin["value"], ls="--", marker=".", color=drawn.get_color(), label=f"{variant}, padding masked")
                axis.set(xscale="log", title=hook, xlabel="latents ablated (k)", ylabel=label)
                axis.legend(fontsize=6, ncol=2 if len(here_masked) else 1)  # with the dashed twins: two columns
            figure.suptitle(f"Figure {number}: {label} against k, on {model}")
            out[f"figure{number}_{table}{suffix}.png"] = _figure_bytes(figure)
    return out


# --- the report -------------------------------------------------------------------------------------------------


def html_report(all_cells: pd.DataFrame, pngs: dict[str, bytes], title: str, provenance: list[str]) -> str:
    """One self-contained HTML page (tables, figures inlined): it opens in the MLflow UI's artifact viewer. Every
    value names its run in its tooltip and in the sources list; missing cells are marked."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0 24px}"
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}th{background:#f2f2f2}"
        "td.key{text-align:left}td.missing{background:#fde2e2;color:#a33}td.na{background:#eee;color:#777}"
        ".within{color:#888;background:#f4f4e0}"
        "img{max-width:100%;border:1px solid #ddd;margin:6px 0}code{font-size:12px}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Every value comes from one finished MLflow run: hover a cell for its run, or see the sources below. "
        "<span style='background:#fde2e2'>&nbsp;—&nbsp;</span> no finished run fills the cell; "
        "<span style='background:#eee'>&nbsp;n/a&nbsp;</span> not applicable (the run's tag says why). "
        "± is one standard error, where computed: a bootstrap over the test documents for core (spliced losses and scores, "
        "reconstruction and sparsity means and explained variances) and over the test texts for SCR's and TPP's scores and "
        "sparse probing's accuracies (binomial where the tests could not be traced), dyadic-robust "
        "over the entities the validation pairs share for RAVEL's scores, over the words tested for absorption's means, "
        "a delete-one jackknife for frac_alive, the spread over seeds where "
        "replicates ran (hover a cell for which); "
        "<span class='within'>&nbsp;≈&nbsp;</span> marks a value that differs from the "
        "pretrained SAE's in its row by no more than the standard error of the difference (paired over the same resampled "
        "test documents or texts where both runs logged their replicates): not a finding. RAVEL's entities kept carry none; "
        "core's numbers "
        "from the SAE's weights alone have no sampling error.</p>",
        "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in provenance) + "</ul>",
    ]
    for (table, model), group in _groups(all_cells):
        header, rows, sources = display_grid(group)
        parts.append(f"<h2>{html.escape(title_of(table))}</h2><p>on <code>{html.escape(model)}</code></p><table>")
        parts.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        for row, source in zip(rows, sources, strict=True):
            cells_html = []
            for text, cell in zip(row, source, strict=True):
                if cell is None:
                    cells_html.append(f"<td class='key'>{html.escape(text)}</td>")
                    continue
                css = {"ok": "", "missing": "missing", "not applicable": "na", NOT_A_NUMBER: "na"}[cell["status"]]
                css = "within" if cell.get("within_uncertainty") is True else css
                tip = f"run {cell['run_id']} · {cell['run_name']}" if cell["run_id"] else "no finished run"
                if cell["candidates"] > 1 and "," not in cell["run_id"]:
                    tip += f" (newest of {cell['candidates']})"
                if isinstance(cell.get("se_kind"), str) and pd.notna(cell.get("se")):
                    tip += f" · ± one standard error, {cell['se_kind']}"
                if cell["note"]:
                    tip += f" — {cell['note']}"
                cells_html.append(f"<td class='{css}' title='{html.escape(tip, quote=True)}'>{html.escape(text)}</td>")
            parts.append("<tr>" + "".join(cells_html) + "</tr>")
        parts.append("</table>")
    for name, png in pngs.items():
        inline = base64.b64encode(png).decode()
        parts.append(f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' src='data:image/png;base64,{inline}'>")
    named = all_cells[all_cells["run_id"] != ""]
    sources = {}
    for ids, names in zip(named["run_id"], named["run_name"], strict=True):  # a cell over seeds names each seed's run
        ids, names = ids.split(","), names.split(" | ")
        sources.update(zip(ids, names if len(names) == len(ids) else [" | ".join(names)] * len(ids), strict=True))
    parts.append("<h2>Sources</h2><table><tr><th>run</th><th>name</th></tr>")
    for run_id, run_name in sources.items():
        parts.append(f"<tr><td class='key'><code>{run_id}</code></td><td class='key'>{html.escape(run_name)}</td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


def write_report(all_cells: pd.DataFrame, pngs: dict[str, bytes], folder: Path, title: str, provenance: list[str]) -> list[Path]:
    """Markdown, LaTeX, CSV (every cell with its run; one wide table per table and model), PNG figures and the HTML
    report, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    (folder / "tables.md").write_text(f"# {title}\n\n" + markdown(all_cells))
    (folder / "tables.tex").write_text(latex(all_cells))
    all_cells.to_csv(folder / "cells.csv", index=False)
    written += [folder / "tables.md", folder / "tables.tex", folder / "cells.csv"]
    for (table, model), group in _groups(all_cells):
        path = folder / f"{table}__{_slug(model)}.csv"
        wide(group).to_csv(path)
        written.append(path)
    for name, png in pngs.items():
        (folder / name).write_bytes(png)
        written.append(folder / name)
    (folder / "report.html").write_text(html_report(all_cells, pngs, title, provenance))
    written.append(folder / "report.html")
    return written
