"""What SCR's and TPP's padding-masked twins cost (or, with ``--toggle standard_errors``, their standard errors: the
probe tests traced text by text and the bootstrap): `evaluate.run_suite` with them against the same call without them
(`evaluate.padding_masked_ablations`, or `evaluate.scr_tpp_accuracies` and `evaluate.standard_errors`, replaced by
no-ops), side by side in one process, interleaved, as a ratio, on the tiny world's model and labelled data. Also checks
that SAEBench's own numbers are bit for bit the same both ways.

    python benchmarks/evaluate_scr_tpp.py --world path/to/world        # a built tiny world (the world step's artifact)
    python benchmarks/evaluate_scr_tpp.py                              # builds one first (about 2 minutes on 2 cores)
    python benchmarks/evaluate_scr_tpp.py --world W --device cuda --dtype bfloat16   # the twins on a GPU, the model in bf16
    python benchmarks/evaluate_scr_tpp.py --world W --toggle standard_errors         # what the errors cost

Each suite is timed in the pipeline's common case: a hook's later variants load the model side the first computed
(`SHARED_MODEL_SIDE`), so what is measured is the SAE side, where the twin's cost falls.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<this>.py` finds `benchmarks`

from benchmarks.common import machine, write_json  # noqa: E402
from benchmarks.sae_memo import random_sae  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, help="a built tiny world (default: build one into a temporary folder)")
    parser.add_argument("--experiment", default="experiments/tiny.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="the model's; the SAE stays float32")
    parser.add_argument("--toggle", choices=["twins", "standard_errors"], default="twins", help="what is timed with and without")
    parser.add_argument("--threads", type=int, help="torch threads (the pipeline's steps run with 1 each at --jobs auto on 2 cores)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads={args.threads}: give 1 or more")
        torch.set_num_threads(args.threads)
    with_it, without_it = f"with_{args.toggle}", f"without_{args.toggle}"
    turned_off = _without_twins if args.toggle == "twins" else _without_standard_errors

    from saecomp import evaluate
    from saecomp.config import load_experiment
    from saecomp.models import load_model
    from saecomp.saebench_data import offline_datasets, write_offline_datasets

    exp = load_experiment(args.experiment)
    ev = exp.evaluation
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        world = args.world
        if world is None:
            from saecomp.world.build import build_world

            world = tmp / "world"
            build_world(exp.world_config().only(exp.model), world, log=lambda line: print(f"world: {line}"))
        loaded = load_model(exp.model, world / exp.model, args.dtype, device=args.device)
        layer = exp.sae.layers[0]
        hook = f"blocks.{layer}.hook_resid_post"
        width = exp.sae.d_sae or exp.sae.expansion_factor * loaded.tl.cfg.d_model
        # a random TopK SAE as wide and as sparse as the experiment's: it fires on a zero input, so the twins work
        sae = random_sae(loaded.tl.cfg.d_model, width, "topk", "none", args.device, k=exp.sae.k)
        sae.cfg.metadata.hook_name = hook
        write_offline_datasets(
            exp.world_config().corpus,
            tmp / "data",
            max(ev.sparse_probing_train_size, ev.scr_tpp_train_size) // 4,
            max(ev.sparse_probing_test_size, ev.scr_tpp_test_size) // 4,
        )
        rows = {}
        with offline_datasets(tmp / "data" / "hf_datasets"):
            for suite in ("scr", "tpp"):
                config = evaluate.saebench_config(suite, ev, "bench", args.dtype, loaded.tl, tiny=True)
                shared = tmp / "shared"
                evaluate.run_suite(suite, loaded.tl, sae, config, tmp / suite / "first", "first", shared=shared)  # computes
                times: dict[str, list[float]] = {with_it: [], without_it: []}
                outputs = {}
                for repeat in range(args.repeats):  # interleaved: two shared cores drift
                    for kind in times:
                        patch = contextlib.nullcontext()
                        if kind == without_it:
                            patch = turned_off(evaluate)
                        with patch:
                            started = time.perf_counter()
                            result = evaluate.run_suite(suite, loaded.tl, sae, config, tmp / suite / f"{kind}{repeat}", kind, shared=shared)
                            if args.device.startswith("cuda"):
                                torch.cuda.synchronize()
                            times[kind].append(time.perf_counter() - started)
                        outputs[kind] = {part: result.output[part] for part in ("eval_result_metrics", "eval_result_details")}
                        if kind == with_it:
                            metrics = result.metrics
                        else:  # what the toggle took away: the twins, or every standard error
                            errors_without = sorted(m for m in result.metrics if m.endswith("_se"))
                identical = outputs[with_it] == outputs[without_it]
                twins = {m: metrics[f"{m}{evaluate.PADDING_MASKED}"] for m in metrics if f"{m}{evaluate.PADDING_MASKED}" in metrics}
                moved = sum(twins[m] != metrics[m] for m in twins)
                finite = all(math.isfinite(v) for v in (*twins.values(), *(metrics[m] for m in twins)))
                ratio = statistics.median(times[with_it]) / statistics.median(times[without_it])
                errors = sorted(m for m in metrics if m.endswith("_se"))
                rows[suite] = {**times, "ratio_median": ratio, "saebench_numbers_identical": identical, "standard_errors": len(errors),
                               "standard_errors_without": len(errors_without),
                               "twins": len(twins), "twins_differing_from_saebench": moved, "all_finite": finite,
                               "largest_twin_difference": max((abs(twins[m] - metrics[m]) for m in twins), default=None),
                               "metrics": {m: metrics[m] for m in twins}, "twin_metrics": twins}  # fmt: skip
                print(
                    f"{suite}: {with_it.replace('_', ' ')} median {statistics.median(times[with_it]):.2f} s, without "
                    f"{statistics.median(times[without_it]):.2f} s, ratio {ratio:.3f}x; SAEBench's numbers identical: "
                    f"{identical}; {moved} of {len(twins)} twins differ from SAEBench's; {len(errors)} standard errors "
                    f"({len(errors_without)} without); all finite: {finite}"
                )
    write_json(args.json, {"machine": machine(), "experiment": args.experiment, "device": args.device, "dtype": args.dtype,
                           "toggle": args.toggle, "torch_threads": torch.get_num_threads(), "hook": hook, "d_sae": width,
                           "suites": rows})  # fmt: skip


@contextlib.contextmanager
def _without_twins(evaluate):
    """``run_scr_or_tpp`` as before the twins: no second ablation pass, no twin metrics."""

    @contextlib.contextmanager
    def nothing():
        yield []

    original = evaluate.padding_masked_ablations, evaluate.padding_masked_results
    evaluate.padding_masked_ablations = nothing
    evaluate.padding_masked_results = lambda suite, results, runs: {"averaged": {}}
    try:
        yield
    finally:
        evaluate.padding_masked_ablations, evaluate.padding_masked_results = original


@contextlib.contextmanager
def _without_standard_errors(evaluate):
    """``run_scr_or_tpp`` without its standard errors: no probe test traced, no bootstrap (SAEBench's run unchanged)."""

    @contextlib.contextmanager
    def untraced(side=None):
        yield []

    original = evaluate.scr_tpp_accuracies, evaluate.standard_errors
    evaluate.scr_tpp_accuracies = untraced
    evaluate.standard_errors = lambda suite, kind, metrics, compute: (None, {})
    try:
        yield
    finally:
        evaluate.scr_tpp_accuracies, evaluate.standard_errors = original


if __name__ == "__main__":
    main()
