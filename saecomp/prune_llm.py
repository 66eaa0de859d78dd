"""Pruning the language model: WANDA (unstructured and N:M), magnitude, and the paper's variant.

WANDA, exactly as Sun et al. (2023) define it (GUIDE §6): the score of weight i -> j is
``|W_ij| * ||X_i||_2`` with ``X_i`` input feature i over all calibration tokens; weights compete within
one output unit (all inputs feeding output j), and the lowest ``int(n_in * s)`` are zeroed (N:M: the N
lowest of every M consecutive inputs). Blocks are pruned in order, each scored from the outputs of the
already-pruned blocks before it; within a block all matrices are scored from one dense pass.

TransformerLens stores weights ``[.., in, out]`` (the model computes ``x @ W``), so an output group is
a *column* of :func:`saecomp.models.as_matrix` and we sort along dim 0.

``wanda-seed`` reproduces the published code of the paper (osu-srml/sae-compression), deviation by
deviation, so its numbers can be reproduced; see the README, "Differences from the paper's code".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformer_lens import HookedTransformer

from saecomp.models import as_matrix, from_matrix, prunable_weights
from saecomp.names import LLM_PRUNING_METHODS as METHODS  # noqa: E402  (torch-free there, for validation)

ATTENTION_MATRICES = ("W_Q", "W_K", "W_V", "W_O")


@dataclass(frozen=True)
class PruneSpec:
    """What to prune and how much."""

    method: str = "wanda"
    """`wanda`, `magnitude` or `wanda-seed` (the paper's code, for reproduction only)."""
    sparsity: float = 0.5
    """Fraction of each comparison group set to zero (unstructured)."""
    nm: tuple[int, int] | None = None
    """(N, M): zero the N lowest of every M consecutive inputs; overrides `sparsity` (= N/M)."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not valid; valid: {', '.join(METHODS)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity={self.sparsity} must lie in [0, 1)")
        if self.nm is not None:
            n, m = self.nm
            if not (0 < n < m):
                raise ValueError(f"nm={n}:{m} is not valid; N:M needs 0 < N < M, e.g. 2:4")
            if self.method == "wanda-seed":
                raise ValueError("nm is not valid with method=wanda-seed (the paper's code is unstructured)")

    @property
    def effective_sparsity(self) -> float:
        return self.nm[0] / self.nm[1] if self.nm else self.sparsity


@dataclass
class PruneReport:
    """What pruning actually did, measured on the weights afterwards."""

    sparsity_per_matrix: dict[str, float] = field(default_factory=dict)
    sparsity_actual: float = 0.0
    n_pruned_parameters: int = 0
    n_prunable_parameters: int = 0
    seconds: float = 0.0


def pruning_processing(method: str, architecture: str) -> dict[str, bool] | None:
    """The TransformerLens processing pruning happens under: none (Hugging Face weights), except `wanda-seed` on
    GPT-2, which prunes the LayerNorm-folded, centred weights the paper's code loads
    (`HookedSAETransformer.from_pretrained("gpt2-small")`; sae-compression gpt2-small/prune.py lines 139-140).
    For Gemma-2 (RMSNorm, no centring) folding scales whole input rows, which leaves the seed's row-wise
    rankings unchanged, so its weights stay as they are."""
    if method == "wanda-seed" and architecture == "GPT2LMHeadModel":
        from saecomp.saes import TL_DEFAULT_PROCESSING

        return dict(TL_DEFAULT_PROCESSING)
    return None


def check_nm_fits(nm: tuple[int, int] | None, dims) -> None:
    """N:M needs every pruned matrix's input size to be a multiple of M; ``dims``: a `ModelDims`."""
    if nm is None:
        return
    n, m = nm
    inputs = {"W_Q/W_K/W_V/W_in": dims.d_model, "W_O": dims.n_heads * dims.d_head, "W_out": dims.d_mlp}
    for names, size in inputs.items():
        if size % m:
            raise ValueError(f"nm={n}:{m} is not valid for this model: {names} have {size} inputs, not a multiple of {m}")


# --- masks: pure functions of a weight matrix [in, out] and statistics ------------------------------


def lowest_mask(score: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """True at the ``k`` lowest entries along ``dim``, ties broken by index: exactly the first ``k`` of a stable
    sort, found in linear time. Everything below the k-th smallest value is in; of the entries equal to it,
    the lowest-indexed ones fill what is left. (A full stable sort was 30% of WANDA's CPU time; ``topk`` alone
    breaks ties differently.)"""
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    rows = score.movedim(dim, -1).contiguous()  # [.., n]: selection runs along contiguous memory
    kth = torch.kthvalue(rows, k, dim=-1, keepdim=True).values
    below = rows < kth
    tied = rows == kth
    still_needed = k - below.sum(-1, keepdim=True)
    return (below | (tied & (tied.cumsum(-1) <= still_needed))).movedim(-1, dim)


def group_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """True where a weight is pruned: the lowest scores within each column (output unit).

    ``score``: ``[n_in, n_out]``. Unstructured: exactly ``int(n_in * sparsity)`` per column. N:M: the
    N lowest of every M consecutive rows of each column. Ties break by input index (stable sort), as
    in the reference implementation.
    """
    n_in, n_out = score.shape
    if nm is None:
        return lowest_mask(score, int(n_in * sparsity), dim=0)
    n, m = nm
    if n_in % m:
        raise ValueError(f"N:M needs the input size {n_in} to be a multiple of M={m}")
    blocks = score.reshape(n_in // m, m, n_out)  # [n_blocks, M, n_out]
    return lowest_mask(blocks, n, dim=1).reshape(n_in, n_out)


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float, nm=None) -> torch.Tensor:
    """WANDA: score ``|W_ij| * ||X_i||``; ``weight [in, out]``, ``input_norm [in]``. Scores are float64, in
    which each product of two float32 values is exact."""
    if nm is not None:
        score = weight.detach().abs().to(torch.float64) * input_norm.to(torch.float64)[:, None]
        return group_mask(score, sparsity, nm)
    # Unstructured: score laid out [out, in], so that each output unit's competitors are contiguous.
    n_in, n_out = weight.shape
    score_t = torch.empty((n_out, n_in), dtype=torch.float64, device=weight.device)
    score_t.copy_(weight.detach().T).abs_().mul_(input_norm.to(torch.float64))
    return lowest_mask(score_t, int(n_in * sparsity), dim=-1).T


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm=None) -> torch.Tensor:
    """Magnitude baseline: one threshold per matrix (the lowest ``int(numel * s)`` |W|); N:M by |W|."""
    score = weight.detach().abs().to(torch.float64)
    if nm is not None:
        return group_mask(score, sparsity, nm)
    return lowest_mask(score.flatten(), int(score.numel() * sparsity), dim=0).reshape(score.shape)


def seed_mask(weight: torch.Tensor, output_norm: torch.Tensor, sparsity: float, group_size: int | None = None) -> torch.Tensor:
    """The paper's code: score ``|W_ij| * ||Y_j||`` by the layer's *output* norm, and compete within an *input
    row* (it sorts dim 1 of TransformerLens's ``[in, out]`` weights). ``weight [in, out]``; with ``group_size``
    a row is cut into groups of that many consecutive outputs (W_Q/K/V: one group per head, ``int(d_head * s)``
    zeros each, as the seed loops over heads: sae-compression gpt2-small/prune.py lines 56-63, 83-89)."""
    n_in, n_out = weight.shape
    group_size = group_size or n_out
    score = weight.detach().abs().to(torch.float64) * output_norm.to(torch.float64)[None, :]
    groups = score.reshape(n_in * (n_out // group_size), group_size)  # [row x group, group_size]
    return group_mask(groups.T, sparsity).T.reshape(n_in, n_out)


# --- calibration statistics of one block ------------------------------------------------------------


def _input_sources(block) -> dict[str, torch.nn.Module]:
    """The module whose forward output is each matrix's true input (GUIDE §3: with an unfolded
    LayerNorm, ``ln1.hook_normalized`` fires before the affine, so we hook the norm module itself)."""
    return {"attn_in": block.ln1, "z": block.attn.hook_z, "mlp_in": block.ln2, "post": block.mlp.hook_post}


INPUT_OF = {
    "W_Q": "attn_in",
    "W_K": "attn_in",
    "W_V": "attn_in",
    "W_O": "z",
    "W_in": "mlp_in",
    "W_gate": "mlp_in",
    "W_out": "post",
}


# The hooks whose outputs the paper's code scores each matrix by (sae-compression gpt2-small/prune.py lines
# 66-73, gemma2b/prune.py lines 40-49). For Gemma-2, hook_attn_out comes after ln1_post.
SEED_OUTPUT_HOOK = {"W_Q": "attn.hook_q", "W_K": "attn.hook_k", "W_V": "attn.hook_v", "W_O": "hook_attn_out"}


def _sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """``sum_rows x**2`` of ``x [rows, features]`` in float64, where the square of any float32, bfloat16 or float16
    value is exact; one float64 copy per batch, squared in place. (Squaring half precision in float32 instead saved
    nothing measurable on an H100, and can underflow.)"""
    return x.to(torch.float64, copy=True).square_().sum(0)


def _module(block, dotted: str):
    for part in dotted.split("."):
        block = getattr(block, part)
    return block


@torch.no_grad()
def block_statistics(block, hidden: list[torch.Tensor], want_outputs: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One dense pass of ``block`` over the calibration hidden states.

    Returns per-input-feature L2 norms for each input source (float64), and, if ``want_outputs``, the L2 norms
    of the outputs the paper's code scores W_Q/K/V/O by (its hooks, `SEED_OUTPUT_HOOK`), flattened over heads.
    """
    sumsq: dict[str, torch.Tensor] = {}
    captured: dict[str, torch.Tensor] = {}
    handles = []
    sources = dict(_input_sources(block))
    if want_outputs:
        sources.update({f"out:{name}": _module(block, hook) for name, hook in SEED_OUTPUT_HOOK.items()})
    for key, module in sources.items():

        def hook(_module, _inputs, output, key=key):
            heads = key in ("z", "out:W_Q", "out:W_K", "out:W_V")  # [.., heads, d_head] -> heads * d_head
            captured[key] = output.reshape(-1, output.shape[-2] * output.shape[-1]) if heads else output.reshape(-1, output.shape[-1])

        handles.append(module.register_forward_hook(hook))
    try:
        for h in hidden:
            block(h)
            for key, x in captured.items():
                sumsq[key] = sumsq.get(key, 0) + _sum_of_squares(x)
            captured.clear()
    finally:
        for handle in handles:
            handle.remove()
    norms = {k: v.sqrt() for k, v in sumsq.items()}
    outputs = {k.split(":", 1)[1]: norms.pop(k) for k in list(norms) if k.startswith("out:")}
    return norms, outputs


def _advance(block, hidden: list[torch.Tensor]) -> None:
    """Run ``block`` over the hidden states, replacing each batch as it goes: one copy of them is ever alive."""
    for i in range(len(hidden)):
        hidden[i] = block(hidden[i])


# --- the whole model ----------------------------------------------------------------------------------


def measure_sparsity(model: HookedTransformer) -> PruneReport:
    """Count the zeros of every prunable matrix (what was done, not what was asked)."""
    report = PruneReport()
    zeros = total = 0
    for layer in range(model.cfg.n_layers):
        for name, w in prunable_weights(model, layer).items():
            n_zero = int((w == 0).sum())
            report.sparsity_per_matrix[f"blocks.{layer}.{name}"] = n_zero / w.numel()
            zeros += n_zero
            total += w.numel()
    report.sparsity_actual = zeros / total
    report.n_pruned_parameters, report.n_prunable_parameters = zeros, total
    return report


@torch.no_grad()
def prune_model(
    model: HookedTransformer,
    calibration_tokens: torch.Tensor,
    spec: PruneSpec,
    batch_size: int = 8,
    layers: list[int] | None = None,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> PruneReport:
    """Prune ``model`` in place; ``calibration_tokens`` is ``[n_sequences, seq_len]``.

    Memory stays at the weights + the calibration hidden states + one block's activations: the
    embeddings run once, each block runs twice (dense for statistics, pruned to feed the next block),
    and the unembedding never runs.
    """
    started = time.perf_counter()
    n_layers = model.cfg.n_layers
    chosen = set(range(n_layers)) if layers is None else set(layers)
    outside = sorted(chosen - set(range(n_layers)))
    if outside:
        raise ValueError(f"layer {outside[0]} is outside the model; valid: 0..{n_layers - 1}")
    if spec.method == "magnitude":
        for layer in sorted(chosen):
            for name, w in prunable_weights(model, layer).items():
                matrix = as_matrix(name, w.data)
                mask = magnitude_mask(matrix, spec.sparsity, spec.nm)
                w.data.masked_fill_(from_matrix(name, mask, w.data), 0)
            progress(layer + 1, n_layers)
    else:
        seed = spec.method == "wanda-seed"
        # wanda-seed: the caller passes the one document the paper's code calibrates on (`seed_calibration`).
        tokens = calibration_tokens.to(model.cfg.device)
        hidden = [model.input_to_embed(batch)[0] for batch in tokens.split(batch_size)]
        for layer in range(n_layers):
            block = model.blocks[layer]
            if layer not in chosen:
                _advance(block, hidden)
                continue
            weights = prunable_weights(model, layer)
            matrices = {name: as_matrix(name, w.data) for name, w in weights.items()}
            in_norms, out_norms = block_statistics(block, hidden, want_outputs=seed)
            for name, w in weights.items():
                if seed:
                    if name not in ATTENTION_MATRICES:
                        # The paper's code rebinds W_in/W_out (and never touches W_gate), so the MLP
                        # stays dense whatever its scores were.
                        continue
                    per_head = model.cfg.d_head if name in ("W_Q", "W_K", "W_V") else None
                    mask = seed_mask(matrices[name], out_norms[name], spec.sparsity, per_head)
                else:
                    mask = wanda_mask(matrices[name], in_norms[INPUT_OF[name]], spec.sparsity, spec.nm)
                w.data.masked_fill_(from_matrix(name, mask, w.data), 0)
            _advance(block, hidden)
            progress(layer + 1, n_layers)
    report = measure_sparsity(model)
    report.seconds = time.perf_counter() - started
    return report
