"""The experiment files' pretrained SAE releases as checkpoints in a Hugging Face cache: for a release and sae_id,
SAELens's own registry names the repository and the path in it, and the release's loader (SAELens's format,
`connor_rob_hook_z`, `gemma_2`) names the files it reads there. This writes those files, at the shapes the real
releases have (``../shared/GUIDE.md`` §4), with random weights, where `hf_hub_download` finds them offline.

What is ours: the weights (random) and the contents of the configuration files, which carry the facts the GUIDE
records (architecture, widths, k, the input normalisation, the hook) in the format each loader parses: SAELens's
format as SAELens before 6.0 wrote it (its loader converts it with `handle_pre_6_0_config`), the attention SAEs'
`_cfg.json` with the keys `get_connor_rob_hook_z_config_from_hf` reads, and Gemma Scope's `params.npz` arrays (its
loader takes the configuration from the repository and path names alone)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SNAPSHOT = "fedcba9876543210fedcba9876543210fedcba98"


@dataclass(frozen=True)
class Release:
    """What a release's SAE is (GUIDE §4), as the test expects SAELens to load it."""

    architecture: str
    d_in: int
    d_sae: int
    normalize_activations: str
    hook: str  # the hook at a layer, with {layer}
    k: int | None = None


RELEASES = {
    "gpt2-small-resid-post-v5-32k": Release("topk", 768, 32768, "layer_norm", "blocks.{layer}.hook_resid_post", k=32),
    "gpt2-small-mlp-out-v5-32k": Release("topk", 768, 32768, "layer_norm", "blocks.{layer}.hook_mlp_out", k=32),
    "gpt2-small-hook-z-kk": Release("standard", 768, 24576, "none", "blocks.{layer}.attn.hook_z"),
    "gemma-scope-2b-pt-res-canonical": Release("jumprelu", 2304, 16384, "none", "blocks.{layer}.hook_resid_post"),
    "gemma-scope-2b-pt-mlp-canonical": Release("jumprelu", 2304, 16384, "none", "blocks.{layer}.hook_mlp_out"),
    "gemma-scope-2b-pt-att-canonical": Release("jumprelu", 2048, 16384, "none", "blocks.{layer}.attn.hook_z"),
}


def snapshot_of(cache: Path, repo_id: str) -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return repo / "snapshots" / SNAPSHOT


def random_weights(release: Release, seed: int) -> dict[str, torch.Tensor]:
    """SAELens's parameter names and layout: W_enc [d_in, d_sae], W_dec [d_sae, d_in]; a JumpReLU threshold."""
    generator = torch.Generator().manual_seed(seed)
    d_in, d_sae = release.d_in, release.d_sae
    weights = {
        "W_enc": torch.randn(d_in, d_sae, generator=generator) / d_in**0.5,
        "W_dec": torch.randn(d_sae, d_in, generator=generator) / d_sae**0.5,
        "b_enc": torch.randn(d_sae, generator=generator) * 0.01,
        "b_dec": torch.randn(d_in, generator=generator) * 0.01,
    }
    if release.architecture == "jumprelu":
        weights["threshold"] = torch.rand(d_sae, generator=generator) * 0.05
    return weights


def write_release(cache: Path, name: str, sae_id: str, layer: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write release ``name``'s ``sae_id`` (at ``layer``) into the Hugging Face cache at ``cache`` as its loader
    reads it; returns the weights written, in SAELens's names and layout."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return write_release_files(snapshot_of(cache, get_pretrained_saes_directory()[name].repo_id), name, sae_id, layer, seed)


def write_release_files(root: Path, name: str, sae_id: str, layer: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The files of release ``name``'s ``sae_id`` under ``root``, the root of its repository (a snapshot in a
    cache, or a folder to upload); returns the weights written."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    from safetensors.torch import save_file

    entry = get_pretrained_saes_directory()[name]
    path, release = entry.saes_map[sae_id], RELEASES[name]
    hook = release.hook.format(layer=layer)
    weights = random_weights(release, seed)
    if entry.conversion_func is None:  # SAELens's own format, written by SAELens < 6
        folder = root / path
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {
            "model_name": "gpt2-small",
            "hook_point": hook,
            "hook_point_layer": layer,
            "hook_point_head_index": None,
            "d_in": release.d_in,
            "d_sae": release.d_sae,
            "activation_fn_str": release.architecture,
            "activation_fn_kwargs": {"k": release.k},
            "normalize_activations": release.normalize_activations,
            "context_size": 64,
            "dtype": "torch.float32",
            "device": "cpu",
            "sae_lens_training_version": None,
        }
        (folder / "cfg.json").write_text(json.dumps(cfg))
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "sae_weights.safetensors"))
    elif entry.conversion_func == "connor_rob_hook_z":  # a torch state dict and its config beside it
        root.mkdir(parents=True, exist_ok=True)
        torch.save(weights, root / path)
        cfg = {"act_name": hook, "act_size": release.d_in, "dict_size": release.d_sae, "layer": layer, "site": "z"}
        (root / (path.split(".pt")[0] + "_cfg.json")).write_text(json.dumps(cfg))
    elif entry.conversion_func == "gemma_2":  # Gemma Scope: params.npz under the path, its arrays named as SAELens's
        folder = root / path
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "params.npz", **{k: v.numpy() for k, v in weights.items()})
    else:
        raise ValueError(f"no writer for {name}'s loader {entry.conversion_func!r}")
    return weights


def wide_hf_model(architecture: str):
    """Random weights at the real model's widths, two blocks, a 300-token vocabulary."""
    from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config

    torch.manual_seed(0)
    if architecture == "gpt2":  # GPT-2 small: d_model 768, 12 heads of 64
        config = GPT2Config(
            vocab_size=300, n_positions=64, n_ctx=64, n_embd=768, n_layer=2, n_head=12, n_inner=3072, architectures=["GPT2LMHeadModel"]
        )
    else:  # Gemma-2-2B: d_model 2304, 8 query heads of 256 over 4 key-value heads; a narrower MLP than its 9216
        config = Gemma2Config(
            vocab_size=300, hidden_size=2304, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, head_dim=256, max_position_embeddings=64, sliding_window=32, query_pre_attn_scalar=256,
            architectures=["Gemma2ForCausalLM"], attn_implementation="eager",
        )  # fmt: skip
    return AutoModelForCausalLM.from_config(config)
