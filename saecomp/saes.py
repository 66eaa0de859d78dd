"""SAEs: where they attach, where they come from, and how well they explain a model.

One interface for every source of an SAE (a SAELens release, an MLflow run or registered model, a local
SAELens folder), and one set of reconstruction metrics computed the same way for every variant
(pretrained, trained, pruned) on the same tokens of the same (pruned) model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

from saecomp.names import HOOKS, SAESource, check_hook, hook_d_in, hook_name  # noqa: F401  (re-exported; torch-free there)

# SAELens warns at every SAE it builds that the model should be loaded with the SAE's
# `model_from_pretrained_kwargs`; saecomp always does (`processing_kwargs`), so the warning only repeats.
warnings.filterwarnings("ignore", message=r"\nThis SAE has non-empty model_from_pretrained_kwargs", category=UserWarning)

# TransformerLens's `from_pretrained` defaults: what an SAE whose metadata names no processing expects.
TL_DEFAULT_PROCESSING = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": True}


def check_sae_fits(sae: SAE, model: HookedTransformer) -> str:
    """The SAE's hook name, after checking that the model has that hook and its width is the SAE's d_in."""
    name = sae.cfg.metadata.hook_name
    if name is None:
        raise ValueError("the SAE's metadata names no hook (SAELens would silently skip it)")
    if name not in model.hook_dict:
        raise ValueError(f"the SAE's hook {name} is not in the model (layers 0..{model.cfg.n_layers - 1})")
    hook = name.split(".", 2)[2]
    width = hook_d_in(model.cfg, hook) if hook in HOOKS else model.cfg.d_model
    if sae.cfg.d_in != width:
        raise ValueError(f"the SAE's d_in={sae.cfg.d_in} does not match {name}, whose width is {width}")
    return name


def processing_kwargs(sae: SAE) -> dict[str, bool]:
    """How the model must be loaded for this SAE (GUIDE §3): its metadata's `model_from_pretrained_kwargs`
    over TransformerLens's defaults."""
    asked = dict(sae.cfg.metadata.model_from_pretrained_kwargs or {})
    return {key: bool(asked.get(key, default)) for key, default in TL_DEFAULT_PROCESSING.items()}


# --- sources ------------------------------------------------------------------------------------------


def load_sae(source: SAESource | str | dict, device: str = "cpu") -> SAE:
    """Load an SAE from any source with SAELens itself."""
    source = SAESource.parse(source)
    if source.release is not None:
        # A release not in SAELens's registry but containing "/" is a Hub repo id (GUIDE §4).
        return SAE.from_pretrained(source.release, source.sae_id, device=device)
    if source.uri is not None:
        import mlflow

        local = mlflow.artifacts.download_artifacts(artifact_uri=source.uri)
        return load_sae_folder(local, device)
    return load_sae_folder(source.path, device)


def load_sae_folder(path: str | Path, device: str = "cpu") -> SAE:
    path = Path(path)
    if not (path / "cfg.json").exists():
        nested = [p for p in path.rglob("cfg.json")]
        if len(nested) != 1:
            raise ValueError(f"{path} is not a SAELens folder (no cfg.json)")
        path = nested[0].parent
    return SAE.load_from_disk(str(path), device=device)


# --- metrics ------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    """MSE, explained variance and cosine similarity of ``x_hat`` for ``x`` (both ``[tokens, d]``).

    ``mse`` is per element: ``E||x - x_hat||^2 / d`` (SAEBench's core `mse` is a per-token *sum* of squares
    divided by the tokens of a batch: not comparable). ``explained_variance`` is the centred ratio
    ``1 - E||x - x_hat||^2 / E||x - E x||^2`` over all tokens (SAEBench 0.6's core `explained_variance`, which
    the paper's Table 1 reports, is not a variance ratio and can exceed 1)."""
    x, x_hat = x.double(), x_hat.double()
    error = (x - x_hat).pow(2).sum(-1)
    variance = (x - x.mean(0)).pow(2).sum(-1)
    return {
        "mse": float(error.mean() / x.shape[-1]),
        "explained_variance": float(1 - error.mean() / variance.mean()),
        "cossim": float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean()),
    }


