"""Pruning an SAE's encoder and decoder, and sweeping the sparsity from one pass of cached activations.

Methods share one signature, ``method(sae, stats, sparsity) -> SAE`` (a new SAE; the input is untouched):

- ``wanda``: WANDA by its own rule (GUIDE §6). ``W_enc [d_in, d_sae]`` is scored ``|W_ij| * ||sae_in_i||``
  with ``sae_in = process_sae_in(x)`` (the true input of W_enc), one comparison group per latent (a column);
  ``W_dec [d_sae, d_in]`` is scored with the norms of the latent activations (its true input), one group per
  output dimension (a column). Both are ``[in, out]``, so this is `saecomp.prune_llm.wanda_mask` as is.
- ``magnitude``: one threshold per matrix.
- ``wanda-seed``: the paper's code: W_enc by the norms of the pre-activations, W_dec by the norms of the
  reconstruction, competing within input rows, same ratio for both. For reproduction only.
- ``latents``: structured: drops whole latents (lowest firing frequency x decoder norm) and returns a
  genuinely smaller SAE, the one method here that makes the SAE cheaper to run.

Biases and JumpReLU thresholds are never touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

from saecomp.prune_llm import group_mask, magnitude_mask, seed_mask, wanda_mask
from saecomp.saes import check_sae_fits, reconstruction_metrics

METHODS = ("wanda", "magnitude", "wanda-seed", "latents")


@dataclass
class SAEStatistics:
    """Per-feature L2 norms (float64) over calibration tokens, and firing counts."""

    sae_in_norm: torch.Tensor  # [d_in]   input of W_enc (process_sae_in(x))
    latent_norm: torch.Tensor  # [d_sae]  input of W_dec (hook_sae_acts_post)
    preact_norm: torch.Tensor  # [d_sae]  output of W_enc (+ b_enc): what the paper's code scores by
    recon_norm: torch.Tensor  # [d_in]   output of W_dec (+ b_dec): likewise
    fire_count: torch.Tensor  # [d_sae]
    n_tokens: int


@torch.no_grad()
def sae_statistics(sae: SAE, activations: torch.Tensor, batch_size: int = 4096) -> SAEStatistics:
    """One pass of the SAE over hook activations ``[tokens, *hook_shape]`` (of its plain form, see `copy_sae`,
    which is what the pruners prune)."""
    sae = copy_sae(sae)
    sums = {name: 0 for name in ("sae_in", "latent", "preact", "recon")}
    fire = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    for x in activations.split(batch_size):
        sae_in = sae.process_sae_in(x)  # [tokens, d_in]
        acts = sae.encode(x)  # [tokens, d_sae]
        preact = sae_in @ sae.W_enc + sae.b_enc
        recon = acts @ sae.W_dec + sae.b_dec
        for name, value in (("sae_in", sae_in), ("latent", acts), ("preact", preact), ("recon", recon)):
            sums[name] = sums[name] + value.double().pow(2).sum(0)
        fire += (acts > 0).sum(0)
    return SAEStatistics(
        sae_in_norm=sums["sae_in"].sqrt(),
        latent_norm=sums["latent"].sqrt(),
        preact_norm=sums["preact"].sqrt(),
        recon_norm=sums["recon"].sqrt(),
        fire_count=fire,
        n_tokens=activations.shape[0],
    )


def copy_sae(sae: SAE) -> SAE:
    """An independent copy that computes plainly ``acts @ W_dec``: a TopK SAE that rescales by decoder norm
    has the norms folded in first (function-preserving, as SAELens itself does before folding whitening),
    since a pruned-away decoder row would otherwise be divided by its zero norm."""
    clone = SAE.from_dict(sae.cfg.to_dict())
    clone.load_state_dict({k: v.clone() for k, v in sae.state_dict().items()})
    if getattr(clone.cfg, "rescale_acts_by_decoder_norm", False):
        clone.fold_W_dec_norm()
        clone.cfg.rescale_acts_by_decoder_norm = False
    return clone.to(sae.device)


def _with_weights(sae: SAE, enc_mask: torch.Tensor, dec_mask: torch.Tensor) -> SAE:
    pruned = copy_sae(sae)
    with torch.no_grad():
        pruned.W_enc.masked_fill_(enc_mask, 0)
        pruned.W_dec.masked_fill_(dec_mask, 0)
    return pruned


def prune_wanda(sae: SAE, stats: SAEStatistics, sparsity: float) -> SAE:
    enc = wanda_mask(sae.W_enc, stats.sae_in_norm, sparsity)  # W_enc [d_in, d_sae]: a group is a latent
    dec = wanda_mask(sae.W_dec, stats.latent_norm, sparsity)  # W_dec [d_sae, d_in]: a group is an output dim
    return _with_weights(sae, enc, dec)


def prune_magnitude(sae: SAE, stats: SAEStatistics, sparsity: float) -> SAE:
    return _with_weights(sae, magnitude_mask(sae.W_enc, sparsity), magnitude_mask(sae.W_dec, sparsity))


def prune_wanda_seed(sae: SAE, stats: SAEStatistics, sparsity: float) -> SAE:
    enc = seed_mask(sae.W_enc, stats.preact_norm, sparsity)
    dec = seed_mask(sae.W_dec, stats.recon_norm, sparsity)
    return _with_weights(sae, enc, dec)


def latent_scores(sae: SAE, stats: SAEStatistics) -> torch.Tensor:
    """How much each latent is worth keeping: firing frequency x decoder norm (of the plain form, see
    `copy_sae`)  # [d_sae]"""
    frequency = stats.fire_count.double() / max(stats.n_tokens, 1)
    return frequency * sae.W_dec.detach().double().norm(dim=1)


