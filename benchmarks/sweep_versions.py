"""The SAE sweep of this checkout against the same sweep as another commit wrote it, side by side in one process.

    python benchmarks/sweep_versions.py --against HEAD~1                 # GPT-2-small shape, layers 6 and 11, CPU
    python benchmarks/sweep_versions.py --against 2949b43 --layers 11 --rounds 5

Two processes minutes apart on two shared cores differ by more than most changes to the sweep do, so a change is
measured here: the other commit's `saecomp/prune_sae.py` is loaded from git (`git show`) beside this checkout's, and
both run `sweep` on the same model, SAE, statistics and cache, in interleaved rounds that alternate which goes first.
The rest of `saecomp` (the WANDA masks, `saes`) is this checkout's for both: the comparison is of prune_sae.py alone,
and it refuses a commit whose prune_sae.py does not import against it. Also checked: both give the same metrics.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from sae_lens import SAE, TopKSAEConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<this>.py` finds `benchmarks`

from benchmarks.common import build_model, machine, write_json
from benchmarks.sae_sweep import LEVELS
from saecomp import prune_sae as this_version

ROOT = Path(__file__).resolve().parents[1]


def prune_sae_at(commit: str):
    """`saecomp/prune_sae.py` as it was at ``commit``, imported as a module of its own."""
    try:
        source = subprocess.run(["git", "show", f"{commit}:saecomp/prune_sae.py"], cwd=ROOT, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as error:
        raise SystemExit(f"--against {commit!r}: git cannot show saecomp/prune_sae.py there ({error.stderr.strip()})") from None
    name = f"prune_sae_at_{commit.replace('~', '_').replace('^', '_')}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__file__ = f"{commit}:saecomp/prune_sae.py"
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    exec(compile(source.stdout, module.__file__, "exec"), module.__dict__)
    return module


@torch.no_grad()
def compare_layer(model, layer: int, tokens: torch.Tensor, expansion: int, rounds: int, versions: dict) -> dict:
    cfg = model.cfg
    hook = f"blocks.{layer}.hook_resid_post"
    sae = SAE.from_dict(TopKSAEConfig(d_in=cfg.d_model, d_sae=expansion * cfg.d_model, k=32).to_dict()).to(str(cfg.device))
    sae.cfg.metadata.hook_name = hook
    cache = this_version.cache_activations(model, hook, tokens)
    stats = this_version.sae_statistics(sae, cache.ordinary_activations())
    times: dict[str, list[float]] = {name: [] for name in versions}
    results = {}
    for round_index in range(rounds):
        order = list(versions) if round_index % 2 == 0 else list(reversed(versions))
        for name in order:
            started = time.perf_counter()
            results[name] = versions[name].sweep(model, sae, stats, cache, LEVELS)
            times[name].append(time.perf_counter() - started)
    first, second = (results[name] for name in versions)
    differences = {
        metric: max(abs(first.metrics[level][metric] - second.metrics[level][metric]) for level in LEVELS)
        for metric in first.metrics[LEVELS[0]]
    }
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"layer": layer, "seconds": median, "all_seconds": times, "largest_metric_difference": differences}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the commit (or any git revision) to compare this checkout's sweep with")
    parser.add_argument("--shape", choices=["tiny", "gpt2-small", "gemma-2-2b"], default="gpt2-small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", default=None, help="comma-separated (default: the middle and the last)")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    def short(revision: str) -> str:
        found = subprocess.run(["git", "rev-parse", "--short", f"{revision}^{{commit}}"], cwd=ROOT, capture_output=True, text=True)
        if found.returncode:
            raise SystemExit(f"--against {revision!r} is not a commit here; valid: a commit, branch or tag of this repository")
        return found.stdout.strip()

    against, head = short(args.against), short("HEAD")  # recorded as commits: "HEAD" would mean another commit tomorrow
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "saecomp/prune_sae.py"], cwd=ROOT, capture_output=True, text=True).stdout)
    this_name = f"{head}+uncommitted" if dirty else head
    if this_name == against:
        raise SystemExit(f"--against {args.against} is this checkout's own prune_sae.py ({head}, unchanged): nothing to compare")
    versions = {against: prune_sae_at(against), this_name: this_version}
    torch.manual_seed(0)
    model = build_model(args.shape, args.device)
    cfg = model.cfg
    layers = [int(x) for x in args.layers.split(",")] if args.layers else sorted({cfg.n_layers // 2, cfg.n_layers - 1})
    tokens = torch.randint(0, cfg.d_vocab, (args.sequences, min(args.seq_len, cfg.n_ctx)), device=args.device)
    print(f"shape={args.shape} device={args.device} tokens={tokens.numel()} levels={len(LEVELS)} threads={torch.get_num_threads()}")
    print(f"| layer | {against} s | {this_name} s | speed-up | largest metric difference |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        model(tokens[:8], return_type="loss")  # warm-up
    records = []
    for layer in layers:
        r = compare_layer(model, layer, tokens, args.expansion, args.rounds, versions)
        old, new = r["seconds"][against], r["seconds"][this_name]
        r["speed_up"] = old / new
        worst = max(r["largest_metric_difference"].values())
        print(f"| {layer}/{cfg.n_layers} | {old:.2f} | {new:.2f} | {old / new:.3f}x | {worst:.2e} |", flush=True)
        records.append(r)
        write_json(args.json, {
            "benchmark": "sweep_versions", "against": against, "this": this_name, "shape": args.shape,
            "device": args.device, "tokens": tokens.numel(), "levels": LEVELS, "rounds": args.rounds,
            "expansion": args.expansion, "layers": records, "machine": machine(),
        })  # fmt: skip


if __name__ == "__main__":
    main()
