"""Every benchmark, one table: each row a figure, its goal (issue 11) and whether this machine meets it.

    python benchmarks/run_all.py                 # CPU rows here; GPU rows from a GPU here, else as recorded
    python benchmarks/run_all.py --quick         # tiny shapes only
    python benchmarks/run_all.py --pipeline      # and the tiny pipeline from a fresh clone, cold and cached

Each benchmark runs in its own process (so that one's memory never counts against another's) and writes
JSON under --out; this script reads those files. GPU rows are measured when a GPU is present; otherwise the
latest figures recorded on one (benchmarks/results/*h100*.json) are printed, named as recorded, never
estimated. Steps without a benchmark yet print as "not measured".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks import prune_llm  # noqa: E402

RECORDED = HERE / "results"


def run(module: str, args: list[str], out: Path) -> dict | None:
    """Run ``python -m benchmarks.<module> ... --json out``; its figures, or None if it failed."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    print(f"running benchmarks/{module}.py {' '.join(args)}", flush=True)
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args, "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode:
        print(done.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.read_text())


def not_measured(step: str, case: str, figure: str, goal: str, why: str) -> dict:
    return {"step": step, "case": case, "figure": figure, "value": None, "goal": goal, "met": None, "note": why}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes only")
    parser.add_argument("--pipeline", action="store_true", help="also the tiny pipeline cold and cached from a fresh clone (~20 min)")
    parser.add_argument("--out", default=str(ROOT / ".saecomp" / "benchmarks"), help="folder for each benchmark's JSON")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    # prune_llm: CPU shapes here.
    cpu_cases = [("tiny", ["--repeats", "5"])] + ([] if args.quick else [("gpt2-small", ["--repeats", "3"])])
    for shape, extra in cpu_cases:
        record = run("prune_llm", ["--shape", shape, "--sequences", "8", "--seq-len", "256", *extra], out / f"prune_llm_{shape}_cpu.json")
        rows += prune_llm.rows(record) if record else [not_measured("prune_llm", shape, "all", "", "benchmark failed")]
    # prune_llm: GPU shapes, measured here if there is a GPU, else as recorded on one.
    import torch

    gpu_cases = [("gpt2-small", "float32"), ("gemma-2-2b", "bfloat16")]
    for shape, dtype in gpu_cases:
        if torch.cuda.is_available() and not args.quick:
            record = run(
                "prune_llm",
                ["--shape", shape, "--device", "cuda", "--dtype", dtype, "--sequences", "128", "--seq-len", "1024", "--repeats", "3"],
                out / f"prune_llm_{shape}_gpu.json",
            )
            rows += prune_llm.rows(record) if record else []
            continue
        recorded = sorted(RECORDED.glob(f"prune_llm_{shape}_h100_b8.json"))
        if recorded:
            record = json.loads(recorded[-1].read_text())
            for row in prune_llm.rows(record):
                on = record["machine"]
                row["note"] = f"recorded {on['date']} on {on['gpu']}, torch {on['versions']['torch']} ({recorded[-1].name})"
                rows.append(row)
        else:
            rows.append(
                not_measured("prune_llm", f"{shape} {dtype} GPU 128x1024", "seconds on an H100", "", "no GPU here and none recorded")
            )

    # prune_sae sweep: against its floor and the seed code's way, at an early, a middle and a late layer.
    for shape in ["tiny"] + ([] if args.quick else ["gpt2-small"]):
        record = run("sae_sweep", ["--shape", shape, "--repeats", "1" if args.quick else "3"], out / f"sae_sweep_{shape}.json")
        if not record:
            rows.append(not_measured("prune_sae", shape, "sweep", "", "benchmark failed"))
            continue
        for r in record["layers"]:
            case = f"{shape} layer {r['layer']}/{record['n_layers']}"
            rows.append(
                {"step": "prune_sae", "case": case, "figure": "sweep / floor (activation pass + forward from the SAE block per level)",
                 "value": r["sweep_over_floor"], "goal": "<= 1.2", "met": r["sweep_over_floor"] <= 1.2}
            )  # fmt: skip
            rows.append(
                {"step": "prune_sae", "case": case, "figure": "speed-up over the seed code way (stats + whole model per level)",
                 "value": r["seed_way_over_sweep"], "goal": ">= 4", "met": r["seed_way_over_sweep"] >= 4}
            )  # fmt: skip
    # prune_sae sweep on a GPU: the recorded runs (a GPU run takes longer than a device lease allows alongside the rest;
    # `benchmarks/gpu_checks.sh sweep` and `sae_sweep.py --device cuda` measure it).
    sweep_rows = []
    for recorded in sorted(RECORDED.glob("sae_sweep_*_h[0-9]*_layer*.json")):
        record = json.loads(recorded.read_text())
        on = record["machine"]
        note = f"recorded {on['date']} on {on['gpu']}, torch {on['versions']['torch']} ({recorded.name})"
        for r in record["layers"]:
            case = f"{record['shape']} {record['dtype']} GPU layer {r['layer']}/{record['n_layers']}"
            figures = [("sweep / floor", r["sweep_over_floor"], "<= 1.2", r["sweep_over_floor"] <= 1.2)]
            if r.get("seed_way_over_sweep") is not None:  # None: a run with --no-baselines, the sweep and its floor only
                figures.append(("speed-up over the seed code way", r["seed_way_over_sweep"], ">= 4", r["seed_way_over_sweep"] >= 4))
            for figure, value, goal, met in figures:
                row = {"step": "prune_sae", "case": case, "figure": figure, "value": value, "goal": goal, "met": met, "note": note}
                sweep_rows.append((on["date"], recorded.name, row))
    # an older recording of a case measured older code (often on another card): every figure of it is shown, marked
    # superseded, and not counted for the goal, also one the newer recording did not measure (--no-baselines)
    newest = {}
    for date, name, row in sorted(sweep_rows, key=lambda item: item[:2]):
        newest[row["case"]] = (date, name)
    for date, name, row in sweep_rows:
        latest = newest[row["case"]]
        if (date, name) != latest:
            verdict = "met" if row["met"] else "not met"
            row.update(met=None, note=f"superseded by {latest[1]} ({latest[0]}; it was {verdict}); {row['note']}")
        rows.append(row)
    record = run("train_sae", ["--shape", "tiny", "--repeats", "1" if args.quick else "3"], out / "train_sae_tiny.json")
    rows.append(
        {"step": "train_sae", "case": f"tiny {record['hook']}, {record['tokens']:,} tokens", "figure": "tokens/s / SAELens runner's",
         "value": record["tokens_per_second_ratio"], "goal": ">= 0.95", "met": record["tokens_per_second_ratio"] >= 0.95}
        if record else not_measured("train_sae", "tiny", "tokens/s over SAELens's runner alone", ">= 0.95", "benchmark failed")
    )  # fmt: skip

    # train_sae on a GPU: measured here if there is one, else as recorded on one.
    if torch.cuda.is_available() and not args.quick:
        gpu_args = ["--shape", "gpt2-small", "--device", "cuda", "--tokens", "1000000", "--batch-size-tokens", "4096", "--expansion", "32"]
        record, note = run("train_sae", gpu_args, out / "train_sae_gpt2-small_gpu.json"), "measured here"
    else:
        recorded = RECORDED / "train_sae_gpt2-small_h100.json"
        record = json.loads(recorded.read_text()) if recorded.exists() else None
        note = f"recorded {record['machine']['date']} on {record['machine']['gpu']} ({recorded.name})" if record else ""
    rows.append(
        {"step": "train_sae", "case": f"GPT-2 small GPU {record['hook']}, d_sae {record['d_sae']}, {record['tokens']:,} tokens",
         "figure": "tokens/s / SAELens runner's", "value": record["tokens_per_second_ratio"], "goal": ">= 0.95",
         "met": record["tokens_per_second_ratio"] >= 0.95, "note": note}
        if record
        else not_measured("train_sae", "GPT-2 small GPU", "tokens/s / SAELens runner's", ">= 0.95", "no GPU here and none recorded")
    )  # fmt: skip

    record = run("evaluate_core", ["--shape", "tiny"], out / "evaluate_core_tiny.json")
    if record:
        rows.append(
            {
                "step": "evaluate",
                "case": "core, tiny",
                "figure": "time / SAEBench run_evals alone",
                "value": record["ratio_median"],
                "goal": "<= 1.1",
                "met": record["ratio_median"] <= 1.1,
            }
        )
        whole = record["ratio_median_to_saebench_core_per_sae"]
        rows.append(
            {"step": "evaluate", "case": "core, tiny", "figure": "time / SAEBench's core per SAE (its JSON written)",
             "value": whole, "goal": "<= 1.1", "met": whole <= 1.1}
        )  # fmt: skip
    # evaluate's core on a GPU: measured here if there is one, else as recorded on one.
    for shape, dtype in gpu_cases:
        if torch.cuda.is_available() and not args.quick:
            record = run("evaluate_core", ["--shape", shape, "--device", "cuda", "--dtype", dtype], out / f"evaluate_core_{shape}_gpu.json")
            note = "measured here"
        else:
            recorded = sorted(RECORDED.glob(f"evaluate_core_{shape}_h[0-9][0-9][0-9].json"))  # h100, h200: the latest code's
            record = json.loads(recorded[-1].read_text()) if recorded else None
            note = f"recorded {record['machine']['date']} on {record['machine']['gpu']} ({recorded[-1].name})" if record else ""
            if record and "ratio_median_to_saebench_core_per_sae" not in record:
                note += "; before core's centred variance came from SAEBench's own loop (it had a pass of its own)"
            if record and record.get("note"):  # what the recorded run measured, written beside its figures
                note += f"; {record['note']}"
        rows.append(
            {"step": "evaluate", "case": f"core, {shape} {dtype} GPU", "figure": "time / SAEBench run_evals alone",
             "value": record["ratio_median"], "goal": "<= 1.1", "met": record["ratio_median"] <= 1.1, "note": note}
            if record
            else not_measured("evaluate", f"core, {shape} {dtype} GPU", "time / SAEBench run_evals alone", "<= 1.1", "none recorded")
        )  # fmt: skip
    if args.pipeline:
        record = run("pipeline", [], out / "pipeline_tiny.json")
        if record:
            rows.append(
                {"step": "pipeline", "case": "tiny, fresh clone, cold", "figure": "minutes", "value": record["cold_seconds"] / 60,
                 "goal": "<= 10", "met": record["cold_seconds"] <= 600}
            )  # fmt: skip
            rows.append(
                {"step": "pipeline", "case": "tiny, fresh clone, cached", "figure": "seconds", "value": record["cached_seconds"],
                 "goal": "<= 15", "met": record["cached_seconds"] <= 15}
            )  # fmt: skip
        else:
            rows.append(not_measured("pipeline", "tiny, fresh clone", "cold minutes / cached seconds", "<= 10 / <= 15", "benchmark failed"))
    else:
        rows.append(
            not_measured(
                "pipeline", "tiny, fresh clone", "cold minutes / cached seconds", "<= 10 / <= 15",
                "not run: --pipeline (about 20 minutes on 2 cores; benchmarks/pipeline.py)",
            )
        )  # fmt: skip

    print()
    print("| step | case | figure | value | goal | met | note |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        value = "not measured" if row["value"] is None else f"{row['value']:.3f}"
        met = "" if row["met"] is None else ("yes" if row["met"] else "**no**")
        print(f"| {row['step']} | {row['case']} | {row['figure']} | {value} | {row['goal']} | {met} | {row.get('note', '')} |")
    (out / "run_all.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
