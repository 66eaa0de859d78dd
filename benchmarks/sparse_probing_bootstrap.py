"""What sparse probing's bootstrap of the test texts costs at SAEBench's own sizes, beside the closed form it replaced.

SAEBench's default sparse probing (8 datasets, 2-5 classes each, 500 test texts per class, k in 1, 2, 5) cannot run
here (its datasets are not on this machine), so its traced answers are built synthetically at those sizes: every
class's probe tested on its own texts and as many of the other classes', a GPU probe (the model's and the SAE's) tested
after each of ``--epochs`` epochs (SAEBench's limit is 100; its early stop usually ends sooner). Times the checks of
the answers (``evaluate._sparse_probing_traced``), the bootstrap (``evaluate.sparse_probing_bootstrap``, 1,000
replicates) and the closed form (``evaluate.sparse_probing_uncertainty``), interleaved, medians; and the size and
write time of the answers a shared model side keeps (``evaluate._plain_class_outcomes`` of the model's probes).

    python benchmarks/sparse_probing_bootstrap.py [--epochs 100] [--test-per-class 500] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import PeakMemory, machine, write_json  # noqa: E402


def synthetic_run(per_class_n: int, epochs: int, k_values=(1, 2, 5), seed: int = 0):
    """SAEBench's per-class accuracies and the traced answers behind them, for its eight default datasets."""
    from sae_bench.sae_bench_utils import dataset_info

    rng = np.random.default_rng(seed)
    per_class, runs, sizes = {}, {}, {}
    for dataset, chosen in dataset_info.chosen_classes_per_dataset.items():
        key, classes = f"{dataset}_results", [str(c) for c in chosen]
        pools = tuple(sorted((c, per_class_n) for c in classes))
        offsets = {c: i * per_class_n for i, (c, _) in enumerate(pools)}
        reads = {}  # class -> the 2n entries its probe is tested on: its own, then as many drawn from the others
        for c in classes:
            others = np.concatenate([np.arange(per_class_n) + offsets[o] for o in classes if o != c])
            reads[c] = np.concatenate([np.arange(per_class_n) + offsets[c], rng.choice(others, per_class_n, replace=False)])
        names = {"llm_test_accuracy": epochs, "sae_test_accuracy": epochs}
        names |= {f"{side}_top_{k}_test_accuracy": 1 for side in ("llm", "sae") for k in k_values}
        by_name, accuracies = {}, {}
        for name, tests in names.items():
            answers = {c: [rng.random(2 * per_class_n) < 0.9 for _ in range(tests)] for c in classes}
            by_name[name] = {"pools": pools, "by_class": {c: (reads[c], answers[c]) for c in classes}}
            accuracies[name] = {c: max(float(np.mean(a)) for a in answers[c]) for c in classes}
        per_class[key] = accuracies
        runs[key] = {"texts": {c: [f"{dataset} text {c}.{i}" for i in range(per_class_n)] for c in classes}, "by_name": by_name}
        sizes[key] = {c: 2 * per_class_n for c in classes}
    return per_class, runs, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()

    from saecomp import evaluate

    per_class, runs, sizes = synthetic_run(args.test_per_class, args.epochs)
    timings: dict[str, list[float]] = {"checks": [], "bootstrap": [], "closed form": []}
    peak = 0
    for _ in range(args.repeats):
        start = time.perf_counter()
        traced, why = evaluate._sparse_probing_traced(per_class, runs)
        timings["checks"].append(time.perf_counter() - start)
        assert why is None, why
        with PeakMemory("cpu") as memory:
            start = time.perf_counter()
            result = evaluate.sparse_probing_bootstrap(per_class, traced, sizes)
            timings["bootstrap"].append(time.perf_counter() - start)
        peak = max(peak, memory.peak)
        start = time.perf_counter()
        evaluate.sparse_probing_uncertainty(per_class, sizes)
        timings["closed form"].append(time.perf_counter() - start)
    kept = {  # what the run computing a shared model side keeps: the model's probes' answers
        key: {name: evaluate._plain_class_outcomes(o) for name, o in run["by_name"].items() if name.startswith("llm_")}
        for key, run in runs.items()
    }
    start = time.perf_counter()
    buffer = io.BytesIO()
    torch.save(kept, buffer)
    saved_seconds = time.perf_counter() - start

    medians = {name: statistics.median(values) for name, values in timings.items()}
    entries = sum(s["entries"] for s in result["texts"].values())
    print(f"SAEBench's 8 default sparse-probing datasets: {entries} test texts, {args.test_per_class} per class, "
          f"GPU probes tested over {args.epochs} epochs; medians of {args.repeats}")  # fmt: skip
    print(f"{'part':<14} {'seconds':>9}")
    for name, seconds in medians.items():
        print(f"{name:<14} {seconds:>9.3f}")
    print(f"bootstrap peak memory growth {peak / 2**20:.0f} MiB; the model probes' kept answers {len(buffer.getvalue()) / 2**20:.1f} MiB, "
          f"written in {saved_seconds:.2f} s")  # fmt: skip
    write_json(
        args.json,
        {
            "machine": machine(),
            "sizes": {"test_per_class": args.test_per_class, "epochs": args.epochs, "entries": entries, "replicates": result["replicates"]},
            "seconds": timings,
            "medians": medians,
            "bootstrap_peak_bytes": peak,
            "kept_answers_bytes": len(buffer.getvalue()),
            "kept_answers_write_seconds": saved_seconds,
            "se": result["se"],
        },
    )


if __name__ == "__main__":
    main()
