"""Loading base models into TransformerLens from Hugging Face weights, and exporting them back.

One path serves the real models (`gpt2`, `google/gemma-2-2b`, fetched through the Hugging Face cache)
and the tiny world's checkpoints alike: both are Hugging Face checkpoints, read with `transformers`
and converted with TransformerLens's own weight converters **without weight processing** (no LayerNorm
folding, no centring), so TransformerLens weights are the Hugging Face weights, transposed. That is the
space WANDA must prune in (GUIDE §3: folding LayerNorm changes the WANDA masks) and the space in which
SAELens training and Gemma Scope read activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import einops
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import loading_from_pretrained as tl_loading
from transformer_lens.pretrained.weight_conversions import convert_gemma_weights, convert_gpt2_weights

from saecomp.names import (  # noqa: F401  (re-exported: their home, free of torch, is names.py)
    HUB_MODELS,
    KNOWN_MODELS,
    SUPPORTED_ARCHITECTURES,
    TINY_MODELS,
    ModelDims,
    check_device,
    check_model_name,
)

# Keyword arguments that reproduce our loading through `HookedTransformer.from_pretrained`; written
# into every SAE's metadata so that SAELens/SAEBench load the model the way we did.
NO_PROCESSING_KWARGS = {
    "fold_ln": False,
    "center_writing_weights": False,
    "center_unembed": False,
    "fold_value_biases": False,
}


@dataclass
class LoadedModel:
    """A base model in both libraries: TransformerLens to hook and prune, Hugging Face to export."""

    name: str
    tl: HookedTransformer
    hf: torch.nn.Module
    tokenizer: object

    @property
    def architecture(self) -> str:
        return self.hf.config.architectures[0]


def load_hf(name_or_dir: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a Hub name (read through the HF cache, so `HF_HUB_OFFLINE=1` works
    once the files are cached) or from a local checkpoint directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(str(name_or_dir), dtype=dtype)
    arch = hf_model.config.architectures[0] if hf_model.config.architectures else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} of {name_or_dir} is not supported; valid: {SUPPORTED_ARCHITECTURES}")
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_dir))
    hf_model.eval()
    return hf_model, tokenizer


def _gemma2_tl_config(hf_config, dtype: torch.dtype) -> HookedTransformerConfig:
    # TransformerLens hard-codes Gemma-2 configs by official name (GUIDE §3), so we apply its own
    # `google/gemma-2-2b` recipe with the dimensions of whatever checkpoint we were given.
    layer_types = getattr(hf_config, "layer_types", None) or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(hf_config.num_hidden_layers)
    ]
    return HookedTransformerConfig(
        d_model=hf_config.hidden_size,
        d_head=hf_config.head_dim,
        n_heads=hf_config.num_attention_heads,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=hf_config.max_position_embeddings,
        eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_activation,
        initializer_range=hf_config.initializer_range,
        normalization_type="RMS",
        rotary_base=tl_loading._get_rope_theta(hf_config),
        rotary_dim=hf_config.head_dim,
        positional_embedding_type="rotary",
        use_attn_scale=True,
        attn_scale=float(hf_config.query_pre_attn_scalar) ** 0.5,
        n_key_value_heads=hf_config.num_key_value_heads,
        window_size=hf_config.sliding_window,
        use_local_attn=True,
        attn_types=["local" if t == "sliding_attention" else "global" for t in layer_types],
        attn_scores_soft_cap=hf_config.attn_logit_softcapping or -1.0,
        output_logits_soft_cap=hf_config.final_logit_softcapping or -1.0,
        gated_mlp=True,
        final_rms=True,
        use_normalization_before_and_after=True,
        original_architecture="Gemma2ForCausalLM",
        tokenizer_prepends_bos=True,
        default_prepend_bos=True,
        dtype=dtype,
    )


def recorded_processing(hf_model) -> dict[str, bool] | None:
    """The TransformerLens processing a checkpoint's weights already carry (written by `save_checkpoint`), or
    None: processing them again would move weights, and fill the zeros of a pruned model."""
    recorded = getattr(hf_model.config, "saecomp_processing", None)
    return dict(recorded) if recorded and any(recorded.values()) else None


def processing_that_preserves(hf_config, processing: dict[str, bool] | None) -> dict[str, bool] | None:
    """``processing`` less what would change this model's outputs, by TransformerLens's own rules in `from_pretrained`
    (which `load_and_process_state_dict`, called directly, does not apply): no unembedding centring under a logit soft
    cap (Gemma-2: tanh is not shift-invariant; an SAE whose metadata names no processing, as Gemma Scope's, would
    otherwise be measured on another model), no LayerNorm folding or writing-weight centring for post-norm models."""
    if not processing:
        return processing
    from transformer_lens.utilities.activation_functions import softcap_enabled
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    kept = dict(processing)
    if softcap_enabled(getattr(hf_config, "final_logit_softcapping", None)):
        kept["center_unembed"] = False
    if hf_config.architectures[0] in POST_NORM_ARCHITECTURES:
        kept.update(fold_ln=False, center_writing_weights=False)
    return kept


def hf_to_tl(hf_model, tokenizer, name_or_dir: str | Path, processing: dict[str, bool] | None = None) -> HookedTransformer:
    """A TransformerLens model holding exactly the Hugging Face weights (no processing), or processed as
    ``processing`` asks (keys of :data:`NO_PROCESSING_KWARGS`): what an SAE's metadata may require.
    Processing is function-preserving but moves individual weights, so pruning never happens on it (except
    `wanda-seed` on GPT-2, which reproduces the paper's code). A checkpoint whose weights were saved processed
    is loaded as it is, whatever is asked."""
    if recorded_processing(hf_model) is not None:
        processing = None
    arch = hf_model.config.architectures[0]
    dtype = next(hf_model.parameters()).dtype
    processing = processing_that_preserves(hf_model.config, processing)
    fold_ln = bool((processing or {}).get("fold_ln", False))
    if arch == "GPT2LMHeadModel":
        # TransformerLens reads the GPT-2 config itself (Hub name through the HF cache, or a local dir).
        cfg = tl_loading.get_pretrained_model_config(str(name_or_dir), fold_ln=fold_ln, dtype=dtype)
        # ...which assumes d_mlp = 4 * d_model; a GPT-2 checkpoint may say otherwise (n_inner).
        cfg.d_mlp = hf_model.config.n_inner or 4 * hf_model.config.n_embd
        state_dict = convert_gpt2_weights(hf_model, cfg)
    else:
        cfg = _gemma2_tl_config(hf_model.config, dtype)
        if fold_ln:
            cfg.normalization_type = "RMSPre"  # as TransformerLens's own loader does when folding
        state_dict = convert_gemma_weights(hf_model, cfg)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        {k: v.detach().clone() for k, v in state_dict.items()},
        **{**NO_PROCESSING_KWARGS, **(processing or {})},
        refactor_factored_attn_matrices=False,
    )
    model.eval()
    return model


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(
    name: str,
    checkpoint_dir: str | Path | None = None,
    dtype: torch.dtype | str = torch.float32,
    processing: dict | None = None,
    device: str = "cpu",
) -> LoadedModel:
    """Load ``name`` (a Hub name, or a checkpoint at ``checkpoint_dir``: a tiny model or a pruned one) in ``dtype``;
    the TransformerLens model computes on ``device``, the Hugging Face one (kept for export) stays on the CPU."""
    dtype = TORCH_DTYPES[dtype] if isinstance(dtype, str) else dtype
    check_device(device)
    source = checkpoint_dir if checkpoint_dir is not None else name
    hf_model, tokenizer = load_hf(source, dtype)
    tl = hf_to_tl(hf_model, tokenizer, source, processing)
    tl.cfg.device = device  # always: TransformerLens defaults it to cuda wherever a GPU exists
    tl = tl.to(device, print_details=False)
    return LoadedModel(name=name, tl=tl, hf=hf_model, tokenizer=tokenizer)


# --- the prunable matrices, and their way back into Hugging Face layout ---------------------------


def prunable_weights(model: HookedTransformer, layer: int) -> dict[str, torch.nn.Parameter]:
    """The matrices of one block that pruning may touch, in TransformerLens layout ``[.., in, out]``.

    Grouped-query models store K/V as ``_W_K``/``_W_V`` ``[n_kv_heads, d_model, d_head]``; ``W_K`` is
    a derived, repeated view that must not be pruned.
    """
    block = model.blocks[layer]
    attn, mlp = block.attn, block.mlp
    weights = {"W_Q": attn.W_Q}
    if hasattr(attn, "_W_K"):
        weights.update({"W_K": attn._W_K, "W_V": attn._W_V})
    else:
        weights.update({"W_K": attn.W_K, "W_V": attn.W_V})
    weights["W_O"] = attn.W_O
    weights["W_in"] = mlp.W_in
    if model.cfg.gated_mlp:
        weights["W_gate"] = mlp.W_gate
    weights["W_out"] = mlp.W_out
    return weights


def as_matrix(name: str, weight: torch.Tensor) -> torch.Tensor:
    """View a TransformerLens weight as one matrix ``[n_in, n_out]`` whose columns are output units.

    W_Q/K/V ``[heads, d_model, d_head]`` -> ``[d_model, heads*d_head]``;
    W_O ``[heads, d_head, d_model]`` -> ``[heads*d_head, d_model]`` (the input spans all heads);
    MLP matrices are already ``[in, out]``.
    """
    if name in ("W_Q", "W_K", "W_V"):
        return einops.rearrange(weight, "n m h -> m (n h)")
    if name == "W_O":
        return einops.rearrange(weight, "n h m -> (n h) m")
    return weight


def from_matrix(name: str, matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`as_matrix`."""
    if name in ("W_Q", "W_K", "W_V"):
        return einops.rearrange(matrix, "m (n h) -> n m h", n=like.shape[0])
    if name == "W_O":
        return einops.rearrange(matrix, "(n h) m -> n h m", n=like.shape[0])
    return matrix


@torch.no_grad()
def export_to_hf(tl_model: HookedTransformer, hf_model) -> None:
    """Write the prunable matrices of ``tl_model`` into ``hf_model`` in place.

    Only matrices pruning touches are written; everything else is untouched in both, so the HF model
    computes what the TransformerLens model computes.
    """
    arch = hf_model.config.architectures[0]
    d_model = tl_model.cfg.d_model
    for layer in range(tl_model.cfg.n_layers):
        w = {name: p.detach() for name, p in prunable_weights(tl_model, layer).items()}
        if arch == "GPT2LMHeadModel":
            # Conv1D weights are [in, out]; c_attn's output is concat([q, k, v]).
            block = hf_model.transformer.h[layer]
            qkv = torch.cat([as_matrix(n, w[n]) for n in ("W_Q", "W_K", "W_V")], dim=1)
            assert qkv.shape == (d_model, 3 * d_model)
            block.attn.c_attn.weight.copy_(qkv)
            block.attn.c_proj.weight.copy_(as_matrix("W_O", w["W_O"]))
            block.mlp.c_fc.weight.copy_(w["W_in"])
            block.mlp.c_proj.weight.copy_(w["W_out"])
        else:
            # nn.Linear weights are [out, in].
            block = hf_model.model.layers[layer]
            block.self_attn.q_proj.weight.copy_(as_matrix("W_Q", w["W_Q"]).T)
            block.self_attn.k_proj.weight.copy_(as_matrix("W_K", w["W_K"]).T)
            block.self_attn.v_proj.weight.copy_(as_matrix("W_V", w["W_V"]).T)
            block.self_attn.o_proj.weight.copy_(as_matrix("W_O", w["W_O"]).T)
            block.mlp.up_proj.weight.copy_(w["W_in"].T)
            block.mlp.gate_proj.weight.copy_(w["W_gate"].T)
            block.mlp.down_proj.weight.copy_(w["W_out"].T)


@torch.no_grad()
def export_processed_gpt2(tl_model: HookedTransformer, hf_model) -> None:
    """Write a GPT-2 TransformerLens model loaded *with* processing (LayerNorm folded into the next weights,
    writing weights centred, value biases folded into b_O) into ``hf_model`` in place: the blocks' layer norms
    become the identity affine, every block weight and bias and the embeddings take the processed values, and
    the unembedding keeps the original (untied) weights behind the unchanged final layer norm, which computes
    the same log-probabilities (centring only shifts the residual stream by its mean, which ln_f removes)."""
    hf_model.lm_head.weight = torch.nn.Parameter(hf_model.transformer.wte.weight.detach().clone())
    hf_model.config.tie_word_embeddings = False
    flat = lambda b: b.reshape(-1)  # noqa: E731  [heads, d_head] -> [heads*d_head]
    hf_model.transformer.wte.weight.copy_(tl_model.embed.W_E)
    hf_model.transformer.wpe.weight.copy_(tl_model.pos_embed.W_pos)
    for layer in range(tl_model.cfg.n_layers):
        tl_block, block = tl_model.blocks[layer], hf_model.transformer.h[layer]
        attn, mlp = tl_block.attn, tl_block.mlp
        for norm in (block.ln_1, block.ln_2):
            norm.weight.fill_(1.0)
            norm.bias.zero_()
        block.attn.c_attn.weight.copy_(torch.cat([as_matrix(n, getattr(attn, n)) for n in ("W_Q", "W_K", "W_V")], dim=1))
        block.attn.c_attn.bias.copy_(torch.cat([flat(attn.b_Q), flat(attn.b_K), flat(attn.b_V)]))
        block.attn.c_proj.weight.copy_(as_matrix("W_O", attn.W_O))
        block.attn.c_proj.bias.copy_(attn.b_O)
        block.mlp.c_fc.weight.copy_(mlp.W_in)
        block.mlp.c_fc.bias.copy_(mlp.b_in)
        block.mlp.c_proj.weight.copy_(mlp.W_out)
        block.mlp.c_proj.bias.copy_(mlp.b_out)


def save_checkpoint(loaded: LoadedModel, directory: str | Path, processing: dict[str, bool] | None = None) -> Path:
    """Save the (possibly pruned) model as a Hugging Face checkpoint with its tokenizer. ``processing``: the
    TransformerLens processing ``loaded.tl`` was loaded with; it is recorded in ``config.json``
    (``saecomp_processing``) so that loading never processes the weights again."""
    directory = Path(directory)
    if processing and any(processing.values()):
        if loaded.architecture != "GPT2LMHeadModel":
            raise ValueError(f"saving processed weights is implemented for GPT-2 only, not {loaded.architecture}")
        export_processed_gpt2(loaded.tl, loaded.hf)
        loaded.hf.config.saecomp_processing = dict(processing)
        loaded.hf.save_pretrained(directory, safe_serialization=True)
        loaded.tokenizer.save_pretrained(directory)
        return directory
    export_to_hf(loaded.tl, loaded.hf)
    loaded.hf.save_pretrained(directory, safe_serialization=True)
    loaded.tokenizer.save_pretrained(directory)
    return directory
