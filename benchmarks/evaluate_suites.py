"""Every `evaluate` suite on a device: saecomp's core, sparse probing, SCR, TPP, absorption and RAVEL on the tiny
world's models with one random SAE, on the CPU and on ``--device``, side by side.

    python benchmarks/evaluate_suites.py --worlds W                    # W/tiny and W/tiny-gemma2: built worlds
    python benchmarks/evaluate_suites.py --worlds W --device cuda      # the CPU, then the GPU

Not a speed benchmark: CI has no GPU, so this is where the suites' own code (the traced probe tests and their
bootstraps, the shared model side written and read back, the core loop's per-sequence sums) meets CUDA tensors.
For each model, device and suite it records the seconds, whether the suite raised, whether every number is finite,
which kind of standard error each metric got and whether any fell back (``saecomp.<suite>.se_untraced`` or
``se_failed``, SCR's and TPP's ``padding_masked_failed``, core's ``density_skipped`` or ``jackknife_skipped``), and
whether a second SAE really read the model side the first one shared (its ``model_side`` tag) and got the first one's
numbers exactly. Across devices it records how far each metric moved (probes trained in another order of
floating-point sums do move) and whether any metric got another kind of standard error.
Exit status 1 where a suite failed, fell back, was not applicable where it should apply, read no shared side or one
that did not give its numbers back, or changed its kind of standard error with the device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import datasets
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<this>.py` finds `benchmarks`

from benchmarks.common import machine, write_json  # noqa: E402
from benchmarks.sae_memo import random_sae  # noqa: E402

SUITES = ("core", "sparse_probing", "scr", "tpp", "absorption", "ravel")
SHARED = ("sparse_probing", "scr", "tpp")  # the suites whose model side a second SAE reads (evaluate.SHARED_MODEL_SIDE)
NOT_APPLICABLE_HERE = {
    ("tiny", "absorption"): "SAEBench's first-letter prompts run past the tiny models' 128-token context",
    ("tiny-gemma2", "absorption"): "SAEBench's first-letter prompts run past the tiny models' 128-token context",
    ("tiny", "ravel"): "RAVEL intervenes on Gemma-2 and GPT-NeoX layouts only",
}
"""The suites that cannot apply to these experiments (README.md): anything else not applicable is a failure."""
FELL_BACK_TAGS = (".se_untraced", ".se_failed", ".padding_masked_failed")
SKIPPED_UNCERTAINTY = ("density_skipped", "jackknife_skipped")  # core's bootstrap record, where part of it did not run


def run_model(experiment: str, world: Path, device: str, dtype: str, tmp: Path, library_log, suites=SUITES) -> dict:
    """Each suite once on ``device`` (twice for the shared ones: computing the model side, then reading it)."""
    from saecomp import evaluate
    from saecomp.config import load_experiment
    from saecomp.models import load_model
    from saecomp.saebench_data import write_offline_datasets

    exp = load_experiment(experiment)
    ev = exp.evaluation
    loaded = load_model(exp.model, world / exp.model, dtype, device=device)
    loaded.tl.cfg.model_name = f"{exp.model}-{device}"  # SAEBench keys its caches by model name
    hook = f"blocks.{exp.sae.layers[0]}.hook_resid_post"  # every suite applies there (absorption and RAVEL only there)
    width = exp.sae.d_sae or exp.sae.expansion_factor * loaded.tl.cfg.d_model
    # random TopK: it fires on a zero input, so SCR's and TPP's padding-masked twins run too
    sae = random_sae(loaded.tl.cfg.d_model, width, "topk", "none", device, k=exp.sae.k)
    sae.cfg.metadata.hook_name = hook
    largest_train = max(ev.sparse_probing_train_size, ev.scr_tpp_train_size)
    largest_test = max(ev.sparse_probing_test_size, ev.scr_tpp_test_size)
    write_offline_datasets(exp.world_config().corpus, tmp / "data", largest_train // 4, largest_test // 4)
    out = {}
    for suite in suites:
        row: dict = {}
        started = time.perf_counter()
        try:
            # SAEBench prints a line per probe (thousands): into the library log, as the evaluate step does
            print(f"=== {experiment}: {suite} on {device}", file=library_log, flush=True)
            with contextlib.redirect_stdout(library_log), contextlib.redirect_stderr(library_log):
                results = run_suite(suite, exp, world, loaded, sae, device, dtype, tmp, row)
        except evaluate.NotApplicable as reason:
            out[suite] = {"not_applicable": str(reason)}
            print(f"  {suite}: not applicable ({reason})")
            continue
        except Exception as error:  # one suite's failure is a finding; the others still run
            out[suite] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
            print(f"  {suite}: FAILED {type(error).__name__}: {str(error)[:300]}")
            continue
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        metrics, tags = results[0].metrics, results[0].tags
        errors = {m: v for m, v in metrics.items() if m.rsplit(".", 1)[-1].endswith("_se")}
        kinds: dict[str, int] = {}
        for m in errors:
            kinds[m.rsplit(".", 1)[-1]] = kinds.get(m.rsplit(".", 1)[-1], 0) + 1
        # either SAE's fallbacks (the second one's named as such)
        fell_back = {t: v for t, v in tags.items() if t.endswith(FELL_BACK_TAGS)}
        if len(results) == 2:
            fell_back.update({f"second SAE: {t}": v for t, v in results[1].tags.items() if t.endswith(FELL_BACK_TAGS)})
        fell_back.update({f"uncertainty.{k}": v for k, v in (results[0].uncertainty or {}).items() if k in SKIPPED_UNCERTAINTY})
        row.update(
            seconds=time.perf_counter() - started,
            metrics=metrics,
            tags=tags,
            standard_error_kinds=kinds,
            fell_back=fell_back,
            all_finite=all(math.isfinite(v) for v in metrics.values()),
        )
        if len(results) == 2:
            origins = [r.tags.get(f"saecomp.{suite}.model_side", "") for r in results]
            row["side_origins"] = origins
            # the first shared its side and the second loaded that one: two computations would agree without proving anything
            row["side_read_back"] = side_loaded(*origins)
            row["side_read_back_exactly"] = row["side_read_back"] and results[1].metrics == metrics
            row["side_read_back_differences"] = sorted(m for m in metrics if results[1].metrics.get(m) != metrics[m])
        out[suite] = row
        print(
            f"  {suite}: {row['seconds']:.1f} s, {len(metrics)} metrics, finite: {row['all_finite']}; standard errors: "
            + (", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none")
            + (f"; FELL BACK: {fell_back}" if fell_back else "")
            + (f"; shared side read back exactly: {row['side_read_back_exactly']}" if "side_read_back_exactly" in row else "")
        )
    return out


def side_loaded(first: str, second: str) -> bool:
    """Whether the second SAE's ``model_side`` tag says it loaded the folder the first one's says it shared."""
    shared, loaded = "computed by this run and shared in ", "loaded from "
    if not first.startswith(shared) or not second.startswith(loaded):
        return False
    return second.removeprefix(loaded).split(" (", 1)[0] == first.removeprefix(shared)


def run_suite(suite: str, exp, world: Path, loaded, sae, device: str, dtype: str, tmp: Path, row: dict) -> list:
    """``suite``'s results as the evaluate step computes them (entrypoints/evaluate.py): one, or for a suite sharing
    its model side, the first SAE's (computing the side) and a second's (reading it)."""
    from saecomp import evaluate
    from saecomp.data import document_plan, held_out_windows, iter_documents, model_prepends_bos, special_token_ids
    from saecomp.saebench_data import offline_datasets, write_ravel_files

    ev = exp.evaluation
    if suite == "core":
        context = min(ev.context_size or loaded.tl.cfg.n_ctx, loaded.tl.cfg.n_ctx)
        bos = model_prepends_bos(loaded.architecture, loaded.tokenizer)
        plan = document_plan(exp)
        tokens, documents = held_out_windows(iter_documents(plan["test"], world), loaded.tokenizer, ev.n_sequences, context, bos, "test")
        sizes = evaluate.CoreSizes(ev.batch_size_prompts, ev.n_reconstruction_batches, ev.n_sparsity_variance_batches)
        special = special_token_ids(loaded.tokenizer)
        return [evaluate.run_core(loaded.tl, sae, tokens, special, sizes, loaded.tl.cfg.model_name, documents=documents)]
    if suite == "ravel":
        counts = write_ravel_files(exp.world_config().corpus, tmp / "ravel")
        config = evaluate.ravel_config(ev, str(world / exp.model), dtype, tmp / "ravel", tiny=True)
        row["ravel_files"] = counts
        hf = loaded.hf.to(device)
        try:
            return [evaluate.run_ravel(hf, sae, config, tmp / "ravel" / "out", "random", loaded.tl.cfg.model_name)]
        finally:
            loaded.hf.to("cpu")
    config = evaluate.saebench_config(suite, ev, loaded.tl.cfg.model_name, dtype, loaded.tl, tiny=True)
    shared = tmp / "shared" if suite in SHARED else None
    with offline_datasets(tmp / "data" / "hf_datasets"):
        return [
            evaluate.run_suite(suite, loaded.tl, sae, config, tmp / suite / name, name, shared=shared)
            for name in (("computing", "reading") if shared else ("computing",))
        ]


def problems(name: str, by_device: dict) -> list[str]:
    """What went wrong in one experiment's runs on each device (empty: every suite that applies ran as it should)."""
    found = []
    for device, rows in by_device.items():
        for suite, row in rows.items():
            where = f"{name} {suite} on {device}"
            if "error" in row:
                found.append(f"{where}: failed ({row['error'][:200]})")
            elif "not_applicable" in row and (name, suite) not in NOT_APPLICABLE_HERE:
                found.append(f"{where}: not applicable, where it should apply ({row['not_applicable'][:200]})")
            elif "not_applicable" not in row:
                if row.get("fell_back"):
                    found.append(f"{where}: fell back ({', '.join(row['fell_back'])})")
                if row.get("all_finite") is False:
                    found.append(f"{where}: a number is not finite")
                if suite in SHARED and not row.get("side_read_back"):
                    found.append(f"{where}: the second SAE did not load the shared side ({row.get('side_origins')})")
                elif suite in SHARED and not row.get("side_read_back_exactly"):
                    found.append(f"{where}: the shared side gave other numbers ({row.get('side_read_back_differences')})")
    return found