def kept_latents(sae: SAE, stats: SAEStatistics, sparsity: float) -> torch.Tensor:
    """Indices (ascending) of the latents ``latents`` keeps: all but the int(d_sae * s) lowest."""
    n_drop = int(sae.cfg.d_sae * sparsity)
    drop = group_mask(latent_scores(sae, stats)[:, None], sparsity)[:, 0]
    assert int(drop.sum()) == n_drop
    return torch.nonzero(~drop).flatten()


def prune_latents(sae: SAE, stats: SAEStatistics, sparsity: float) -> SAE:
    sae = copy_sae(sae)
    keep = kept_latents(sae, stats, sparsity)
    k = getattr(sae.cfg, "k", None)
    if k is not None and k > len(keep):
        raise ValueError(f"sparsity={sparsity} leaves {len(keep)} latents, fewer than the SAE's k={k}")
    cfg = sae.cfg.to_dict()
    cfg["d_sae"] = len(keep)
    smaller = SAE.from_dict(cfg)
    state = sae.state_dict()
    sliced = {}
    for name, value in state.items():
        if name == "W_enc":
            sliced[name] = value[:, keep]  # [d_in, d_sae']
        elif name == "W_dec":
            sliced[name] = value[keep]  # [d_sae', d_in]
        elif value.ndim == 1 and value.shape[0] == sae.cfg.d_sae:
            sliced[name] = value[keep]  # b_enc, threshold: per latent
        else:
            sliced[name] = value
    smaller.load_state_dict({k: v.clone() for k, v in sliced.items()})
    return smaller.to(sae.device)


PRUNERS: dict[str, Callable[[SAE, SAEStatistics, float], SAE]] = {
    "wanda": prune_wanda,
    "magnitude": prune_magnitude,
    "wanda-seed": prune_wanda_seed,
    "latents": prune_latents,
}


def prune_sae(sae: SAE, stats: SAEStatistics, sparsity: float, method: str = "wanda") -> SAE:
    if method not in PRUNERS:
        raise ValueError(f"method={method!r} is not valid; valid: {', '.join(METHODS)}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} is not valid; valid: a number in [0, 1)")
    return PRUNERS[method](sae, stats, sparsity)


# --- the sweep: one pass through the model, then only what differs per level ------------------------------


@dataclass
class ActivationCache:
    """What every level of a sweep shares: the block input at the SAE's layer, the hook activations and the
    clean losses, for ``tokens [n, seq]`` of one model."""

    tokens: torch.Tensor
    resid_pre: torch.Tensor  # [n, seq, d_model]: input of the SAE's block
    activations: torch.Tensor  # [n, seq, *hook_shape]
    clean_loss_sum: float
    layer: int
    hook_name: str

    @property
    def n_predictions(self) -> int:
        return self.tokens.shape[0] * (self.tokens.shape[1] - 1)


