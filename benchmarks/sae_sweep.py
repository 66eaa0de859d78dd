"""The SAE-pruning sweep against its floor and against the seed code's way, at an early, a middle and a late layer.

    python benchmarks/sae_sweep.py                    # GPT-2-small-shaped model, random weights, CPU
    python benchmarks/sae_sweep.py --shape tiny --repeats 1
    python benchmarks/sae_sweep.py --shape gemma-2-2b --device cuda --dtype bfloat16 --sequences 16 --seq-len 512

Side by side in one process, per layer (medians of --repeats):

- **sweep**: what `prune_sae` does: one activation pass (cache), the SAE's statistics from it, then per level the
  pruned SAE measured on the cache (reconstruction without the model, the spliced loss from the SAE's block on);
- **floor**: the same activation pass, plus per level the forward from the SAE's block on with no SAE at all (goal:
  sweep <= 1.2x floor);
- **seed's way**: what the paper's code does per level: statistics recomputed through the whole model, then the whole
  model run again with the pruned SAE spliced in (goal: sweep >= 4x faster);
- **each level separately** (context): statistics once, then the whole model per level.

The sweep's metrics equal the whole-model ones (the test suite checks it); the largest CE difference is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from sae_lens import SAE, TopKSAEConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<this>.py` finds `benchmarks`

from benchmarks.common import build_model, machine, write_json
from saecomp.prune_sae import cache_activations, prune_sae, sae_statistics, seed_sae_statistics, sweep
from saecomp.saes import evaluate_sae

LEVELS = [0.25, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99]


def seconds(fn, device: str = "cpu") -> tuple[float, object]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # kernels still queued from before must not count, nor our own be left out
    started = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started, out


@torch.no_grad()
def measure_layer(model, layer: int, tokens: torch.Tensor, expansion: int, repeats: int, baselines: bool = True) -> dict:
    cfg = model.cfg
    hook = f"blocks.{layer}.hook_resid_post"
    device = str(cfg.device)
    sae = SAE.from_dict(TopKSAEConfig(d_in=cfg.d_model, d_sae=expansion * cfg.d_model, k=32).to_dict()).to(device)
    sae.cfg.metadata.hook_name = hook

    def the_sweep():
        cache = cache_activations(model, hook, tokens)
        stats = sae_statistics(sae, cache.ordinary_activations())
        return sweep(model, sae, stats, cache, LEVELS)

    def the_floor():
        cache = cache_activations(model, hook, tokens)
        for _ in LEVELS:
            for resid, batch in zip(cache.resid_pre.split(8), cache.tokens.split(8), strict=True):
                model(resid, start_at_layer=layer, tokens=batch, return_type="loss", loss_per_token=True)

    documents = list(tokens)

    def the_seed_way():
        out = {}
        for level in LEVELS:
            stats = seed_sae_statistics(model, sae, hook, documents)  # through the whole model, every level
            out[level] = evaluate_sae(model, prune_sae(sae, stats, level), tokens)
        return out

    def each_level_separately():
        stats = sae_statistics(sae, cache_activations(model, hook, tokens).ordinary_activations())
        return {level: evaluate_sae(model, prune_sae(sae, stats, level), tokens) for level in LEVELS}

    times: dict[str, list[float]] = {"sweep": [], "floor": [], "seed_way": [], "each_level": []}
    if not baselines:  # sweep against floor only (--no-baselines): the two slow ways are left out
        times = {"sweep": [], "floor": []}
    for _ in range(repeats):  # interleaved, so that a slow moment of a shared machine hits every way alike
        elapsed, cached = seconds(the_sweep, device)
        times["sweep"].append(elapsed)
        times["floor"].append(seconds(the_floor, device)[0])
        if baselines:
            times["seed_way"].append(seconds(the_seed_way, device)[0])
            elapsed, separate = seconds(each_level_separately, device)
            times["each_level"].append(elapsed)
    median = {name: statistics.median(values) for name, values in times.items()}
    record = {"layer": layer, "seconds": median, "all_seconds": times, "sweep_over_floor": median["sweep"] / median["floor"]}
    if baselines:
        worst = max(abs(cached.metrics[level]["ce_loss_with_sae"] - separate[level]["ce_loss_with_sae"]) for level in LEVELS)
        record.update(
            seed_way_over_sweep=median["seed_way"] / median["sweep"],
            each_level_over_sweep=median["each_level"] / median["sweep"],
            largest_ce_difference=worst,
        )
    return record


@torch.no_grad()
def profile_sweep(model, layer: int, tokens: torch.Tensor, expansion: int, path: Path) -> None:
    """Where one sweep's time goes, by operator (self time), to compare against the floor's forward passes."""
    from torch.profiler import ProfilerActivity, profile

    cfg = model.cfg
    hook = f"blocks.{layer}.hook_resid_post"
    sae = SAE.from_dict(TopKSAEConfig(d_in=cfg.d_model, d_sae=expansion * cfg.d_model, k=32).to_dict()).to(str(cfg.device))
    sae.cfg.metadata.hook_name = hook
    on_gpu = str(cfg.device).startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        cache = cache_activations(model, hook, tokens)
        sweep(model, sae, sae_statistics(sae, cache.ordinary_activations()), cache, LEVELS)
    sort_by = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=60))
    print(f"profile of one sweep at layer {layer}: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["tiny", "gpt2-small", "gemma-2-2b"], default="gpt2-small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="the model's; the SAE stays float32")
    parser.add_argument("--layers", default=None, help="comma-separated (default: first, middle and last)")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-baselines", action="store_true", help="sweep and floor only (not the seed's way nor each level)")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--profile", default=None, help="write torch profiler's table of one sweep at the middle layer here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.shape, args.device, args.dtype)
    cfg = model.cfg
    layers = [int(x) for x in args.layers.split(",")] if args.layers else sorted({0, cfg.n_layers // 2, cfg.n_layers - 1})
    tokens = torch.randint(0, cfg.d_vocab, (args.sequences, min(args.seq_len, cfg.n_ctx)), device=args.device)
    print(
        f"shape={args.shape} device={args.device} dtype={args.dtype} tokens={tokens.numel()} levels={len(LEVELS)} "
        f"threads={torch.get_num_threads()} repeats={args.repeats}"
    )
    print("| layer | sweep s | floor s | seed's way s | each level s | sweep / floor (<= 1.2) | seed's way / sweep (>= 4) |")
    print("|---|---|---|---|---|---|---|")
    with torch.no_grad():
        model(tokens[:8], return_type="loss")  # warm-up: the first forward pays for allocations nobody else does
    results = []
    for layer in layers:
        r = measure_layer(model, layer, tokens, args.expansion, args.repeats, baselines=not args.no_baselines)
        s = r["seconds"]
        seed_way, each_level, ratio = (
            (f"{s['seed_way']:.2f}", f"{s['each_level']:.2f}", f"{r['seed_way_over_sweep']:.2f}") if "seed_way" in s else ("-", "-", "-")
        )
        print(
            f"| {layer}/{cfg.n_layers} | {s['sweep']:.2f} | {s['floor']:.2f} | {seed_way} | {each_level} | "
            f"{r['sweep_over_floor']:.2f} | {ratio} |",
            flush=True,
        )
        results.append(r)
        record = {
            "benchmark": "sae_sweep",
            "shape": args.shape,
            "device": args.device,
            "dtype": args.dtype,
            "n_layers": cfg.n_layers,
            "tokens": tokens.numel(),
            "levels": LEVELS,
            "layers": results,
            "machine": machine(),
        }
        write_json(args.json, record)  # after every layer, so that a run stopped early keeps what it measured
    if args.profile:
        profile_sweep(model, cfg.n_layers // 2, tokens, args.expansion, Path(args.profile))


if __name__ == "__main__":
    main()
