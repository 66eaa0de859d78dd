"""`evaluate`'s core suite (`saecomp.evaluate.run_core`) vs. SAEBench's own `run_evals` on the same SAE, model
and tokens, side by side in one process, interleaved, as a ratio (goal: at most 1.1x).

    python benchmarks/evaluate_core.py                 # tiny shape, random weights, CPU
    python benchmarks/evaluate_core.py --shape gpt2-small --batches 2
    python benchmarks/evaluate_core.py --shape gemma-2-2b --device cuda --dtype bfloat16   # on a GPU

`run_core` calls `run_evals` itself; what it adds is SAEBench's own SAE preparation, SAEBench's JSON output (as its
own core writes it per SAE) validated against its pydantic class, and the bootstrap; the centred explained variance
is gathered inside `run_evals`'s own variance loop. Two anchors, interleaved: `run_evals` alone (the goal's), and
SAEBench's core per SAE as its `multiple_evals` runs it (`run_evals`, misc metrics, the JSON written).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from sae_lens import SAE, TopKSAEConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<this>.py` finds `benchmarks`

from benchmarks.common import DTYPES, SHAPES, build_model, machine, write_json
from saecomp.evaluate import CoreSizes, core_config, prepared_for_saebench, run_core, token_activation_store


def saebench_alone(model, sae, tokens, special, sizes: CoreSizes, with_output: bool = False) -> None:
    """What a SAEBench user runs for core on a model object: `run_evals` over an activation store; ``with_output``:
    and what SAEBench's own core (`multiple_evals`) then does per SAE, its misc metrics and its JSON written."""
    from sae_bench.evals.core.main import calculate_misc_metrics, replace_nans_with_negative_one, run_evals, save_single_eval_result

    config = core_config(sizes, tokens.shape[1], "bench")
    prepared = prepared_for_saebench(sae, "bench")
    scalar, features = run_evals(sae=prepared, activation_store=token_activation_store(model, prepared, tokens), model=model,
                                 eval_config=config, ignore_tokens=special)  # fmt: skip
    if with_output:
        scalar["misc_metrics"] = calculate_misc_metrics(features)
        result = {"eval_cfg": config, "metrics": scalar, "feature_metrics": features, "sae_id": "sae", "sae_set": "bench"}
        with tempfile.TemporaryDirectory() as tmp:
            save_single_eval_result(replace_nans_with_negative_one(result), "bench", "", "", str(Path(tmp) / "core.json"), prepared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the model's; the SAE stays float32")
    parser.add_argument("--batches", type=int, default=8, help="reconstruction and sparsity batches each")
    parser.add_argument("--sparsity-batches", type=int, default=None, help="sparsity-and-variance batches (default: --batches)")
    parser.add_argument("--d-sae", type=int, default=None, help="the SAE's width (default: 8 x d_model)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--parts", action="store_true", help="also time run_core's parts (a device sync around each, in run_core only: off by default)"
    )
    parser.add_argument(
        "--density-cost", action="store_true",
        help="also time run_core with the per-latent firing counts (the densities' bootstrap) left out, interleaved",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.shape, args.device, args.dtype)
    cfg = model.cfg
    layer = cfg.n_layers // 2
    d_sae = args.d_sae or 8 * cfg.d_model
    sae = SAE.from_dict(TopKSAEConfig(d_in=cfg.d_model, d_sae=d_sae, k=32, device=args.device).to_dict())
    sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    sae.cfg.metadata.model_name = "bench"
    sizes = CoreSizes(args.batch_size, args.batches, args.sparsity_batches or args.batches)
    tokens = torch.randint(1, cfg.d_vocab, (sizes.n_prompts, min(args.seq_len, cfg.n_ctx)))
    documents = torch.arange(sizes.n_prompts) // 3  # texts of three windows: the pipeline's bootstrap resamples texts
    tokens[:, 0] = 0
    special = {0}
    ours, theirs, theirs_whole, without_densities = [], [], [], []
    metrics = {}
    parts: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # interleaved: two shared cores drift
        for with_output, times in ((False, theirs), (True, theirs_whole)):
            started = time.perf_counter()
            saebench_alone(model, sae, tokens, special, sizes, with_output)
            _synchronize(args.device)
            times.append(time.perf_counter() - started)
        started = time.perf_counter()
        with timed_parts(args.device, parts) if args.parts else contextlib.nullcontext():
            result = run_core(model, sae, tokens, special, sizes, documents=documents)
        _synchronize(args.device)
        ours.append(time.perf_counter() - started)
        metrics = {name: result.metrics[name] for name in HEADLINE}
        if args.density_cost:  # the same call with VarianceLoopSums.add_firing doing nothing
            from saecomp.evaluate import VarianceLoopSums

            counting, VarianceLoopSums.add_firing = VarianceLoopSums.add_firing, lambda self, latents, lengths: None
            try:
                started = time.perf_counter()
                run_core(model, sae, tokens, special, sizes, documents=documents)
                _synchronize(args.device)
                without_densities.append(time.perf_counter() - started)
            finally:
                VarianceLoopSums.add_firing = counting
    ratio = statistics.median(ours) / statistics.median(theirs)
    ratio_whole = statistics.median(ours) / statistics.median(theirs_whole)
    figures = {
        "machine": machine(),
        "shape": args.shape,
        "device": args.device,
        "dtype": args.dtype,
        "layer": layer,
        "d_sae": sae.cfg.d_sae,
        "core_sizes": {"batch_size_prompts": sizes.batch_size_prompts, "n_reconstruction_batches": sizes.n_reconstruction_batches,
                       "n_sparsity_variance_batches": sizes.n_sparsity_variance_batches},
        "tokens": tokens.numel(),
        "saebench_run_evals_seconds": theirs,
        "saebench_core_per_sae_seconds": theirs_whole,
        "saecomp_run_core_seconds": ours,
        "ratio_median": ratio,
        "ratio_median_to_saebench_core_per_sae": ratio_whole,
        "goal": 1.1,
        "run_core_parts_seconds": parts,
        "run_core_without_firing_counts_seconds": without_densities,
        "metrics": metrics,
    }
    print(f"shape={args.shape} {args.dtype} on {args.device} layer={layer}/{cfg.n_layers} tokens={tokens.numel()}", end=" ")
    print(f"threads={torch.get_num_threads()}")
    print(f"SAEBench run_evals alone: median {statistics.median(theirs):7.2f} s  {[round(t, 2) for t in theirs]}")
    print(f"SAEBench core per SAE:    median {statistics.median(theirs_whole):7.2f} s  {[round(t, 2) for t in theirs_whole]}")
    print(f"saecomp run_core:         median {statistics.median(ours):7.2f} s  {[round(t, 2) for t in ours]}")
    print(f"ratio to run_evals alone {ratio:.3f}x (goal <= 1.1x: {'met' if ratio <= 1.1 else 'NOT met'}); "
          f"to SAEBench's core per SAE (with its JSON) {ratio_whole:.3f}x")  # fmt: skip
    print("metrics: " + ", ".join(f"{name.removeprefix('core.')} {value:.6g}" for name, value in metrics.items()))
    if without_densities:
        print(f"run_core without the firing counts: median {statistics.median(without_densities):7.2f} s  "
              f"{[round(t, 2) for t in without_densities]}; the counts cost "
              f"{statistics.median(ours) / statistics.median(without_densities):.3f}x")  # fmt: skip
    if parts:
        print("run_core's parts, median s: " + ", ".join(f"{name} {statistics.median(times):.3f}" for name, times in parts.items()))
    write_json(args.json, figures)


# Printed and recorded so that a device's run can be read against the CPU's (every one must be finite).
HEADLINE = (
    "core.kl_div_score",
    "core.ce_loss_score",
    "core.explained_variance",
    "core.explained_variance_centred",
    "core.mse",
    "core.cossim",
    "core.l0",
)


# What run_core calls, by module: each timed inside the real run_core (the names are looked up at call time).
PARTS = {
    "saecomp.evaluate": (
        "prepared_for_saebench", "token_activation_store", "validate_output", "core_bootstrap"
    ),  # fmt: skip
    "sae_bench.evals.core.main": ("run_evals", "calculate_misc_metrics", "save_single_eval_result"),
}


@contextlib.contextmanager
def timed_parts(device: str, seconds: dict[str, list[float]]):
    """Inside the block, each of ``PARTS`` adds up its wall time (device synchronised); on leaving it, each part's total
    is appended to ``seconds[name]``: one figure per `run_core` call, however often the part ran in it (the bootstrap
    calls `calculate_misc_metrics` once per replicate, inside `core_bootstrap`'s own time)."""
    originals, block = [], {}
    for module_name, names in PARTS.items():
        module = importlib.import_module(module_name)
        for name in names:
            original = getattr(module, name)
            originals.append((module, name, original))

            def timed(*args, _original=original, _name=name, **kwargs):
                _synchronize(device)
                started = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    _synchronize(device)
                    block[_name] = block.get(_name, 0.0) + time.perf_counter() - started

            setattr(module, name, timed)
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)
        for name, total in block.items():
            seconds.setdefault(name, []).append(total)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
