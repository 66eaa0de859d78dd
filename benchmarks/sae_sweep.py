"""The SAE-pruning sweep from one cached pass vs. every level run through the whole model separately.

    python benchmarks/sae_sweep.py                    # GPT-2-small-shaped model, random weights, CPU
    python benchmarks/sae_sweep.py --shape tiny

Both ways compute the same metrics for the same pruned SAEs (the test suite checks they agree); this
measures only their wall time, side by side in one process, and prints the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from sae_lens import SAE, TopKSAEConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<this>.py` finds `benchmarks`

from benchmarks.common import build_model, machine, write_json
from saecomp.prune_sae import cache_activations, prune_sae, sae_statistics, sweep
from saecomp.saes import evaluate_sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["tiny", "gpt2-small"], default="gpt2-small")
    parser.add_argument("--layer", type=int, default=None, help="SAE layer (default: the middle one)")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.shape)
    cfg = model.cfg
    layer = args.layer if args.layer is not None else cfg.n_layers // 2
    hook = f"blocks.{layer}.hook_resid_post"
    sae = SAE.from_dict(TopKSAEConfig(d_in=cfg.d_model, d_sae=args.expansion * cfg.d_model, k=32).to_dict())
    sae.cfg.metadata.hook_name = hook
    tokens = torch.randint(0, cfg.d_vocab, (args.sequences, min(args.seq_len, cfg.n_ctx)))
    levels = [0.25, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99]
    stats = sae_statistics(sae, torch.randn(4096, cfg.d_model))

    started = time.perf_counter()
    cache = cache_activations(model, hook, tokens)
    cached = sweep(model, sae, stats, cache, levels)
    cached_seconds = time.perf_counter() - started

    started = time.perf_counter()
    separate = {level: evaluate_sae(model, prune_sae(sae, stats, level), tokens) for level in levels}
    separate_seconds = time.perf_counter() - started

    worst = max(abs(cached.metrics[level]["ce_loss_with_sae"] - separate[level]["ce_loss_with_sae"]) for level in levels)
    print(f"shape={args.shape} layer={layer}/{cfg.n_layers} tokens={tokens.numel()} levels={len(levels)} threads={torch.get_num_threads()}")
    print(f"cached sweep:          {cached_seconds:8.2f} s")
    print(f"each level separately: {separate_seconds:8.2f} s")
    print(f"speed-up: {separate_seconds / cached_seconds:.2f}x   (largest CE difference between the two: {worst:.2e})")
    write_json(
        args.json,
        {
            "benchmark": "sae_sweep",
            "shape": args.shape,
            "layer": layer,
            "n_layers": cfg.n_layers,
            "tokens": tokens.numel(),
            "levels": levels,
            "cached_sweep_seconds": cached_seconds,
            "each_level_separately_seconds": separate_seconds,
            "speed_up": separate_seconds / cached_seconds,
            "largest_ce_difference": worst,
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
