"""Pruning an SAE's encoder and decoder, and sweeping the sparsity from one pass of cached activations.

Methods share one signature, ``method(sae, stats, sparsity) -> SAE`` (a new SAE; the input is untouched):

- ``wanda``: WANDA by its own rule (GUIDE §6). ``W_enc [d_in, d_sae]`` is scored ``|W_ij| * ||sae_in_i||``
  with ``sae_in = process_sae_in(x)`` (the true input of W_enc), one comparison group per latent (a column);
  ``W_dec [d_sae, d_in]`` is scored with the norms of the latent activations (its true input), one group per
  output dimension (a column). Both are ``[in, out]``, so this is `saecomp.prune_llm.wanda_mask` as is.
- ``magnitude``: one threshold per matrix.
- ``wanda-seed``: the paper's code: W_enc by the norms of the pre-activations, W_dec by the norms of the
  reconstruction, competing within input rows, same ratio for both, statistics as `seed_sae_statistics`
  gathers them. For reproduction only.
- ``latents``: structured: drops whole latents (lowest firing frequency x decoder norm) and returns a
  genuinely smaller SAE, the one method here that makes the SAE cheaper to run.

Biases and JumpReLU thresholds are never touched. Every method works on one *plain form* of the SAE
(`copy_sae`: a TopK SAE that rescales by decoder norm has the norms folded in): statistics, masks and the saved
SAE all describe that form. BOS, EOS and padding never enter statistics or metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from sae_lens import SAE
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from saecomp.names import SAE_PRUNING_METHODS
from saecomp.prune_llm import group_mask, magnitude_mask, seed_mask, wanda_mask
from saecomp.saes import check_sae_fits, ordinary_positions

METHODS = SAE_PRUNING_METHODS  # (in names.py: an entry point checks its input without importing SAELens)


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
    """One pass of the SAE's plain form (`copy_sae`, which is what the pruners prune) over hook activations
    ``[tokens, *hook_shape]`` of ordinary tokens (BOS/EOS/padding already left out)."""
    sae = copy_sae(sae)
    sums = {name: 0 for name in ("sae_in", "latent", "preact", "recon")}
    fire = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.device)
    for x in activations.split(batch_size):
        for name, value in _sae_quantities(sae, x).items():
            sums[name] = sums[name] + value.double().pow(2).sum(0)
            if name == "latent":
                fire += (value > 0).sum(0)
    return SAEStatistics(
        sae_in_norm=sums["sae_in"].sqrt(),
        latent_norm=sums["latent"].sqrt(),
        preact_norm=sums["preact"].sqrt(),
        recon_norm=sums["recon"].sqrt(),
        fire_count=fire,
        n_tokens=activations.shape[0],
    )


def _sae_quantities(sae: SAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs and outputs of W_enc and W_dec for a chunk ``x`` ([tokens, *hook_shape]) of a plain-form SAE."""
    sae_in = sae.process_sae_in(x)  # [tokens, d_in]: input of W_enc
    preact = sae_in @ sae.W_enc + sae.b_enc  # [tokens, d_sae]: hook_sae_acts_pre
    acts = sae.encode(x)  # [tokens, d_sae]: input of W_dec (hook_sae_acts_post)
    recon = acts @ sae.W_dec + sae.b_dec  # [tokens, d_in]: hook_sae_recons, before any de-normalisation
    return {"sae_in": sae_in, "latent": acts, "preact": preact, "recon": recon}


