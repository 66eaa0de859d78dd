"""The three SAEs of one layer (``attn.hook_z``, ``hook_mlp_out``, ``hook_resid_post``), as `train_sae` trains them
today, one SAELens `LanguageModelSAETrainingRunner` per hook (each runs the model over its training tokens), against
SAELens's `MultiSAETrainingRunner`, which trains the same three SAEs from one forward pass: side by side in one
process, interleaved, medians of --repeats. It measures what sharing the forward pass would save; saecomp does not
use the multi-hook runner (its steps, keys and checkpoints are per hook).

    python benchmarks/train_sae_hooks.py                 # tiny shape, random weights, CPU
    python benchmarks/train_sae_hooks.py --tokens 400000 --batch-size-tokens 4096 --threads 1   # tiny.yaml's sizes, a step's thread
    python benchmarks/train_sae_hooks.py --shape gpt2-small --tokens 100000

Both ways train TopK SAEs of the same configuration (tiny.yaml's k 16 by default) without checkpoints (the step keeps
some; the multi-hook runner has its own checkpoint format) and without excluding special tokens (random tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<this>.py` finds `benchmarks`

from benchmarks.common import build_model, machine, write_json
from benchmarks.train_sae import TokenRows
from saecomp.train_sae import SAETrainingSpec, runner_config

HOOKS = ("attn.hook_z", "hook_mlp_out", "hook_resid_post")


def one_runner_per_hook(specs, model, dataset, folder: Path) -> None:
    from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner

    for spec in specs:
        cfg = runner_config(spec, model, "bench", {}, folder / spec.hook / "checkpoints", "override")
        torch.manual_seed(spec.seed)
        LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model).run()


def one_forward_for_all(specs, model, dataset, folder: Path) -> None:
    """SAELens's multi-hook runner, every field it shares with the single runner's configuration taken from it."""
    from sae_lens.multi_sae_training_runner import MultiSAETrainingRunner, MultiSAETrainingRunnerConfig

    singles = {spec.hook: runner_config(spec, model, "bench", {}, folder / "checkpoints", "override") for spec in specs}
    first = next(iter(singles.values()))
    shared = {f.name for f in dataclasses.fields(MultiSAETrainingRunnerConfig)} & {f.name for f in dataclasses.fields(first)}
    shared -= {"saes", "hook_names", "hook_head_indices", "sae", "hook_name", "hook_head_index"}
    cfg = MultiSAETrainingRunnerConfig(
        saes={hook: single.sae for hook, single in singles.items()},
        hook_names={hook: single.hook_name for hook, single in singles.items()},
        **{name: getattr(first, name) for name in shared},
    )
    torch.manual_seed(specs[0].seed)
    MultiSAETrainingRunner(cfg, override_dataset=dataset, override_model=model).run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["tiny", "gpt2-small"], default="tiny")
    parser.add_argument("--tokens", type=int, default=100_000, help="training tokens per SAE")
    parser.add_argument("--batch-size-tokens", type=int, default=1024)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=16, help="TopK's active latents (tiny.yaml: 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (a pipeline step beside another: 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.shape)
    layer = model.cfg.n_layers // 2
    specs = [
        SAETrainingSpec(hook=hook, layer=layer, training_tokens=args.tokens, batch_size_tokens=args.batch_size_tokens,
                        expansion_factor=args.expansion, k=args.k, context_size=min(128, model.cfg.n_ctx), n_checkpoints=0)
        for hook in HOOKS
    ]  # fmt: skip
    dataset = TokenRows(model.cfg.d_vocab, specs[0].context_size, args.tokens)
    workdir = Path(tempfile.mkdtemp(prefix="saecomp-bench-hooks-"))
    variants = [("one_runner_per_hook", one_runner_per_hook), ("one_forward_for_all", one_forward_for_all)]
    one_forward_for_all(specs, model, dataset, workdir / "warm-up")  # kernels, allocator and caches first
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for repeat in range(args.repeats):  # interleaved: a slow moment of a shared machine hits both alike
        for name, run in variants:
            started = time.perf_counter()
            run(specs, model, dataset, workdir / f"{name}-{repeat}")
            times[name].append(time.perf_counter() - started)
            print(f"{name}: {times[name][-1]:.2f} s", flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = median["one_runner_per_hook"] / median["one_forward_for_all"]
    print(f"shape={args.shape} layer={layer} hooks={', '.join(HOOKS)} tokens per SAE={args.tokens} threads={torch.get_num_threads()}")
    for name, seconds in median.items():
        print(f"{name}: {seconds:.2f} s for three SAEs (median of {args.repeats}: {[round(t, 2) for t in times[name]]})")
    print(f"one forward for all three is {ratio:.2f}x faster than one runner per hook")
    write_json(
        args.json,
        {
            "benchmark": "train_sae_hooks",
            "shape": args.shape,
            "layer": layer,
            "hooks": list(HOOKS),
            "tokens_per_sae": args.tokens,
            "batch_size_tokens": args.batch_size_tokens,
            "architecture": specs[0].architecture,
            "k": args.k,
            "expansion_factor": args.expansion,
            "n_checkpoints": 0,
            "threads": torch.get_num_threads(),
            "seconds": times,
            "median_seconds": median,
            "speedup": ratio,
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
