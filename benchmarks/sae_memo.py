"""SCR's and TPP's ablation loop with and without `evaluate.RepeatedInputCache` (the SAE memo), at the real SAEs' shapes.

SAEBench's `ablated_precomputed_activations` is called once per ablated class and per n (21 times for SCR, 35 for
TPP), each time encoding the same test activations. This runs it that many times over one set of test activations,
memo on and off, interleaved, and checks the outputs are bit-identical; the SAEs are those the experiment files meet
(GPT-2 small's standard layer-norm SAE, a TopK SAE, Gemma Scope's JumpReLU), random weights.

    python benchmarks/sae_memo.py [--device cuda] [--shape gpt2-small|gemma-2-2b|tiny] [--calls 21] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, timed, write_json  # noqa: E402

# (d_in, d_sae, architecture, normalisation) of the SAEs the experiment files load, per model shape.
SAES = {
    "tiny": [(128, 1024, "topk", "none"), (128, 1024, "standard", "layer_norm"), (128, 1024, "jumprelu", "none")],
    "gpt2-small": [(768, 24576, "standard", "layer_norm"), (768, 24576, "topk", "none")],
    "gemma-2-2b": [(2304, 16384, "jumprelu", "none")],
}


def random_sae(d_in: int, d_sae: int, architecture: str, norm: str, device: str, seed: int = 0, k: int = 32):
    from sae_lens import SAE

    extra = {"k": k} if architecture == "topk" else {}
    sae = SAE.from_dict(
        {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "normalize_activations": norm,
         "metadata": {"hook_name": "blocks.6.hook_resid_post"}, "device": device, **extra}
    )  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_((torch.randn(p.shape, generator=generator) * (d_in**-0.5)).to(device))
            if name == "threshold":
                p.abs_()
    return sae.to(device)


def loop(sae, acts: torch.Tensor, masks: list[torch.Tensor], batch: int, budget: int) -> list[torch.Tensor]:
    """SAEBench's ablation, once per mask, as SCR calls it (memo budget ``budget``; 0: no memo)."""
    from sae_bench.evals.scr_and_tpp.main import ablated_precomputed_activations

    from saecomp import evaluate

    with torch.no_grad(), evaluate.repeated_inputs_cached(sae, budget_bytes=budget):
        return [ablated_precomputed_activations(acts, sae, mask, batch) for mask in masks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="tiny", choices=sorted(SAES))
    parser.add_argument("--texts", type=int, default=None, help="test texts (SAEBench: 1000 on GPU; default 80 on CPU)")
    parser.add_argument("--context", type=int, default=128, help="tokens per text (SAEBench's 128)")
    parser.add_argument("--calls", type=int, default=21, help="ablation calls (SCR: 21, TPP: 35)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()

    from saecomp import evaluate

    texts = args.texts or (1000 if args.device.startswith("cuda") else 80)
    batch = 125  # SAEBench's llm_batch_size for these models
    rows = []
    for d_in, d_sae, architecture, norm in SAES[args.shape]:
        sae = random_sae(d_in, d_sae, architecture, norm, args.device)
        acts = torch.randn(texts, args.context, d_in, generator=torch.Generator().manual_seed(1)).to(args.device) * 3 + 0.5
        masks = [torch.rand(d_sae, generator=torch.Generator().manual_seed(10 + i)) < 0.002 for i in range(args.calls)]
        masks = [m.to(args.device) for m in masks]

        budget = evaluate.memo_budget(args.device)
        memoised, plain = loop(sae, acts, masks, batch, budget), loop(sae, acts, masks, batch, 0)  # warm-up, agreement
        identical = all(torch.equal(a, b) for a, b in zip(memoised, plain, strict=True))
        del memoised, plain
        times = {"memo": [], "plain": []}
        for _ in range(args.repeats):  # interleaved
            times["memo"].append(timed(functools.partial(loop, sae, acts, masks, batch, budget), args.device))
            times["plain"].append(timed(functools.partial(loop, sae, acts, masks, batch, 0), args.device))
        memo, plain_s = statistics.median(times["memo"]), statistics.median(times["plain"])
        row = {"sae": f"{architecture} {norm} {d_in}x{d_sae}", "texts": texts, "context": args.context, "calls": args.calls,
               "memo_budget_bytes": budget, "memo_s": memo, "plain_s": plain_s, "speedup": plain_s / memo,
               "bit_identical": identical, "times": times}  # fmt: skip
        rows.append(row)
        print(f"| {row['sae']} | {texts} x {args.context} tokens, {args.calls} calls | {memo:.3f} s | {plain_s:.3f} s | "
              f"{row['speedup']:.2f}x | {'identical' if identical else '**DIFFERENT**'} |", flush=True)  # fmt: skip
        del sae, acts
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    write_json(args.json, {"machine": machine(), "device": args.device, "shape": args.shape, "rows": rows})
    if not all(row["bit_identical"] for row in rows):
        raise SystemExit("the memo changed an output")


if __name__ == "__main__":
    main()
