"""The SAE path on a GPU: the same random model and SAEs through saecomp's activation cache, SAE statistics,
pruning sweep and spliced evaluation on the CPU (float32) and on ``--device`` (float32 and bfloat16), side by side.

    python benchmarks/device_check.py --device cuda
    python benchmarks/device_check.py --device cuda --shape gemma-2-2b --no-cpu   # float32 on the device is the reference

Not a speed benchmark: it shows that `device` and `dtype` reach every tensor of the SAE steps' library code
(no CPU/GPU mix-ups, a float32 SAE spliced into a bfloat16 model) and how far the metrics move with the device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from sae_lens import SAE, StandardSAEConfig, TopKSAEConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<this>.py` finds `benchmarks`

from benchmarks.common import build_model, machine, write_json
from saecomp.prune_sae import cache_activations, sae_statistics, sweep
from saecomp.saes import evaluate_sae

METRICS = ("mse", "explained_variance", "cossim", "l0", "ce_loss_with_sae", "ce_loss_without_sae")


def saes(model) -> dict[str, SAE]:
    torch.manual_seed(1)
    layer = model.cfg.n_layers // 2
    topk = SAE.from_dict(TopKSAEConfig(d_in=model.cfg.d_model, d_sae=4 * model.cfg.d_model, k=16).to_dict())
    topk.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    z_width = model.cfg.n_heads * model.cfg.d_head
    standard = SAE.from_dict(
        StandardSAEConfig(d_in=z_width, d_sae=4 * z_width, normalize_activations="layer_norm", reshape_activations="hook_z").to_dict()
    )
    standard.cfg.metadata.hook_name = f"blocks.{layer}.attn.hook_z"
    return {"topk resid_post": topk, "standard layer_norm hook_z": standard}


def run(shape: str, device: str, dtype: str, tokens: torch.Tensor, bos: int) -> dict:
    model = build_model(shape, device, dtype)
    tokens = tokens.to(device)
    out = {}
    for name, sae in saes(model).items():
        sae = sae.to(device)
        hook = sae.cfg.metadata.hook_name
        cache = cache_activations(model, hook, tokens, special_ids={bos})
        stats = sae_statistics(sae, cache.ordinary_activations())
        swept = sweep(model, sae, stats, cache, [0.25, 0.5])
        out[name] = {
            "dense": evaluate_sae(model, sae, tokens, special_ids={bos}),
            **{f"pruned{int(level * 100)}": swept.metrics[level] for level in swept.levels},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="tiny", choices=["tiny", "gpt2-small", "gemma-2-2b"])
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU reference (Gemma-2-2B in float32 on CPU takes minutes)")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    vocab = build_model(args.shape).cfg.d_vocab if args.shape != "gemma-2-2b" else 256000
    bos = 2 if args.shape == "gemma-2-2b" else 0  # Gemma-2's <bos> is id 2; the GPT-2 shapes use 0 here
    tokens = torch.randint(3, vocab, (16, 64))
    tokens[:, 0] = bos  # a BOS that is never spliced
    cases = ([] if args.no_cpu else [("cpu", "float32")]) + [(args.device, "float32"), (args.device, "bfloat16")]
    print(f"{'case':<36} {'sae':<28} {'variant':<9} " + " ".join(f"{m:>14}" for m in METRICS))
    results = {}
    for device, dtype in cases:
        case = f"{device} {dtype}"
        results[case] = run(args.shape, device, dtype, tokens, bos)
        for sae_name, variants in results[case].items():
            for variant, metrics in variants.items():
                print(f"{case:<36} {sae_name:<28} {variant:<9} " + " ".join(f"{metrics[m]:14.6f}" for m in METRICS), flush=True)
        write_json(args.json, {"shape": args.shape, "results": results, "machine": machine()})  # after every case


if __name__ == "__main__":
    main()