@torch.no_grad()
def seed_sae_statistics(model: HookedTransformer, sae: SAE, hook_name: str, documents: list[torch.Tensor], batch_size: int = 8,
                        pad_id: int = 0) -> SAEStatistics:  # fmt: skip
    """The statistics the paper's code scores an SAE by (sae-compression gpt2-small/prune_sae.py lines 61-72,
    77-79, 139-148): whole documents (BOS first, cut at the context) in batches of ``batch_size``, right-padded
    with token ``pad_id`` and no attention mask; per batch the L2 norm over every position, padding included,
    of the pre-activations (W_enc) and of the reconstruction (W_dec); then the mean of those per-batch norms.
    The seed draws 128 documents at random with no seed; we take the calibration pool's first ones."""
    plain = copy_sae(sae)
    per_batch: dict[str, list[torch.Tensor]] = {name: [] for name in ("sae_in", "latent", "preact", "recon")}
    fire = torch.zeros(plain.cfg.d_sae, dtype=torch.long, device=plain.device)
    n_tokens = 0
    for start in range(0, len(documents), batch_size):
        batch = torch.nn.utils.rnn.pad_sequence(documents[start : start + batch_size], batch_first=True, padding_value=pad_id)
        _, cache = model.run_with_cache(batch, names_filter=lambda name: name == hook_name)
        x = cache[hook_name].reshape(-1, *cache[hook_name].shape[2:])  # [batch * pos, *hook_shape]
        for name, value in _sae_quantities(plain, x).items():
            per_batch[name].append(value.double().norm(dim=0))
            if name == "latent":
                fire += (value > 0).sum(0)
        n_tokens += x.shape[0]
    mean = {name: torch.stack(norms).mean(0) for name, norms in per_batch.items()}
    return SAEStatistics(mean["sae_in"], mean["latent"], mean["preact"], mean["recon"], fire, n_tokens)


def copy_sae(sae: SAE) -> SAE:
    """An independent copy that computes plainly ``acts @ W_dec``: a TopK SAE that rescales by decoder norm
    has the norms folded in first (function-preserving, as SAELens itself does before folding whitening),
    since a pruned-away decoder row would otherwise be divided by its zero norm."""
    # Built on the meta device and given the weights (as SAELens's load_from_disk does): a plain from_dict initialises
    # a random SAE first, 15x the copy's cost at 6,144 latents, paid twice per sweep level. Not deepcopy: SAELens keeps
    # closures over the SAE it built (hook_z reshaping, layer-norm and rescaling functions) that a deepcopy would
    # share with the source, writing the copy's state into it.
    config = sae.cfg.to_dict()
    config["device"] = "meta"
    clone = SAE.from_dict(config)
    clone.load_state_dict({k: v.clone() for k, v in sae.state_dict().items()}, assign=True)
    clone = clone.to(device=sae.device, dtype=sae.W_dec.dtype)  # SAE.to keeps cfg.device and cfg.dtype in step
    if getattr(clone.cfg, "rescale_acts_by_decoder_norm", False):
        clone.fold_W_dec_norm()
        clone.cfg.rescale_acts_by_decoder_norm = False
    return clone


def _with_weights(sae: SAE, enc_mask: torch.Tensor, dec_mask: torch.Tensor) -> SAE:
    """A copy of the plain-form ``sae`` with the masked weights zeroed."""
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
        elif name in PER_LATENT_PARAMETERS:
            sliced[name] = value[keep]  # [d_sae'] (by name: b_dec is [d_in], which may equal d_sae)
        else:
            sliced[name] = value
    smaller.load_state_dict({k: v.clone() for k, v in sliced.items()})
    return smaller.to(sae.device)


PER_LATENT_PARAMETERS = ("b_enc", "threshold", "log_threshold", "b_gate", "b_mag", "r_mag")
"""SAELens's 1-D parameters with one entry per latent (standard, TopK, JumpReLU and gated SAEs); the others (b_dec)
have one per input dimension."""


PRUNERS: dict[str, Callable[[SAE, SAEStatistics, float], SAE]] = {
    "wanda": prune_wanda,
    "magnitude": prune_magnitude,
    "wanda-seed": prune_wanda_seed,
    "latents": prune_latents,
}


def prune_sae(sae: SAE, stats: SAEStatistics, sparsity: float, method: str = "wanda") -> SAE:
    """``sae`` pruned to ``sparsity``: a new SAE in plain form (`copy_sae`), masks computed on that form, which
    is the form ``stats`` (from `sae_statistics`) describe."""
    if method not in PRUNERS:
        raise ValueError(f"method={method!r} is not valid; valid: {', '.join(METHODS)}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} is not valid; valid: a number in [0, 1)")
    return PRUNERS[method](copy_sae(sae), stats, sparsity)


def unreachable_levels(d_sae: int, k: int | None, levels, method: str) -> list[float]:
    """The levels ``method`` cannot produce for an SAE of ``d_sae`` latents that keeps the top ``k`` (None: not
    a TopK SAE): `latents` must keep at least k latents."""
    if method != "latents" or k is None:
        return []
    return [level for level in levels if d_sae - int(d_sae * level) < k]