def _standard_error_kinds(metrics: dict) -> dict[str, str]:
    """metric -> the kind of its standard error (``core.mse.bootstrap_se`` -> core.mse: bootstrap_se)."""
    split = (m.rsplit(".", 1) for m in metrics)
    return {pair[0]: pair[1] for pair in split if len(pair) == 2 and pair[1].endswith("_se")}


def compare(first: dict, second: dict) -> dict:
    """Per suite: the largest absolute difference between two devices' numbers, and where; and the metrics whose kind
    of standard error differs (a fallback on one device)."""
    moved = {}
    for suite, row in first.items():
        other = second.get(suite, {})
        if "metrics" not in row or "metrics" not in other:
            continue
        common = [m for m in row["metrics"] if m in other["metrics"] and not m.endswith("seconds")]
        diffs = {m: abs(row["metrics"][m] - other["metrics"][m]) for m in common}
        worst = max(diffs, key=diffs.get) if diffs else None
        kinds = [_standard_error_kinds(r["metrics"]) for r in (row, other)]
        other_kinds = sorted(m for m in kinds[0].keys() | kinds[1].keys() if kinds[0].get(m) != kinds[1].get(m))
        moved[suite] = {"metrics": len(common), "identical": sum(d == 0 for d in diffs.values()), "largest": worst,
                        "largest_difference": diffs.get(worst), "differences": diffs,
                        "other_standard_error_kinds": other_kinds}  # fmt: skip
    return moved


