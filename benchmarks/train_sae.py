"""`train_sae`'s training (`saecomp.train_sae.train_sae`, metrics streamed to an MLflow run) against SAELens's
`LanguageModelSAETrainingRunner` alone, with the same configuration, model and tokens: tokens per second, side by
side in one process, interleaved, medians of --repeats (goal: ours >= 0.95x SAELens's).

    python benchmarks/train_sae.py                     # tiny shape, random weights, CPU
    python benchmarks/train_sae.py --shape gpt2-small --tokens 200000
    python benchmarks/train_sae.py --shape gpt2-small --device cuda --tokens 2000000 --batch-size-tokens 4096

What ours adds to SAELens's runner: the trainer subclass that hands SAELens's per-step metrics to a callback, which
here (as in the step: `saecomp.tracking.training_metrics_logger`) logs them to MLflow every 5 steps, and saving the
inference SAE at the end. ``--asynchronous-too`` also times ours with MLflow's asynchronous logging.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<this>.py` finds `benchmarks`

from benchmarks.common import build_model, machine, write_json
from saecomp.train_sae import SAETrainingSpec, runner_config, train_sae


class TokenRows:
    """Random token windows as the step hands them to SAELens (an iterable of ``{"input_ids": [context]}`` rows, as
    `saecomp.data.TokenStream` yields them), not a `datasets.Dataset`, whose torch formatting the step never uses."""

    def __init__(self, vocab: int, context: int, tokens: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        rows = -(-tokens // context) * 2  # more than one pass needs: both runs stop at the token budget
        self.ids = torch.randint(0, vocab, (rows, context), generator=generator).tolist()

    def __iter__(self):
        for row in self.ids:
            yield {"input_ids": row}


def sae_lens_alone(spec, model, dataset, folder: Path) -> None:
    from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner

    cfg = runner_config(spec, model, "bench", {}, folder / "checkpoints", "override")
    torch.manual_seed(spec.seed)
    LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model).run()


def ours(spec, model, dataset, folder: Path, synchronous: bool = True) -> None:
    import mlflow

    from saecomp.tracking import training_metrics_logger

    with mlflow.start_run():  # its end waits for the queued metrics, as the step's does
        train_sae(
            spec, model, dataset, "bench", {}, folder / "checkpoints", folder / "sae",
            on_metrics=training_metrics_logger(synchronous=synchronous),
        )  # fmt: skip


def ours_asynchronous(spec, model, dataset, folder: Path) -> None:
    ours(spec, model, dataset, folder, synchronous=False)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["tiny", "gpt2-small"], default="tiny")
    parser.add_argument("--hook", default="hook_resid_post")
    parser.add_argument("--tokens", type=int, default=100_000, help="training tokens per run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size-tokens", type=int, default=1024)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--asynchronous-too", action="store_true", help="also time ours with MLflow's asynchronous logging")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.shape, device=args.device)
    layer = model.cfg.n_layers // 2
    spec = SAETrainingSpec(hook=args.hook, layer=layer, training_tokens=args.tokens, batch_size_tokens=args.batch_size_tokens,
                           expansion_factor=args.expansion, context_size=min(128, model.cfg.n_ctx), n_checkpoints=0)  # fmt: skip
    dataset = TokenRows(model.cfg.d_vocab, spec.context_size, args.tokens)
    workdir = Path(tempfile.mkdtemp(prefix="saecomp-bench-train-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    import mlflow

    mlflow.MlflowClient().search_experiments()  # the store's schema, created before anything is timed
    variants = [("sae_lens", sae_lens_alone), ("saecomp", ours)]
    if args.asynchronous_too:
        variants.append(("saecomp_asynchronous_logging", ours_asynchronous))
    sae_lens_alone(spec, model, dataset, workdir / "warm-up")  # kernels, allocator and caches before anything is timed
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for repeat in range(args.repeats):  # interleaved: a slow moment of a shared machine hits both alike
        for name, run in variants:
            synchronize(args.device)
            started = time.perf_counter()
            run(spec, model, dataset, workdir / f"{name}-{repeat}")
            synchronize(args.device)
            times[name].append(time.perf_counter() - started)
            print(f"{name}: {args.tokens / times[name][-1]:,.0f} tokens/s", flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = median["sae_lens"] / median["saecomp"]  # tokens/s ours over theirs
    print(f"shape={args.shape} device={args.device} hook=blocks.{layer}.{args.hook} d_sae={args.expansion}x tokens={args.tokens} "
          f"batch={args.batch_size_tokens} threads={torch.get_num_threads()}")  # fmt: skip
    for name in median:
        print(f"{name}: {args.tokens / median[name]:,.0f} tokens/s (median of {args.repeats})")
    print(f"saecomp / SAELens tokens per second: {ratio:.3f} (goal >= 0.95)")
    if args.asynchronous_too:
        print(f"with asynchronous logging: {median['sae_lens'] / median['saecomp_asynchronous_logging']:.3f}")
    write_json(
        args.json,
        {
            "benchmark": "train_sae",
            "shape": args.shape,
            "hook": f"blocks.{layer}.{args.hook}",
            "device": args.device,
            "tokens": args.tokens,
            "batch_size_tokens": args.batch_size_tokens,
            "d_sae": args.expansion * model.cfg.d_model,
            "seconds": times,
            "median_seconds": median,
            "tokens_per_second_ratio": ratio,
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