# --- the sweep: one pass through the model, then only what differs per level ------------------------------


@dataclass
class ActivationCache:
    """What every level of a sweep shares: the block input at the SAE's layer, the hook activations and the
    clean losses, for ``tokens [n, seq]`` of one model."""

    tokens: torch.Tensor
    resid_pre: torch.Tensor  # [n, seq, d_model]: input of the SAE's block
    activations: torch.Tensor  # [n, seq, *hook_shape]
    ordinary: torch.Tensor  # [n, seq] bool: False at BOS/EOS/padding (never spliced, never measured)
    clean_loss_sum: float
    layer: int
    hook_name: str

    @property
    def n_predictions(self) -> int:
        return self.tokens.shape[0] * (self.tokens.shape[1] - 1)

    def ordinary_activations(self) -> torch.Tensor:
        """``[ordinary tokens, *hook_shape]``: what statistics and reconstruction metrics are computed on."""
        return self.activations[self.ordinary.to(self.activations.device)]


@torch.no_grad()
def cache_activations(
    model: HookedTransformer, hook_name: str, tokens: torch.Tensor, batch_size: int = 8, special_ids: set[int] | frozenset = frozenset()
) -> ActivationCache:
    layer = int(hook_name.split(".")[1])
    resid_name = f"blocks.{layer}.hook_resid_pre"
    resid, acts, loss_sum = [], [], 0.0
    for batch in tqdm(tokens.split(batch_size), desc=f"caching {hook_name}", leave=False, disable=None):  # silent off a terminal
        loss, cache = model.run_with_cache(
            batch, return_type="loss", loss_per_token=True, names_filter=lambda n: n in (resid_name, hook_name)
        )
        resid.append(cache[resid_name])
        acts.append(cache[hook_name])
        loss_sum += float(loss.double().sum())
    ordinary = ordinary_positions(tokens, special_ids)
    return ActivationCache(tokens, torch.cat(resid), torch.cat(acts), ordinary, loss_sum, layer, hook_name)


@torch.no_grad()
def evaluate_cached(model: HookedTransformer, sae: SAE, cache: ActivationCache, batch_size: int = 8) -> dict[str, float]:
    """The metrics of `saecomp.saes.evaluate_sae`, from the cache: the model runs only from the SAE's block on, and
    the one encode and decode that the splice needs at the hook also gives the reconstruction metrics (measured on
    the ordinary positions of what the hook received: the cached block input run through the block)."""
    check_sae_fits(sae, model)
    sae.eval()
    cached = cache.ordinary_activations()  # [tokens, *hook_shape]
    n_tokens = cached.shape[0]
    mean = cached.reshape(n_tokens, -1).double().mean(0)  # [d]: the centre of the explained variance
    sums = {"squared_error": 0.0, "variance": 0.0, "cos": 0.0, "l0": 0.0, "measured": 0}
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae.device)

    def splice_and_measure(act: torch.Tensor, hook, ordinary: torch.Tensor) -> torch.Tensor:
        nonlocal fired
        latents = sae.encode(act)  # [batch, seq, d_sae]; decoded right away (layer-norm SAEs keep encode's statistics)
        reconstruction = sae.decode(latents)  # [batch, seq, *hook_shape]
        keep = ordinary.to(act.device)  # [batch, seq]
        x = act[keep].reshape(int(keep.sum()), -1).double()  # [tokens, d]
        x_hat = reconstruction[keep].reshape(x.shape[0], -1).double()
        active = latents[keep] > 0  # [tokens, d_sae]
        sums["squared_error"] += float((x - x_hat).pow(2).sum())
        sums["variance"] += float((x - mean).pow(2).sum())
        sums["cos"] += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum())
        sums["l0"] += float(active.sum())
        sums["measured"] += x.shape[0]
        fired |= active.any(0)
        where = keep.reshape(*keep.shape, *([1] * (act.ndim - keep.ndim)))
        return torch.where(where, reconstruction.to(act.dtype), act)  # as `saes.splice`: special positions stay the model's

    ce_with = 0.0
    batches = zip(cache.resid_pre.split(batch_size), cache.tokens.split(batch_size), cache.ordinary.split(batch_size), strict=True)
    for resid, tokens, ordinary in batches:
        loss = model.run_with_hooks(
            resid,
            start_at_layer=cache.layer,
            tokens=tokens,
            return_type="loss",
            loss_per_token=True,
            fwd_hooks=[(cache.hook_name, lambda act, hook, o=ordinary: splice_and_measure(act, hook, o))],
        )
        ce_with += float(loss.double().sum())
    if sums["measured"] != n_tokens:  # the hook saw other positions than the cache holds: the metrics would be wrong
        raise RuntimeError(f"the splice measured {sums['measured']} tokens at {cache.hook_name}, the cache holds {n_tokens}")
    d = mean.shape[0]
    metrics = {
        "mse": sums["squared_error"] / (n_tokens * d),
        "explained_variance": 1 - sums["squared_error"] / sums["variance"],
        "cossim": sums["cos"] / n_tokens,
        "l0": sums["l0"] / n_tokens,
        "dead_fraction": float((~fired).float().mean()),
        "ce_loss_with_sae": ce_with / cache.n_predictions,
        "ce_loss_without_sae": cache.clean_loss_sum / cache.n_predictions,
    }
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
    batch_size: int = 8,
) -> SweepResult:
    """Prune ``sae`` to every level and measure each on the cached validation activations, ``batch_size`` sequences
    at a time (the experiment's ``calibration.batch_size``: memory only)."""
    started = time.perf_counter()
    result = SweepResult(sorted(set(levels)), {}, {}, 0.0)
    for level in tqdm(result.levels, desc="sweep", leave=False, disable=None):
        pruned = prune_sae(sae, stats, level, method)
        result.saes[level] = pruned
        result.metrics[level] = evaluate_cached(model, pruned, cache, batch_size)
        progress(level, result.metrics[level])
    result.seconds = time.perf_counter() - started
    return result