def compare_with(entry: dict, device: str, reference: dict | None, name: str) -> list[str]:
    """Into ``entry`` (one model's record): its CPU run against ``device``'s, and the reference run's CPU against it;
    returned: the metrics whose kind of standard error changed between them."""
    by_device = entry["by_device"]
    pairs = []
    if "cpu" in by_device and device != "cpu" and device in by_device:
        pairs.append(("cpu", by_device["cpu"], device, by_device[device]))
    if reference and "cpu" in reference["models"].get(name, {}).get("by_device", {}) and device in by_device:
        where = f"cpu of the reference run ({reference['machine']['date']}, {reference['machine']['cpu_cores']} cores)"
        pairs.append((where, reference["models"][name]["by_device"]["cpu"], device, by_device[device]))
    found = []
    for first_name, first, second_name, second in pairs:
        entry[f"{first_name} vs {second_name}"] = moved = compare(first, second)
        for suite, m in moved.items():
            print(f"  {name} {suite}, {first_name} vs {second_name}: {m['identical']} of {m['metrics']} metrics identical; "
                  f"largest difference {m['largest_difference']:.3g} ({m['largest']})")  # fmt: skip
            if m["other_standard_error_kinds"]:
                found.append(f"{name} {suite}: another kind of standard error on {first_name} than on {second_name} for "
                             f"{', '.join(m['other_standard_error_kinds'][:5])}")  # fmt: skip
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=Path, help="a folder with a built world per experiment (tiny/, tiny-gemma2/)")
    parser.add_argument("--experiments", nargs="+", default=["tiny", "tiny-gemma2"])
    parser.add_argument("--device", default="cpu", help="compared with the CPU (cpu: the CPU alone)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES))
    parser.add_argument("--no-cpu", action="store_true", help="the device alone (with --reference: compared with that run's CPU)")
    parser.add_argument("--reference", type=Path, help="an earlier run's JSON whose CPU numbers to compare with")
    parser.add_argument("--compare-only", type=Path, help="no run: compare this earlier run's JSON with --reference's CPU, into it")
    parser.add_argument("--library-log", type=Path, help="where SAEBench's own output goes (default: a temporary file)")
    parser.add_argument("--json")
    args = parser.parse_args()
    reference = json.loads(args.reference.read_text()) if args.reference else None
    if args.compare_only:
        record = json.loads(args.compare_only.read_text())
        found = []
        for name, entry in record["models"].items():
            found += compare_with(entry, record["devices"][-1], reference, name)
        write_json(args.compare_only, {**record, "problems": record.get("problems", []) + found})
        print("\n".join(found) or "the same kinds of standard error on both devices")
        sys.exit(1 if found else 0)
    if args.worlds is None:
        parser.error("--worlds is needed to run the suites")
    datasets.logging.set_verbosity_error()  # its offline-cache notices, per dataset and load
    devices = [args.device] if args.no_cpu or args.device == "cpu" else ["cpu", args.device]
    record: dict = {"machine": machine(), "dtype": args.dtype, "devices": devices, "models": {}}
    found: list[str] = []
    with contextlib.ExitStack() as stack:
        if args.library_log:
            library_log = stack.enter_context(args.library_log.open("w"))
        else:
            library_log = stack.enter_context(tempfile.TemporaryFile("w+"))
        for name in args.experiments:
            by_device = {}
            for device in devices:
                print(f"== {name} on {device} ({args.dtype})", flush=True)
                with tempfile.TemporaryDirectory() as tmp:
                    world = args.worlds / name
                    experiment = f"experiments/{name}.yaml"
                    by_device[device] = run_model(experiment, world, device, args.dtype, Path(tmp), library_log, args.suites)
            record["models"][name] = entry = {"by_device": by_device}
            found += problems(name, by_device) + compare_with(entry, devices[-1], reference, name)
            # after every model: a run stopped by its limit keeps what it did
            write_json(args.json, {**record, "problems": found, "all_ok": not found})
    skipped = sorted({f"{name} {suite} ({why})" for (name, suite), why in NOT_APPLICABLE_HERE.items() if name in args.experiments
                      and suite in args.suites})  # fmt: skip
    if found:
        print("PROBLEMS:\n  " + "\n  ".join(found))
    else:
        print("every suite that applies ran, finite, traced, without fallbacks, its shared side loaded and read back exactly, "
              f"the same kinds of standard error on every device; not applicable, as expected: {'; '.join(skipped) or 'none'}")  # fmt: skip
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
