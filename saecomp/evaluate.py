"""Evaluating an SAE spliced into a (pruned) model with SAEBench's own code.

SAEBench's top-level `run_eval` functions load the language model by name, which would evaluate on the dense
model. We call its inner functions that take a model object (GUIDE §5), so every number comes from SAEBench's
code, measured on the model we pass: the pruned one. No metric is reimplemented. Where SAEBench is known to be
wrong, its value is kept under its own name (comparable with the paper) and a correct one is logged beside it
under a name that says what it is.

Suites built so far: ``core``. The others (absorption, SCR, TPP, sparse probing, RAVEL) are not built yet and
are refused as such.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

SUITES = ("core", "absorption", "scr", "tpp", "sparse_probing", "ravel")
BUILT_SUITES = ("core",)


def check_suites(suites: list[str]) -> None:
    """A ValueError naming the first suite that is unknown or not built yet."""
    for suite in suites:
        if suite not in SUITES:
            raise ValueError(f"suite={suite!r} is not valid; valid: {', '.join(SUITES)}")
        if suite not in BUILT_SUITES:
            raise ValueError(f"suite={suite!r} is not built yet; built: {', '.join(BUILT_SUITES)}")


@dataclass(frozen=True)
class CoreSizes:
    """How much text core reads; every variant compared in one table uses the same sizes and tokens."""

    batch_size_prompts: int = 16
    """Prompts per batch (the paper: 16)."""
    n_reconstruction_batches: int = 8
    """Batches for the spliced-loss metrics (the paper: 200)."""
    n_sparsity_variance_batches: int = 8
    """Batches for the sparsity and variance metrics (the paper: 2000)."""

    @property
    def n_prompts(self) -> int:
        return self.batch_size_prompts * max(self.n_reconstruction_batches, self.n_sparsity_variance_batches)


@dataclass
class SuiteResult:
    suite: str
    output: dict
    """SAEBench's JSON output, validated against its own pydantic class."""
    metrics: dict[str, float]
    """Headline metrics, named ``<suite>.<metric>``."""
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)


def prepared_for_saebench(sae: SAE, model_name: str) -> SAE:
    """A copy of ``sae`` as SAEBench's own loader prepares a custom SAE (`general_utils.load_and_format_sae`:
    SAELens 6 metadata copied onto the config, where SAEBench 0.6 reads it)."""
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae

    copy = SAE.from_dict(sae.cfg.to_dict())
    copy.load_state_dict(sae.state_dict())
    copy.cfg.metadata.model_name = copy.cfg.metadata.model_name or model_name
    copy.eval()
    return load_and_format_sae("custom", copy, str(sae.device))[1]


def token_activation_store(model: HookedTransformer, sae: SAE, tokens: torch.Tensor):
    """SAELens's `ActivationsStore` over fixed token windows ``[n, context]`` (already BOS-first where the SAE
    wants it), in order: what SAEBench's core reads its batches from."""
    import datasets
    from sae_lens.training.activations_store import ActivationsStore

    dataset = datasets.Dataset.from_dict({"input_ids": tokens.tolist()})
    prepend_bos = sae.cfg.metadata.prepend_bos
    if prepend_bos is None:  # the windows carry BOS themselves; the store only needs a value
        sae.cfg.metadata.prepend_bos = bool((tokens[:, 0] == tokens[0, 0]).all())
    try:
        return ActivationsStore.from_sae(model, sae, dataset=dataset, context_size=tokens.shape[1], streaming=False, device=str(sae.device))
    finally:
        sae.cfg.metadata.prepend_bos = prepend_bos


def core_config(sizes: CoreSizes, context_size: int, model_name: str = "model", dtype: str = "float32"):
    """SAEBench's `CoreEvalConfig` with every core metric on and special tokens excluded from reconstruction."""
    from sae_bench.evals.core.eval_config import CoreEvalConfig

    return CoreEvalConfig(
        model_name=model_name,
        batch_size_prompts=sizes.batch_size_prompts,
        n_eval_reconstruction_batches=sizes.n_reconstruction_batches,
        n_eval_sparsity_variance_batches=sizes.n_sparsity_variance_batches,
        exclude_special_tokens_from_reconstruction=True,
        dataset="saecomp held-out windows (tokens.safetensors)",
        context_size=context_size,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
        llm_dtype=dtype,
    )


