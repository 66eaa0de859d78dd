"""Block-wise batched WANDA (saecomp) vs. the reference implementation's style: per-sample forward passes
with hooks on every linear map, one layer at a time, each layer re-running the model up to it.

    python benchmarks/wanda.py                        # GPT-2-small-shaped model, random weights, CPU
    python benchmarks/wanda.py --shape tiny

Both produce WANDA masks; this measures wall time side by side in one process and prints the ratio (and
how many mask entries differ: near-ties can flip between accumulation orders).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<this>.py` finds `benchmarks`

from benchmarks.common import build_model
from saecomp.models import as_matrix, from_matrix, prunable_weights
from saecomp.prune_llm import INPUT_OF, PruneSpec, _input_sources, prune_model, wanda_mask


@torch.no_grad()
def reference_style(model: HookedTransformer, tokens: torch.Tensor, sparsity: float) -> None:
    """As the WANDA reference loops: for each layer, one forward per calibration sample, hooks add
    ``||x||^2`` per input, then prune; the model runs from the embeddings every time."""
    for layer in range(model.cfg.n_layers):
        block = model.blocks[layer]
        sumsq: dict[str, torch.Tensor] = {}
        handles = []
        for key, module in _input_sources(block).items():

            def hook(_m, _i, out, key=key, sumsq=sumsq):
                x = out.reshape(-1, out.shape[-2] * out.shape[-1]) if key == "z" else out.reshape(-1, out.shape[-1])
                sumsq[key] = sumsq.get(key, 0) + x.double().pow(2).sum(0)

            handles.append(module.register_forward_hook(hook))
        for sample in tokens:
            model(sample[None], stop_at_layer=layer + 1)
        for h in handles:
            h.remove()
        for name, w in prunable_weights(model, layer).items():
            matrix = as_matrix(name, w.data)
            mask = wanda_mask(matrix, sumsq[INPUT_OF[name]].sqrt(), sparsity)
            w.data.copy_(from_matrix(name, matrix.masked_fill(mask, 0), w.data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["tiny", "gpt2-small"], default="gpt2-small")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    ours, reference = build_model(args.shape), build_model(args.shape)  # the same seed: the same weights
    cfg = ours.cfg
    reference.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, cfg.d_vocab, (args.sequences, min(args.seq_len, cfg.n_ctx)))

    started = time.perf_counter()
    prune_model(ours, tokens, PruneSpec("wanda", 0.5), batch_size=args.sequences)
    ours_seconds = time.perf_counter() - started
    started = time.perf_counter()
    reference_style(reference, tokens, 0.5)
    reference_seconds = time.perf_counter() - started

    differ = total = 0
    for layer in range(cfg.n_layers):
        a, b = prunable_weights(ours, layer), prunable_weights(reference, layer)
        for name in a:
            differ += int(((a[name] == 0) != (b[name] == 0)).sum())
            total += a[name].numel()
    print(f"shape={args.shape} tokens={tokens.numel()} threads={torch.get_num_threads()}")
    print(f"saecomp (block-wise, batched): {ours_seconds:8.2f} s")
    print(f"reference style (per sample):  {reference_seconds:8.2f} s")
    print(f"speed-up: {reference_seconds / ours_seconds:.2f}x   mask entries that differ: {differ}/{total} ({differ / total:.2e})")


if __name__ == "__main__":
    main()