def level_passes(metric: str, value: float, trained: dict[str, float], tolerance: float) -> bool:
    """The tolerance rule for one level: ``mse <= (1 + tol) * mse_trained``; for the cross-entropy metrics
    ``ce <= ce_trained + tol * ce_clean`` (an absolute margin in units of the clean loss, which works when the
    trained SAE's CE increase is about 0 or negative)."""
    if metric == "mse":
        return value <= (1 + tolerance) * trained["mse"]
    return value <= trained[metric] + tolerance * trained["ce_loss_without_sae"]


def select_level(
    metrics: dict[float, dict[str, float]],
    trained: dict[str, float],
    tolerance: float,
    metric: str,
    rule: str = "tolerance",
    floor: float = 0.25,
) -> tuple[float, bool]:
    """Choose a sweep level; returns (level, whether the rule was met).

    ``tolerance`` (our reading of the paper: "the level (at least 25%) at which the pruned SAE achieves
    reconstruction loss comparable to its trained counterpart"): the highest level >= ``floor`` such that it
    and every lower level >= ``floor`` pass `level_passes`; when the lowest already fails, that level, not met.
    ``argmin`` (the paper's code, sae-compression gpt2-small/prune_sae.py lines 171-191): the level >= ``floor``
    with the lowest spliced cross-entropy on validation tokens; ties go to the higher level (the seed scans
    from high to low with a strict ``<``)."""
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance} must be at least 0")
    candidates = sorted(level for level in metrics if level >= floor)
    if not candidates:
        raise ValueError(f"the sweep has no level at or above {floor}")
    if rule == "argmin":
        finite = [level for level in candidates if math.isfinite(metrics[level]["ce_loss_with_sae"])]  # NaN compares as nothing
        if not finite:
            raise ValueError(f"every level's spliced cross-entropy is NaN or infinite ({', '.join(f'{c:g}' for c in candidates)})")
        return min(finite, key=lambda level: (metrics[level]["ce_loss_with_sae"], -level)), True
    if rule != "tolerance":
        raise ValueError(f"selection_rule={rule!r} is not valid; valid: tolerance, argmin")
    selected = None
    for level in candidates:
        if not level_passes(metric, metrics[level][metric], trained, tolerance):
            break
        selected = level
    return (selected, True) if selected is not None else (candidates[0], False)