@torch.no_grad()
def run_core(
    model: HookedTransformer,
    sae: SAE,
    tokens: torch.Tensor,
    special_ids: set[int],
    sizes: CoreSizes = CoreSizes(),
    model_name: str = "model",
    sae_name: str = "sae",
) -> SuiteResult:
    """SAEBench's core metrics (`sae_bench.evals.core.main.run_evals`) on ``model`` over ``tokens``, special
    tokens excluded from reconstruction as the paper's settings do. Returns its validated JSON and headline
    metrics, with the centred explained variance beside SAEBench's."""
    from sae_bench.evals.core.eval_output import CoreEvalOutput
    from sae_bench.evals.core.main import run_evals, save_single_eval_result
    from sae_bench.sae_bench_utils import get_sae_bench_version, get_sae_lens_version

    if tokens.shape[0] < sizes.n_prompts:
        raise ValueError(
            f"core needs {sizes.n_prompts} prompts ({sizes.batch_size_prompts} a batch), but the tokens hold {tokens.shape[0]}; "
            "use fewer batches or more held-out sequences"
        )
    started = time.perf_counter()
    config = core_config(sizes, tokens.shape[1], model_name, str(next(model.parameters()).dtype).removeprefix("torch."))
    sae = prepared_for_saebench(sae, model_name)
    store = token_activation_store(model, sae, tokens)
    scalar, features = run_evals(sae=sae, activation_store=store, model=model, eval_config=config, ignore_tokens=set(special_ids))
    from sae_bench.evals.core.main import calculate_misc_metrics

    scalar["misc_metrics"] = calculate_misc_metrics(features)
    result = {"eval_cfg": config, "metrics": scalar, "feature_metrics": features, "sae_id": sae_name, "sae_set": model_name}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "core.json"
        save_single_eval_result(result, "saecomp", get_sae_lens_version(), get_sae_bench_version(), str(path), sae)
        output = json.loads(path.read_text())
    validate_output(CoreEvalOutput, output)
    metrics = {f"core.{name}": float(value) for group in output["eval_result_metrics"].values() for name, value in group.items()}
    metrics["core.explained_variance_centred"] = centred_explained_variance(model, sae, tokens[: sizes.n_prompts], special_ids)
    return SuiteResult("core", output, metrics, time.perf_counter() - started)


def validate_output(output_class, output: dict) -> None:
    """Raise unless ``output`` is what SAEBench's own pydantic output class accepts."""
    from pydantic import TypeAdapter

    TypeAdapter(output_class).validate_python(output)


@torch.no_grad()
def centred_explained_variance(
    model: HookedTransformer, sae: SAE, tokens: torch.Tensor, special_ids: set[int], batch_size: int = 16
) -> float:
    """1 - E||x - x_hat||^2 / E||x - E x||^2 over the ordinary tokens core reads: the variance ratio that
    SAEBench 0.6's `explained_variance` (E||x||^2 - (mean x^2)^2 in the denominator) is not. One pass of the
    model up to the SAE's block, no splicing."""
    from saecomp.saes import ordinary_positions, reconstruction_metrics

    hook_name = sae.cfg.metadata.hook_name
    layer = int(hook_name.split(".")[1])
    xs, x_hats = [], []
    for batch in tokens.split(batch_size):
        _, cache = model.run_with_cache(batch, names_filter=hook_name, stop_at_layer=layer + 1)
        x = cache[hook_name][ordinary_positions(batch, special_ids)]  # [tokens, *hook_shape]
        x_hat = sae.decode(sae.encode(x))
        xs.append(x.reshape(x.shape[0], -1))
        x_hats.append(x_hat.reshape(x.shape[0], -1))
    return reconstruction_metrics(torch.cat(xs), torch.cat(x_hats))["explained_variance"]