def splice(sae: SAE, activations: torch.Tensor, ordinary: torch.Tensor) -> torch.Tensor:
    """The SAE's reconstruction where ``ordinary`` ([batch, pos]) is True, the model's own activations at BOS,
    EOS and padding (as SAEBench's core splices: it never reconstructs special tokens). Encodes and decodes in
    one go, so `layer_norm` SAEs decode with the statistics of what they just encoded."""
    reconstruction = sae.decode(sae.encode(activations)).to(activations.dtype)  # a float32 SAE in a bf16 model
    keep = ordinary.to(activations.device).reshape(*ordinary.shape, *([1] * (activations.ndim - ordinary.ndim)))
    return torch.where(keep, reconstruction, activations)


def ordinary_positions(tokens: torch.Tensor, special_ids: set[int] | frozenset = frozenset()) -> torch.Tensor:
    """True at the positions of ``tokens`` that count for SAE metrics and statistics (not BOS/EOS/padding)."""
    from saecomp.data import special_token_mask

    return special_token_mask(tokens, set(special_ids))


@torch.no_grad()
def evaluate_sae(
    model: HookedTransformer, sae: SAE, tokens: torch.Tensor, batch_size: int = 8, special_ids: set[int] | frozenset = frozenset()
) -> dict[str, float]:
    """Reconstruction, sparsity and the model's cross-entropy with the SAE spliced in at its hook.

    ``tokens``: ``[n, seq]``. Positions holding ``special_ids`` (BOS, EOS, padding) are left out of the
    reconstruction metrics and never spliced. Metrics: mse, explained_variance, cossim, l0, dead_fraction
    (latents that never fire on these tokens), ce_loss_with_sae, ce_loss_without_sae, ce_loss_increase
    (cross-entropy over every prediction).
    """
    name = check_sae_fits(sae, model)
    sae.eval()
    xs, x_hats = [], []
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae.device)
    l0_sum, n_tokens = 0.0, 0
    ce_with = ce_without = 0.0
    for batch in tokens.split(batch_size):
        ordinary = ordinary_positions(batch, special_ids)
        captured = {}

        def capture(act, hook, captured=captured):
            captured["x"] = act
            return act

        loss_clean = model.run_with_hooks(batch, return_type="loss", loss_per_token=True, fwd_hooks=[(name, capture)])
        x = captured["x"][ordinary.to(captured["x"].device)]  # [tokens, *hook_shape]
        latents = sae.encode(x)
        x_hat = sae.decode(latents)
        flat = latents.reshape(-1, sae.cfg.d_sae)
        fired |= (flat > 0).any(0)
        l0_sum += float((flat > 0).sum())
        n_tokens += flat.shape[0]
        xs.append(x.reshape(flat.shape[0], -1))
        x_hats.append(x_hat.reshape(flat.shape[0], -1))
        loss_spliced = model.run_with_hooks(
            batch, return_type="loss", loss_per_token=True, fwd_hooks=[(name, lambda act, hook, o=ordinary: splice(sae, act, o))]
        )
        ce_without += float(loss_clean.double().sum())
        ce_with += float(loss_spliced.double().sum())
    n_predictions = tokens.shape[0] * (tokens.shape[1] - 1)
    metrics = reconstruction_metrics(torch.cat(xs), torch.cat(x_hats))
    metrics.update(
        {
            "l0": l0_sum / n_tokens,
            "dead_fraction": float((~fired).float().mean()),
            "ce_loss_with_sae": ce_with / n_predictions,
            "ce_loss_without_sae": ce_without / n_predictions,
        }
    )
    metrics["ce_loss_increase"] = metrics["ce_loss_with_sae"] - metrics["ce_loss_without_sae"]
    return metrics


@contextmanager
def shadowed(obj, **attributes) -> Iterator[None]:
    """Inside the block, ``obj``'s attributes are ``attributes`` (instance attributes over its class's methods); after
    it, exactly what was there before: an instance attribute of that name that already existed comes back."""
    missing = object()
    before = {name: vars(obj).get(name, missing) for name in attributes}
    for name, value in attributes.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, value)