@torch.no_grad()
def cache_activations(model: HookedTransformer, hook_name: str, tokens: torch.Tensor, batch_size: int = 8) -> ActivationCache:
    layer = int(hook_name.split(".")[1])
    resid_name = f"blocks.{layer}.hook_resid_pre"
    resid, acts, loss_sum = [], [], 0.0
    for batch in tokens.split(batch_size):
        loss, cache = model.run_with_cache(
            batch, return_type="loss", loss_per_token=True, names_filter=lambda n: n in (resid_name, hook_name)
        )
        resid.append(cache[resid_name])
        acts.append(cache[hook_name])
        loss_sum += float(loss.double().sum())
    return ActivationCache(tokens, torch.cat(resid), torch.cat(acts), loss_sum, layer, hook_name)


@torch.no_grad()
def evaluate_cached(model: HookedTransformer, sae: SAE, cache: ActivationCache, batch_size: int = 8) -> dict[str, float]:
    """The metrics of `saecomp.saes.evaluate_sae`, from the cache: reconstruction without the model, and the
    spliced loss by running the model only from the SAE's block on."""
    check_sae_fits(sae, model)
    sae.eval()
    flat_acts = cache.activations.reshape(-1, *cache.activations.shape[2:])
    latents = torch.cat([sae.encode(x) for x in flat_acts.split(4096)])
    x_hat = torch.cat([sae.decode(a) for a in latents.split(4096)])
    n_tokens = latents.shape[0]
    metrics = reconstruction_metrics(flat_acts.reshape(n_tokens, -1), x_hat.reshape(n_tokens, -1))
    ce_with = 0.0
    splice = [(cache.hook_name, lambda act, hook: sae.decode(sae.encode(act)))]
    for resid, tokens in zip(cache.resid_pre.split(batch_size), cache.tokens.split(batch_size), strict=True):
        loss = model.run_with_hooks(
            resid, start_at_layer=cache.layer, tokens=tokens, return_type="loss", loss_per_token=True, fwd_hooks=splice
        )
        ce_with += float(loss.double().sum())
    metrics.update(
        {
            "l0": float((latents > 0).sum()) / n_tokens,
            "dead_fraction": float((~(latents > 0).any(0)).float().mean()),
            "ce_loss_with_sae": ce_with / cache.n_predictions,
            "ce_loss_without_sae": cache.clean_loss_sum / cache.n_predictions,
        }
    )
    metrics["ce_loss_increase"] = metrics["ce_loss_with_sae"] - metrics["ce_loss_without_sae"]
    return metrics


@dataclass
class SweepResult:
    levels: list[float]
    metrics: dict[float, dict[str, float]]
    saes: dict[float, SAE]
    seconds: float


def sweep(
    model: HookedTransformer,
    sae: SAE,
    stats: SAEStatistics,
    cache: ActivationCache,
    levels: list[float],
    method: str = "wanda",
    progress: Callable[[float, dict], None] = lambda level, metrics: None,
) -> SweepResult:
    """Prune ``sae`` to every level and measure each on the cached validation activations."""
    started = time.perf_counter()
    result = SweepResult(sorted(set(levels)), {}, {}, 0.0)
    for level in result.levels:
        pruned = prune_sae(sae, stats, level, method)
        result.saes[level] = pruned
        result.metrics[level] = evaluate_cached(model, pruned, cache)
        progress(level, result.metrics[level])
    result.seconds = time.perf_counter() - started
    return result


def select_level(metrics: dict[float, dict[str, float]], reference: float, tolerance: float, metric: str, floor: float = 0.25):
    """The paper's rule: the highest sparsity, at least ``floor``, whose ``metric`` stays within
    ``tolerance`` (relative) of the trained SAE's ``reference``. Returns (level, whether any level met it);
    when none does, the lowest level at or above the floor."""
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance} must be at least 0")
    candidates = sorted(level for level in metrics if level >= floor)
    if not candidates:
        raise ValueError(f"the sweep has no level at or above {floor}")
    within = [level for level in candidates if metrics[level][metric] <= reference * (1 + tolerance)]
    return (max(within), True) if within else (candidates[0], False)
