"""Evaluating an SAE spliced into a (pruned) model with SAEBench's own code.

SAEBench's top-level `run_eval` functions load the language model by name, which would evaluate on the dense
model. We call its inner functions that take a model object (GUIDE §5), so every number comes from SAEBench's
code, measured on the model we pass: the pruned one. No metric is reimplemented. Where SAEBench is known to be
wrong, its value is kept under its own name (comparable with the paper) and a correct one is logged beside it
under a name that says what it is: core's centred explained variance, SCR's and TPP's ``_padding_masked`` twins
(``padding_masked_ablations``).

Suites: ``core``, ``absorption``, ``scr``, ``tpp``, ``sparse_probing``, ``ravel`` (on the Hugging Face model, as
SAEBench's RAVEL runs). For each, SAEBench's own inner function computes the numbers and SAEBench's own output classes
pack them, the way its top-level ``run_eval`` does; every cache folder it takes is a fresh one of ours, so nothing
is reused across runs and nothing is written inside site-packages. The one exception is SAEBench's own: the
model-side work of SCR, TPP and sparse probing (activations on the labelled texts, probes trained on them) does not
depend on the SAE, and `run_eval` computes it once for its whole list of SAEs. Given a ``shared`` folder, SAEs
evaluated on the same model, hook and config share it the same way (``model_side_folder``, SHARED_MODEL_SIDE), each
SAE side starting from the random state a fresh run has there (``per_dataset_random_state``), so that each SAE scores
exactly as a fresh run; the pipeline passes one per run and deletes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

from saecomp.names import SUITES, check_suites  # noqa: F401, E402  (re-exported; torch-free there)
from saecomp.saes import shadowed  # noqa: E402

SHARED_MODEL_SIDE = ("scr", "tpp", "sparse_probing")
"""The suites whose model-side work SAEs on one model and hook share (``model_side_folder``), each with the random
state its SAE side starts from (``per_dataset_random_state``)."""

SAE_SIDE_ENTRIES = {
    "scr": ("sae_bench.evals.scr_and_tpp.main", "get_all_node_effects_for_one_sae"),
    "tpp": ("sae_bench.evals.scr_and_tpp.main", "get_all_node_effects_for_one_sae"),
    "sparse_probing": ("sae_bench.sae_bench_utils.activation_collection", "get_sae_meaned_activations"),
}
"""Per suite, the SAEBench function its ``run_eval_single_dataset`` calls first after the model side, computed or
loaded (module, name; looked up at call time there): where the SAE side starts, once per dataset (sparse probing:
twice, for its train and test texts, with no draw between). Every SAE side draws from the global generators
(`probe_training.prepare_probe_data` samples and shuffles the texts each probe reads; sparse probing trains probes on
the latents), from the state the model side left, which a run that loads the model side never reaches."""
MODEL_SIDE_RESEEDED = {"sparse_probing": ("sae_bench.evals.sparse_probing.main", "get_dataset_activations")}
"""The suites whose SAE side draws a number of values that depends on the SAE: sparse probing's probes on the
latents stop early. SAEBench threads one generator through all datasets of a run, so there the next dataset's model
side (its probes) would depend on the SAE before it. Each dataset's model side starts from the suite's seed instead,
where this function (called first when it is computed) is called: SAEBench's numbers for the dataset evaluated
alone. SCR's and TPP's SAE sides draw fixed amounts, so their datasets follow SAEBench's one generator unchanged."""
RANDOM_STATES_FILE = "saecomp_sae_side_random_states.pt"
MODEL_PROBE_OUTCOMES_FILE = "saecomp_model_probe_test_outcomes.pt"
"""Per dataset of sparse probing, the texts its model probes were tested on and their answers, kept beside SAEBench's
model side for the runs that load it (``sparse_probing_accuracies``)."""
CLEAN_OUTCOMES_FILE = "saecomp_clean_test_outcomes.pt"
"""Per dataset run of SCR or TPP, the texts its clean accuracies were tested on and the probes' answers, kept beside
SAEBench's model side for the runs that load it (``scr_tpp_accuracies``)."""


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
    tags: dict[str, str] = field(default_factory=dict)
    """How it was computed, as MLflow tags (e.g. where SCR's model side came from)."""
    uncertainty: dict | None = None
    """What stands behind a suite's standard errors, logged as ``uncertainty/<suite>.json``: core's bootstrap behind
    its ``core.<metric>.bootstrap_se`` (unit, size, seed, the full-sample values and every replicate); sparse probing's
    bootstrap of the test texts behind its ``sparse_probing.<metric>.bootstrap_se`` (``sparse_probing_bootstrap``; the
    closed form, ``binomial_se``, where untraced: ``sparse_probing_uncertainty``); SCR's
    and TPP's bootstrap of the test texts behind their ``<suite>.<metric>.bootstrap_se`` (``binomial_se`` where the
    probe tests could not be traced; ``scr_tpp_uncertainty``); absorption's word counts behind its
    ``absorption.<metric>.word_se`` (``absorption_uncertainty``); RAVEL's traced pairs behind its
    ``ravel.<metric>.cluster_se`` (``ravel_standard_errors``; ``binomial_se`` over the pair counts where untraced)."""
    corrected: dict | None = None
    """Our corrected values beside SAEBench's, per dataset, logged as ``corrected/<suite>.json`` (SCR and TPP: with
    the padded positions masked in the ablation, ``padding_masked_ablations``)."""


def prepared_for_saebench(sae: SAE, model_name: str) -> SAE:
    """A copy of ``sae`` as SAEBench's own loader prepares a custom SAE (`general_utils.load_and_format_sae`:
    SAELens 6 metadata copied onto the config, where SAEBench 0.6 reads it)."""
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae

    copy = _copy(sae)
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
    documents: torch.Tensor | None = None,
) -> SuiteResult:
    """SAEBench's core metrics (`sae_bench.evals.core.main.run_evals`) on ``model`` over ``tokens``, special
    tokens excluded from reconstruction as the paper's settings do. Returns its validated JSON and headline
    metrics, with the centred explained variance beside SAEBench's. ``documents`` ``[n]``: the text each window was
    cut from (`data.held_out_windows`, never decreasing), the unit the bootstrap resamples; None: each window its own."""
    from sae_bench.evals.core.eval_output import CoreEvalOutput
    from sae_bench.evals.core.main import run_evals, save_single_eval_result
    from sae_bench.sae_bench_utils import get_sae_bench_version, get_sae_lens_version
    from sae_bench.sae_bench_utils.general_utils import str_to_dtype

    if tokens.shape[0] < sizes.n_prompts:
        raise ValueError(
            f"core needs {sizes.n_prompts} prompts ({sizes.batch_size_prompts} a batch), but the tokens hold {tokens.shape[0]}; "
            "use fewer batches or more held-out sequences"
        )
    if documents is not None and (documents.shape != tokens.shape[:1] or bool((documents.diff() < 0).any())):
        raise ValueError(
            f"documents must name the text of each of the {tokens.shape[0]} windows, in order (never decreasing); "
            f"got shape {tuple(documents.shape)}"
        )
    started = time.perf_counter()
    config = core_config(sizes, tokens.shape[1], model_name, str(next(model.parameters()).dtype).removeprefix("torch."))
    # in the model's dtype, as SAEBench's core `run_eval` casts it (`sae.to(dtype=llm_dtype)`) and the other suites here do
    sae = prepared_for_saebench(sae, model_name).to(dtype=str_to_dtype(config.llm_dtype))
    store = token_activation_store(model, sae, tokens)
    # The per-latent densities are resampled inside the loop (their per-sequence counts, [sequences, d_sae], would not be
    # kept at the experiment files' sizes), so the variance loop's resamples are drawn before it: core_bootstrap's own.
    batches = (sizes.n_reconstruction_batches, sizes.n_sparsity_variance_batches)
    loops = [loop_units(documents, sizes.batch_size_prompts * n) for n in batches if n]
    density_draws = variance_units = None
    if sizes.n_sparsity_variance_batches:
        # float32: small whole numbers, exact; half the memory of float64 on the model's device (128 MB at 32,000 sequences)
        density_draws = resampled_sequences(loops, BOOTSTRAP_REPLICATES, BOOTSTRAP_SEED)[-1][: density_replicates(sae.cfg.d_sae)].float()
        variance_units = None if documents is None else loops[-1]
    with SplicedLossRecorder.recording() as spliced, VarianceLoopSums.recording(density_draws, variance_units) as variance:
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

    def bootstrap() -> dict:
        found = core_bootstrap(spliced, variance, documents=documents)
        metrics["core.explained_variance_centred"] = found["full_sample"]["explained_variance_centred"]
        found["sample_id"] = core_sample_id(tokens, special_ids, sizes, documents)
        return found

    # ours beside SAEBench's numbers (the errors and the centred explained variance, from the same sums): a failure
    # there leaves SAEBench's numbers logged and says why
    uncertainty, tags = standard_errors("core", "bootstrap_se", metrics, bootstrap)
    if uncertainty and uncertainty.get("se_skipped"):
        tags["saecomp.core.se_skipped"] = uncertainty["se_skipped"]
    for name, jackknife in (uncertainty or {}).get("jackknife", {}).items():
        if f"core.{name}" in metrics:
            metrics[f"core.{name}.jackknife_se"] = jackknife["se"]
    return SuiteResult("core", output, metrics, time.perf_counter() - started, tags=tags, uncertainty=uncertainty)


def core_sample_id(tokens: torch.Tensor, special_ids: set[int], sizes: CoreSizes, documents: torch.Tensor | None) -> str:
    """What core's bootstrap resampled: runs with the same sample id, seed and size drew the same resamples, so their
    replicates pair (compare: the standard error of a difference between two variants). The tokens read, the sizes
    (the spliced losses and the variance loop read different numbers of them) and the units: the same windows
    resampled by document are other resamples than by window."""
    read = json.dumps([sorted(special_ids), dataclasses.asdict(sizes)]).encode()
    if documents is not None:
        read += loop_units(documents, sizes.n_prompts).numpy().tobytes()
    return hashlib.sha256(tokens[: sizes.n_prompts].cpu().numpy().tobytes() + read).hexdigest()[:20]


BOOTSTRAP_REPLICATES = 1000
BOOTSTRAP_SEED = 0
"""Every variant's bootstrap draws the same resamples of the same units (same windows, documents and seed)."""
DENSITY_BOOTSTRAP_BYTES = 1 << 30
"""Memory for the per-latent densities' replicates (``[replicates, d_sae]`` float64 firing counts): 1,000 replicates up
to d_sae 134,217; wider SAEs resample the densities with fewer of the same draws (`density_replicates`). At its peak,
while pending counts are added, the table is joined by their float32 product (half its size), the pending counts
(`DENSITY_FLUSH_SEQUENCES`) and the draws (``[replicates, sequences]`` float32)."""


def density_replicates(d_sae: int, replicates: int = BOOTSTRAP_REPLICATES) -> int:
    """How many of the bootstrap's replicates resample the per-latent densities of an SAE ``d_sae`` wide: all of them
    where their firing counts fit ``DENSITY_BOOTSTRAP_BYTES``, else the first that do (at least 100)."""
    return min(replicates, max(100, DENSITY_BOOTSTRAP_BYTES // (8 * d_sae)))


def loop_units(documents: torch.Tensor | None, n: int) -> int | torch.Tensor:
    """What core's bootstrap resamples in a loop over the first ``n`` test windows: the windows themselves (``n``)
    where ``documents`` is None, else the texts they were cut from, numbered 0, 1, ... in order (``[n]``), since
    windows of one text are not independent: in a simulation where each text's 1 to 6 windows share a level of their
    own (tests/test_evaluate.py), a bootstrap of windows found 0.51x the true spread of a mean, one of documents 0.97x."""
    if documents is None:
        return n
    if len(documents) < n:
        raise ValueError(f"{len(documents)} windows have a document, but core's loop reads {n}")
    return torch.unique(documents[:n].cpu(), return_inverse=True)[1]


def resampled_sequences(loops: list[int | torch.Tensor], replicates: int, seed: int) -> list[torch.Tensor]:
    """For each of core's loops over its test sequences (in this order: the spliced losses', the variance loop's),
    how often each sequence is drawn in each bootstrap replicate: ``[replicates, n]`` float64, one generator drawing
    the loops in turn. A loop given as ``n`` resamples its ``n`` sequences; given as units ``[n]`` (`loop_units`: each
    sequence's document, numbered from 0) it resamples the units, and a sequence is drawn as often as its unit is (a
    cluster bootstrap; units ``arange(n)`` draw what ``n`` draws)."""
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for loop in loops:
        units = torch.arange(loop) if isinstance(loop, int) else loop  # [n]: each sequence's unit
        k = int(units.max()) + 1 if len(units) else 0
        picks = torch.randint(k, (replicates, k), generator=generator)  # [replicates, k]
        drawn = torch.zeros(replicates, k, dtype=torch.float64).scatter_add_(1, picks, torch.ones(replicates, k, dtype=torch.float64))
        draws.append(drawn[:, units])  # [replicates, n]
    return draws


class SplicedLossRecorder:
    """Per-sequence sums of SAEBench core's per-token spliced losses, masked exactly as SAEBench masks them before
    it averages them away. The one adapter through which saecomp sees them: SAEBench keeps only their means, and a
    bootstrap over the test sequences needs the values per sequence."""

    def __init__(self):
        self.sums: dict[str, list[torch.Tensor]] = {}  # metric -> per batch, [batch] float64
        self.counts: dict[str, list[torch.Tensor]] = {}  # metric -> per batch, [batch] tokens kept

    @classmethod
    @contextmanager
    def recording(cls) -> Iterator[SplicedLossRecorder]:
        import sae_bench.evals.core.main as core

        recorder, original = cls(), core.get_recons_loss

        def recorded(sae, model, batch_tokens, activation_store, *args, ignore_tokens=frozenset(), **kwargs):
            out = original(sae, model, batch_tokens, activation_store, *args, ignore_tokens=ignore_tokens, **kwargs)
            recorder.add(batch_tokens, out, ignore_tokens)
            return out

        core.get_recons_loss = recorded  # get_downstream_reconstruction_metrics looks it up in its module per batch
        try:
            yield recorder
        finally:
            core.get_recons_loss = original

    def add(self, batch_tokens: torch.Tensor, per_token: dict[str, torch.Tensor], ignore_tokens) -> None:
        keep = torch.ones_like(batch_tokens, dtype=torch.bool)  # [batch, pos]
        for token in ignore_tokens:  # SAEBench's mask: drop positions holding an ignored token
            keep &= batch_tokens != token
        for name, values in per_token.items():  # [batch, pos] (KL) or [batch, pos - 1] (CE: no target for the last)
            mask = keep[:, : values.shape[1]].to(values.device)
            self.sums.setdefault(name, []).append((values.double() * mask).sum(dim=1).cpu())
            self.counts.setdefault(name, []).append(mask.sum(dim=1).double().cpu())


@dataclass
class VarianceLoopSums:
    """Per-sequence sums, in float64, of what SAEBench core's sparsity-and-variance loop averages, so that the full
    sample and any resample of sequences recompute each of its statistics (`core_bootstrap`). One tensor per batch.

    Besides SAEBench's own statistics, the sums of our centred explained variance ``1 - E||x - x_hat||^2 /
    E||x - E x||^2`` (SAEBench 0.6's `explained_variance` puts E||x||^2 - (E||x||^2 / d)^2 in the denominator: not a
    variance ratio). SAEBench averages some statistics per batch first (``mse`` divides by the batch's token count,
    ``explained_variance`` averages per-batch means), so those sums carry the batch's token count ``N_b`` too."""

    x_sum: list[torch.Tensor] = field(default_factory=list)  # [batch, d] per batch, on the model's device
    sums: list[torch.Tensor] = field(default_factory=list)  # [batch, len(SUMS)] per batch, on the model's device
    d_in: int = 0
    density_draws: torch.Tensor | None = None
    """``[replicates, n]``: how often each of the loop's sequences is drawn in each replicate (`resampled_sequences`), set
    before the loop, for the per-latent densities' bootstrap; None: the densities are not resampled."""
    units: torch.Tensor | None = None
    """``[n]``: the unit (document) of each of the loop's sequences, numbered 0, 1, ... in order with no gaps
    (`loop_units`), which frac_alive's jackknife deletes; None: each sequence is its own."""
    fired: torch.Tensor | None = None  # [d_sae] float64: each latent's count of tokens where it is above 0 (SAEBench's)
    fired_resampled: torch.Tensor | None = None  # [replicates, d_sae] float64: the same counts in each resample
    units_fired: torch.Tensor | None = None  # [d_sae] int64: in how many units each latent is above 0 somewhere
    last_fired_in: torch.Tensor | None = None  # [d_sae] int64: the last such unit (its number in the loop); -1: none
    sequences_counted: int = 0
    pending: list[torch.Tensor] = field(default_factory=list)  # [batch, d_sae] float32 per batch, not yet resampled
    sequences_seen: int = 0
    sequences_flushed: int = 0
    density_skipped: str | None = None  # why the densities were not resampled, where they were to be

    SUMS = (
        "tokens", "batch_share", "x_squared", "error_squared", "x_squared_over_batch", "error_squared_over_batch",
        "cossim", "explained_variance_legacy", "l0", "l1", "l2_norm_in", "l2_norm_out", "l2_ratio",
        "x_hat_squared", "x_dot_x_hat",
    )  # fmt: skip

    def totals(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every sequence's sum of x ([n, d]) and its other sums by name ([n] each), on the CPU."""
        sums = torch.cat(self.sums).cpu()  # [n, len(SUMS)]
        return torch.cat(self.x_sum).cpu(), {name: sums[:, i] for i, name in enumerate(self.SUMS)}

    def batch_of_sequence(self) -> torch.Tensor:
        """``[n]``: the index of the SAEBench batch each sequence was read in."""
        rows = torch.tensor([len(part) for part in self.sums])
        return torch.repeat_interleave(torch.arange(len(rows)), rows)

    @classmethod
    @contextmanager
    def recording(cls, density_draws: torch.Tensor | None = None, units: torch.Tensor | None = None) -> Iterator[VarianceLoopSums]:
        """Collects the sums inside SAEBench core's own sparsity-and-variance loop, from the very ``x`` it encodes, the
        latents it decodes and the ``x_hat`` it gets back, masked as it masks them: no second pass of the model (a
        separate pass for the centred variance cost GPT-2 small's core 1.19x SAEBench's alone), and O(sequences x d)
        memory where keeping the activations would not fit at the experiment files' 32,000 sequences. With
        ``density_draws`` (``[replicates, n]``), each latent's firing count in each of those resamples too; ``units``: see
        the field."""
        import sae_bench.evals.core.main as core

        from saecomp.saes import ordinary_positions

        recorder, original = cls(density_draws=density_draws, units=units), core.get_sparsity_and_variance_metrics

        def recorded(sae, model, activation_store, *args, ignore_tokens=frozenset(), **kwargs):
            batch_tokens, inputs = [], []
            get_batch_tokens, encode, decode = activation_store.get_batch_tokens, sae.encode, sae.decode

            def recording_get_batch_tokens(*a, **k):
                batch_tokens.append(get_batch_tokens(*a, **k))  # [batch, pos]
                return batch_tokens[-1]

            def recording_encode(x, *a, **k):  # x: [batch, pos, d], the hook's activations as SAEBench feeds them
                inputs.append(x)
                return encode(x, *a, **k)

            def recording_decode(latents, *a, **k):  # latents: [batch, pos, d_sae]; once per batch, after its encode
                x_hat = decode(latents, *a, **k)  # [batch, pos, d]
                ordinary = ordinary_positions(batch_tokens[-1], set(ignore_tokens) - {None})  # SAEBench's own mask
                keep = ordinary.to(x_hat.device)
                recorder.add(inputs.pop()[keep], x_hat[keep], latents[keep], ordinary)
                return x_hat

            with (
                shadowed(activation_store, get_batch_tokens=recording_get_batch_tokens),
                shadowed(sae, encode=recording_encode, decode=recording_decode),
            ):
                return original(sae, model, activation_store, *args, ignore_tokens=ignore_tokens, **kwargs)

        core.get_sparsity_and_variance_metrics = recorded  # run_evals looks it up in its module when it runs
        try:
            yield recorder
        finally:
            core.get_sparsity_and_variance_metrics = original

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, latents: torch.Tensor, ordinary: torch.Tensor) -> None:
        """x, x_hat: [tokens, d], latents: [tokens, d_sae], the ordinary tokens of one batch in sequence order, as
        SAEBench's loop flattens them; ordinary: [batch, pos]."""
        per_sequence = ordinary.sum(dim=1).to(x.device)  # [batch]; the mask comes from CPU tokens, x from the model's device
        # output_size: no device-to-host sync to learn the length (the GPU's queue keeps running)
        sequence_of = torch.repeat_interleave(torch.arange(len(per_sequence), device=x.device), per_sequence, output_size=x.shape[0])
        x, x_hat = x.double(), x_hat.double()
        rows, in_batch = len(per_sequence), float(x.shape[0])  # N_b: SAEBench's flattened_mask.sum()
        self.d_in = x.shape[1]
        # kept on the device until the end: a copy to the CPU per batch would stall a GPU's queue 2,000 times
        self.x_sum.append(torch.zeros(rows, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, sequence_of, x))
        x_squared, error_squared = (x**2).sum(-1), ((x - x_hat) ** 2).sum(-1)  # [tokens]
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        per_token = {  # each as SAEBench computes it per token (its float32, here in float64)
            "tokens": torch.ones_like(x_squared),
            "batch_share": torch.full_like(x_squared, 1 / in_batch),  # sums to 1 per batch
            "x_squared": x_squared,
            "error_squared": error_squared,
            "x_squared_over_batch": x_squared / in_batch,
            "error_squared_over_batch": error_squared / in_batch,  # SAEBench's per-token `mse`
            "cossim": ((x / norm_in[:, None]) * (x_hat / norm_out[:, None])).sum(-1),
            # centred on the batch's own mean, per token (SAEBench's "old, incorrect" formula)
            "explained_variance_legacy": 1 - error_squared / ((x - x.mean(0)) ** 2).sum(-1),
            "l0": (latents != 0).sum(-1, dtype=torch.float64),  # no float64 copy of [tokens, d_sae]
            "l1": latents.sum(-1, dtype=torch.float64),
            "l2_norm_in": norm_in,
            "l2_norm_out": norm_out,
            "l2_ratio": norm_out / torch.where(norm_in.abs() < 1e-4, torch.ones_like(norm_in), norm_in),
            "x_hat_squared": norm_out**2,  # relative_reconstruction_bias: per batch, mean ||x_hat||^2 / mean x.x_hat
            "x_dot_x_hat": (x * x_hat).sum(-1),
        }
        values = torch.stack([per_token[name] for name in self.SUMS], dim=1)  # [tokens, len(SUMS)]
        self.sums.append(torch.zeros(rows, len(self.SUMS), dtype=torch.float64, device=x.device).index_add_(0, sequence_of, values))
        self.add_firing(latents, ordinary.sum(dim=1).tolist())  # (the mask is on the CPU: no device sync)

    def add_firing(self, latents: torch.Tensor, lengths: list[int]) -> None:
        """Each latent's count of ordinary tokens where it is above 0 (SAEBench's feature density counts ``> 0``, not
        ``!= 0`` as its l0), over the whole sample and, with ``density_draws``, in each resample of sequences.
        latents: [tokens, d_sae], the batch's sequences one after another, ``lengths`` tokens each."""
        rows, device, d_sae = len(lengths), latents.device, latents.shape[1]
        # float32 is exact here: a sequence's count is at most its length, far below 2^24; the totals are float64.
        # One sequence at a time: a comparison and a sum, no float copy of the batch's latents (a scatter-add of one
        # was 1.7x slower on the CPU, and a batch of Gemma Scope's 16k latents over 16 x 1024 tokens is 1 GB as float)
        per_sequence = torch.empty(rows, d_sae, dtype=torch.float32, device=device)  # [rows, d_sae]
        start = 0
        for row, length in enumerate(lengths):
            torch.sum(latents[start : start + length] > 0, dim=0, dtype=torch.float32, out=per_sequence[row])
            start += length
        counts = per_sequence.sum(0, dtype=torch.float64)  # [d_sae]
        self.fired = counts if self.fired is None else self.fired + counts
        self.count_units_fired(per_sequence > 0)
        if self.density_draws is None:
            return
        if self.sequences_seen + rows > self.density_draws.shape[1]:
            # ours, beside SAEBench's numbers: never an error inside SAEBench's loop
            self.stop_resampling(
                f"SAEBench's variance loop read more than the {self.density_draws.shape[1]} sequences the per-latent "
                "bootstrap drew resamples of (CoreSizes and SAEBench's loop disagree)"
            )
            return
        self.pending.append(per_sequence)
        self.sequences_seen += rows
        if sum(len(part) for part in self.pending) >= DENSITY_FLUSH_SEQUENCES:
            self.flush_firing()

    def count_units_fired(self, fired: torch.Tensor) -> None:
        """``fired`` [rows, d_sae]: whether each latent is above 0 somewhere in each of the batch's sequences. Keeps, per
        latent, how many units (``units``: documents; else sequences) it fired in and the last of them: what
        frac_alive's jackknife needs (`frac_alive_jackknife`), in O(d_sae) memory. A unit's sequences are consecutive,
        and may run across any number of batches."""
        rows = fired.shape[0]
        if rows == 0:  # (never an error inside SAEBench's loop)
            return
        first, stop = self.sequences_counted, self.sequences_counted + rows
        if self.units is None:
            present, by_unit = torch.arange(first, stop, device=fired.device), fired  # [rows], [rows, d_sae]
        elif stop > len(self.units):
            return  # more sequences than units: counted short, so the jackknife is skipped and says so (core_bootstrap)
        else:
            if self.units.device != fired.device:  # once: beside the latents, no copy (and no wait on a GPU) per batch
                self.units = self.units.to(fired.device)
            units = self.units[first:stop]  # [rows]: numbered consecutively (loop_units), so each is the one before or next
            # row r of by_unit: the batch's r-th unit (rows past its last unit stay empty); no unique(), whose size a
            # GPU would have to report back
            present = units[0] + torch.arange(rows, device=fired.device)  # [rows]
            by_unit = torch.zeros(rows, fired.shape[1], dtype=torch.int32, device=fired.device)  # [rows, d_sae]
            by_unit = by_unit.index_add_(0, units - units[0], fired.int()) > 0
        last = torch.where(by_unit, present[:, None], -1).amax(0)  # [d_sae]
        here = by_unit.sum(0)  # [d_sae] int64
        if self.units_fired is None:
            self.units_fired, self.last_fired_in = here, last
        else:
            # the batch's first unit, where it began in the batch before, was counted there for the latents it fired in
            self.units_fired += here - (by_unit[0] & (self.last_fired_in == present[0])).long()
            self.last_fired_in = torch.maximum(self.last_fired_in, last)
        self.sequences_counted += rows

    def flush_firing(self) -> None:
        """Add the pending sequences' firing counts, as drawn in each resample, to ``fired_resampled``: one product
        ``[replicates, sequences] @ [sequences, d_sae]`` for many batches, since the table's update (``[replicates,
        d_sae]`` float64, read and written) costs more than the product on a CPU."""
        if not self.pending or self.density_draws is None:
            return
        block = torch.cat(self.pending)  # [sequences, d_sae]
        self.pending.clear()
        first = self.sequences_flushed
        self.sequences_flushed += len(block)
        if self.density_draws.device != block.device:  # once: the draws live beside the latents (a GPU's queue keeps running)
            self.density_draws = self.density_draws.to(block.device)
        weights = self.density_draws[:, first : self.sequences_flushed]  # [replicates, sequences]
        if self.fired_resampled is None:
            self.fired_resampled = torch.zeros(len(weights), block.shape[1], dtype=torch.float64, device=block.device)
        # float32 where every sum is an integer below 2^24 (then exact), else float64; either way exact
        if float(weights.sum(1).max()) * float(block.max()) < FLOAT32_EXACT_BELOW:
            self.fired_resampled.add_(weights.float() @ block)  # in place: float32 product, float64 table
        else:
            self.fired_resampled.add_(weights.double() @ block.double())

    def stop_resampling(self, reason: str) -> None:
        """No errors for the per-latent summaries, and why: ours, so warned, never raised into SAEBench's loop."""
        warnings.warn(f"core: no standard errors for the per-latent density summaries ({reason})", stacklevel=2)
        self.density_skipped, self.density_draws, self.fired_resampled = reason, None, None
        self.pending.clear()


FLOAT32_EXACT_BELOW = 2**24
"""Whole numbers below this are exact in float32, and so are their sums while they stay below it."""
DENSITY_FLUSH_SEQUENCES = 256
"""Sequences whose firing counts are added to the resampled table at once (`VarianceLoopSums.flush_firing`): 16
batches of 16; 256 x 32,768 latents is 34 MB of pending float32 counts."""


TOKEN_MEANS = ("mse", "cossim", "explained_variance_legacy", "l0", "l1", "l2_norm_in", "l2_norm_out", "l2_ratio")
"""SAEBench core's statistics that are plain means over the ordinary tokens of its variance loop (``mse``'s tokens
already divided by their batch's count, as SAEBench divides them)."""


def core_bootstrap(
    spliced: SplicedLossRecorder,
    variance: VarianceLoopSums,
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = BOOTSTRAP_SEED,
    documents: torch.Tensor | None = None,
) -> dict:
    """Standard errors of core's metrics by a bootstrap over the test documents (``documents`` ``[n]``: the text each
    window was cut from; every window of a drawn text counts, since the windows and tokens of one text are not
    independent: `loop_units`), or over the windows where ``documents`` is None: the spliced-loss metrics, recomputed
    from SAEBench's per-token losses; its sparsity-and-variance loop's token means and its ``explained_variance``; and our centred
    explained variance. On the full sample each equals SAEBench's number in a float32 model (tests/test_evaluate.py);
    in a bfloat16 one SAEBench sums in bfloat16 and these sums, in float64, are the more exact. The per-latent
    densities' summaries (``freq_over_1_percent`` and the others of SAEBench's `calculate_misc_metrics`, which scores
    each replicate) where the loop recorded the densities in each resample (``density_draws``): these are shares of
    latents over a threshold, so their bootstrap is rougher than a mean's. ``frac_alive`` has a jackknife over the same
    units instead (``jackknife``, `frac_alive_jackknife`): its bootstrap runs low. Not covered: the SAE's weights alone
    (``average_max_*_cosine_sim``: no sampling error) and the per-latent details.

    SAEBench's per-batch statistics (``explained_variance``, ``relative_reconstruction_bias``) are resampled within
    SAEBench's own batches: a drawn sequence counts in the batch it was read in, each token weighing 1 / that batch's
    token count as there, so every batch weighs by the share of its tokens drawn (1 each on the full sample)."""
    samples, full, n_sequences, density = {}, {}, {}, {}
    unit = "sequence" if documents is None else "document"
    lengths = [int(sum(len(part) for part in spliced.sums[next(iter(spliced.sums))]))] if spliced.sums else []
    lengths += [sum(len(part) for part in variance.sums)] if variance.x_sum else []
    loops = [loop_units(documents, n) for n in lengths]
    names = (["spliced_losses"] if spliced.sums else []) + (["sparsity_variance"] if variance.x_sum else [])
    n_units = {name: loop if isinstance(loop, int) else int(loop.max()) + 1 for name, loop in zip(names, loops, strict=True)}
    draws = iter(resampled_sequences(loops, replicates, seed))

    def multiplicities(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """How often each sequence is drawn: [1, n] for the full sample, [replicates, n] for the resamples."""
        return torch.ones(1, n, dtype=torch.float64), next(draws)

    if spliced.sums:
        sums = {name: torch.cat(parts) for name, parts in spliced.sums.items()}  # [n sequences]
        counts = {name: torch.cat(parts) for name, parts in spliced.counts.items()}
        n = n_sequences["spliced_losses"] = next(iter(sums.values())).shape[0]
        for out, weights in zip((full, samples), multiplicities(n), strict=True):
            means = {name: (weights @ sums[name]) / (weights @ counts[name]) for name in sums}  # [r]
            if {"ce_loss_with_sae", "ce_loss_without_sae", "ce_loss_with_ablation"} <= set(means):
                means["ce_loss_score"] = (means["ce_loss_with_ablation"] - means["ce_loss_with_sae"]) / (
                    means["ce_loss_with_ablation"] - means["ce_loss_without_sae"]
                )
            if {"kl_div_with_sae", "kl_div_with_ablation"} <= set(means):
                means["kl_div_score"] = (means["kl_div_with_ablation"] - means["kl_div_with_sae"]) / means["kl_div_with_ablation"]
            out.update(means)
    if variance.x_sum:
        x_sum, sums = variance.totals()  # [n, d], {name: [n]}
        n = n_sequences["sparsity_variance"] = x_sum.shape[0]
        once, drawn = multiplicities(n)
        for out, weights in zip((full, samples), (once, drawn), strict=True):
            tokens = weights @ sums["tokens"]  # [r]
            mean = (weights @ x_sum) / tokens[:, None]  # [r, d]
            total_variance = weights @ sums["x_squared"] - tokens * (mean**2).sum(-1)
            out["explained_variance_centred"] = 1 - (weights @ sums["error_squared"]) / total_variance
            for name in TOKEN_MEANS:
                out[name] = (weights @ sums["error_squared_over_batch" if name == "mse" else name]) / tokens
            # SAEBench's: means over batches of each batch's token means, so weighted by 1 / N_b per token
            batches = weights @ sums["batch_share"]
            mean_squares = (weights @ sums["x_squared_over_batch"]) / batches
            residual = (weights @ sums["error_squared_over_batch"]) / batches
            out["explained_variance"] = 1 - residual / (mean_squares - (mean_squares / variance.d_in) ** 2)
            # SAEBench's: per batch the ratio of its means of ||x_hat||^2 and x.x_hat (its 1 / N_b cancels), averaged
            # over the batches; each batch weighs by the share of its tokens drawn
            batch_of = variance.batch_of_sequence()  # [n]
            share = _per_batch(weights, sums["batch_share"], batch_of)  # [r, batches]; 0 where none was drawn
            ratio = _per_batch(weights, sums["x_hat_squared"], batch_of) / _per_batch(weights, sums["x_dot_x_hat"], batch_of)
            out["relative_reconstruction_bias"] = (share * torch.where(share > 0, ratio, 0.0)).sum(1) / share.sum(1)
        variance.flush_firing()
        if variance.fired_resampled is not None:
            used = variance.density_draws.shape[0]  # the first of the replicates (density_replicates)
            if variance.sequences_flushed != n:
                variance.stop_resampling(f"{variance.sequences_flushed} of the loop's {n} sequences were resampled")
            elif not torch.equal(variance.density_draws.cpu().double(), drawn[:used]):
                variance.stop_resampling("the densities were resampled with other draws than core's bootstrap")
            else:
                full.update(_density_summaries(variance.fired[None], once @ sums["tokens"]))
                samples.update(_density_summaries(variance.fired_resampled, drawn[:used] @ sums["tokens"]))
                density["density_replicates"] = used
        if variance.density_skipped:
            density["density_skipped"] = variance.density_skipped
        # frac_alive by the jackknife, not the bootstrap (whose resamples never revive a dead latent: it runs low)
        for out in (full, samples):
            out.pop("frac_alive", None)
        same_units = (variance.units is None) == (documents is None) and (
            documents is None or torch.equal(variance.units.cpu(), loops[-1]))  # fmt: skip
        units = n_units["sparsity_variance"]
        if variance.units_fired is not None and variance.sequences_counted == n and units > 1 and same_units:
            density["jackknife"] = {"frac_alive": frac_alive_jackknife(variance.units_fired, variance.last_fired_in, units, unit)}
        elif variance.units_fired is not None:
            density["jackknife_skipped"] = (
                f"frac_alive's jackknife needs every one of the loop's sequences, from two or more units, and the units "
                f"the bootstrap resamples: it counted {variance.sequences_counted} of {n} sequences from {units} units"
                + ("" if same_units else ", by other units")
            )
    few = {loop: k for loop, k in n_units.items() if k < MIN_BOOTSTRAP_UNITS}
    if few:  # the full-sample values stand (the centred explained variance among them); no errors claimed
        samples = {}
        density.pop("jackknife", None)
        density["se_skipped"] = density["jackknife_skipped"] = (
            f"core's loops read too few test {unit}s to resample: "
            + ", ".join(f"{loop} {k}" for loop, k in few.items())
            + f" (fewer than {MIN_BOOTSTRAP_UNITS}); read more evaluation.n_sequences or more, shorter texts"
        )
    return {
        "unit": "sequence" if documents is None else "document (every test window cut from a drawn text)",
        "n_units": n_units,
        "replicates": replicates,
        "seed": seed,
        "n_sequences": n_sequences,
        "full_sample": {name: float(v[0]) for name, v in full.items()},
        "se": {name: float(v.std()) for name, v in samples.items()},
        "samples": {name: v.tolist() for name, v in samples.items()},
        **density,
    }


MIN_BOOTSTRAP_UNITS = 5
"""Below this many test documents (or windows) in one of core's loops, no bootstrap: one text makes every replicate the
full sample (an error of exactly 0), and a few take few distinct values (3 with two texts, 35 with four) and run low
by sqrt((k - 1) / k)."""


def frac_alive_jackknife(units_fired: torch.Tensor, last_fired_in: torch.Tensor, n: int, unit: str = "sequence") -> dict:
    """frac_alive's standard error by the delete-one jackknife over the ``n`` test units (documents, or sequences).
    Deleting unit i kills exactly the latents that fired in it alone, ``dies_without[i]`` of them, so frac_alive without
    it is (alive - dies_without[i]) / d_sae, and the jackknife's variance is (n - 1) / n * sum_i (dies_without[i] - mean)^2 / d_sae^2.

    Why not the bootstrap: a resample never revives a latent the sample saw dead, and keeps a rare one alive in most
    draws, so its replicates lie at or below frac_alive and its error runs low (0.69x the true spread in the
    simulation of ``tests/test_evaluate.py``, where the jackknife's came out 1.15x; 1.19-1.24x in variants of it with
    independent latents and with 1,000 sequences, run by hand). The jackknife's variance estimate is biased upward
    instead (Efron and Stein, 1981, for any symmetric statistic of i.i.d. sequences; strictly, the bound is on the
    variance of the statistic of n - 1 sequences, a factor (n - 1) / n from ours). For latents firing independently in
    Poisson-many sequences (mean lambda_j) its expectation is about that of the count of latents seen in one sequence
    only, sum_j lambda_j e^-lambda_j, at least the true variance of the alive count, sum_j e^-lambda_j (1 -
    e^-lambda_j), latent by latent.

    Returns the error, the full-sample value and ``dies_without`` (sparse: unit -> count), through which two SAEs
    read on the same units pair (compare)."""
    d_sae = len(units_fired)
    only = last_fired_in[units_fired == 1].cpu()
    dies_without = torch.bincount(only, minlength=n).double()  # [n]
    variance = (n - 1) / n * float(((dies_without - dies_without.mean()) ** 2).sum())  # n > 1 (core_bootstrap)
    alive = int((units_fired > 0).sum())
    return {
        "method": f"delete-one jackknife over test {unit}s",
        "full_sample": alive / d_sae,
        "se": variance**0.5 / d_sae,
        "unit": unit,
        "n_units": n,
        "d_sae": d_sae,
        "alive": alive,
        "dies_without": {str(i): int(count) for i, count in enumerate(dies_without.tolist()) if count},
    }


def _density_summaries(fired: torch.Tensor, tokens: torch.Tensor, rows_at_once: int = 100) -> dict[str, torch.Tensor]:
    """SAEBench's summaries of the per-latent densities (``frac_alive``, ``freq_over_1_percent``, ... by the formulas
    of its `calculate_misc_metrics`), one per row: fired ``[rows, d_sae]`` firing counts over ``tokens`` ``[rows]``,
    on fired's device, ``rows_at_once`` rows a pass; returned as float64 on the CPU. Not SAEBench's function row by
    row: that loop of small CPU calls cost about 0.11 s of GPT-2's core on an H200 (1,000 replicates; benchmarks/README.md).
    The shares over a threshold are exact either way; the normalised ones are float32 sums in another order
    (tests/test_evaluate.py checks both against SAEBench's function)."""
    tokens = tokens.to(fired.device)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in DENSITY_SUMMARIES}
    for start in range(0, len(fired), rows_at_once):
        rows = slice(start, start + rows_at_once)
        densities = fired[rows].float() / tokens[rows].float()[:, None]  # [rows, d_sae] float32, as SAEBench divides
        total = densities.sum(dim=1)  # [rows]
        d_sae = densities.shape[1]
        # a share as count / d_sae divided on the CPU: a float32 count of 0/1 is exact and one IEEE division rounds
        # once, as SAEBench's mean does on the CPU. On CUDA both `mean` and a division by a Python number multiply by
        # 1/n, 1 ulp off for about a third of the counts at GPT-2's 6,144 latents.
        parts["frac_alive"].append((densities > 0).sum(dim=1, dtype=torch.float32).cpu() / d_sae)
        for threshold, percent in ((0.01, 1), (0.1, 10)):
            over = densities > threshold
            parts[f"freq_over_{percent}_percent"].append(over.sum(dim=1, dtype=torch.float32).cpu() / d_sae)
            share = torch.where(over, densities, 0.0).sum(dim=1) / total  # tensor by tensor: CUDA's true division
            parts[f"normalized_freq_over_{percent}_percent"].append(torch.where(total > 0, share, 0.0).cpu())  # SAEBench: 0 if none fired
    return {name: torch.cat(values).double() for name, values in parts.items()}


DENSITY_SUMMARIES = (
    "frac_alive", "freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent", "normalized_freq_over_10_percent",
)  # fmt: skip
"""SAEBench core's summaries of the per-latent densities, bootstrapped from each resample's firing counts."""


def _per_batch(weights: torch.Tensor, per_sequence: torch.Tensor, batch_of: torch.Tensor) -> torch.Tensor:
    """``[r, batches]``: each batch's weighted sum of a per-sequence value (weights ``[r, n]``, the rest ``[n]``)."""
    batches = int(batch_of[-1]) + 1
    return torch.zeros(weights.shape[0], batches, dtype=torch.float64).index_add_(1, batch_of, weights * per_sequence)


def validate_output(output_class, output: dict) -> None:
    """Raise unless ``output`` is what SAEBench's own pydantic output class accepts."""
    from pydantic import TypeAdapter

    TypeAdapter(output_class).validate_python(output)


def _output_of(eval_output, workdir: Path) -> dict:
    """SAEBench's output object as the JSON its own ``to_json_file`` writes."""
    path = Path(workdir) / f"{eval_output.eval_type_id}.json"
    eval_output.to_json_file(str(path), indent=1)
    return json.loads(path.read_text())


def _provenance(sae: SAE, sae_name: str) -> dict:
    from sae_bench.sae_bench_utils import get_sae_bench_version, get_sae_lens_version

    return {
        "sae_bench_commit_hash": get_sae_bench_version(),
        "sae_lens_id": sae_name,
        "sae_lens_release_id": "saecomp",
        "sae_lens_version": get_sae_lens_version(),
        "sae_cfg_dict": sae.cfg.to_dict(),
    }


def _scalar_metrics(suite: str, output: dict) -> dict[str, float]:
    """``<suite>.<metric>`` for every number in SAEBench's ``eval_result_metrics`` groups (None: not computed)."""
    return {
        f"{suite}.{name}": float(value)
        for group in output["eval_result_metrics"].values()
        for name, value in group.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def standard_errors(suite: str, kind: str, metrics: dict[str, float], compute) -> tuple[dict | None, dict[str, str]]:
    """Our standard errors beside SAEBench's numbers: adds ``<suite>.<metric>.<kind>`` to ``metrics`` for each metric
    there that ``compute()``'s ``se`` covers, and returns what stands behind them (``uncertainty/<suite>.json``) with
    no tags. They are ours, SAEBench's numbers are the paper's: an error in computing them is returned as the tag
    ``saecomp.<suite>.se_failed`` and warned, never raised."""
    try:
        uncertainty = compute()
    except Exception as error:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        warnings.warn(f"{suite}: no standard errors ({reason}); SAEBench's numbers are logged", stacklevel=2)
        return None, {f"saecomp.{suite}.se_failed": reason}
    kind = uncertainty.get("se_kind", kind)  # SCR's and TPP's: a bootstrap of texts, or binomial draws where untraced
    metrics.update({f"{suite}.{name}.{kind}": se for name, se in uncertainty["se"].items() if f"{suite}.{name}" in metrics})
    return uncertainty, {}


def run_sparse_probing(
    model: HookedTransformer, sae: SAE, config, workdir: Path, sae_name: str = "sae", shared: Path | None = None
) -> SuiteResult:
    """SAEBench's sparse probing (`sparse_probing.main.run_eval_single_sae`): top-k SAE latents against the model's
    own activations, per dataset, packed into `SparseProbingEvalOutput` as its `run_eval` does. With ``shared``, the
    model-side work is shared with other SAEs on the same model, hook and config (``model_side_folder``)."""
    from datetime import datetime

    from sae_bench.evals.sparse_probing import eval_output as out
    from sae_bench.evals.sparse_probing.main import run_eval_single_sae
    from sae_bench.sae_bench_utils import get_eval_uuid

    started = time.perf_counter()
    sae = prepared_for_saebench(sae, config.model_name)
    needed = model_side_bytes(config, sae.cfg.d_in) if shared is not None else 0
    with (
        torch.enable_grad(),
        model_side_folder(shared, config, sae.cfg.hook_name, str(sae.device), workdir / "sparse_probing", needed) as side,
        per_dataset_random_state("sparse_probing", side, config.random_seed),
        sparse_probing_accuracies(side) as (test_sizes, traced_runs),
    ):
        results, per_class = run_eval_single_sae(config, sae, model, str(sae.device), str(side.folder), save_activations=side.save)
    eval_output = out.SparseProbingEvalOutput(
        eval_config=config,
        eval_id=get_eval_uuid(),
        datetime_epoch_millis=int(datetime.now().timestamp() * 1000),
        eval_result_metrics=out.SparseProbingMetricCategories(
            llm=out.SparseProbingLlmMetrics(**{k: v for k, v in results.items() if k.startswith("llm_") and not isinstance(v, dict)}),
            sae=out.SparseProbingSaeMetrics(**{k: v for k, v in results.items() if k.startswith("sae_") and not isinstance(v, dict)}),
        ),
        eval_result_details=[out.SparseProbingResultDetail(dataset_name=name, **r) for name, r in results.items() if isinstance(r, dict)],
        eval_result_unstructured=per_class,
        **_provenance(sae, sae_name),
    )
    output = _output_of(eval_output, workdir)
    validate_output(out.SparseProbingEvalOutput, output)
    metrics = _scalar_metrics("sparse_probing", output)

    def errors() -> dict:
        traced, untraced = _sparse_probing_traced(per_class, traced_runs)
        if traced is not None:
            return sparse_probing_bootstrap(per_class, traced, test_sizes)
        return {**sparse_probing_uncertainty(per_class, test_sizes), "untraced": untraced}

    uncertainty, tags = standard_errors("sparse_probing", "binomial_se", metrics, errors)
    if uncertainty is not None and uncertainty.get("untraced"):  # said on the run, not only inside its JSON
        uncertainty["untraced"] = _side_without_answers(uncertainty["untraced"], side, MODEL_PROBE_OUTCOMES_FILE)
        tags["saecomp.sparse_probing.se_untraced"] = uncertainty["untraced"][:500]
        warnings.warn(
            f"sparse_probing: the probe tests could not be traced ({uncertainty['untraced']}); closed-form errors logged", stacklevel=2
        )
    seconds = time.perf_counter() - started
    tags["saecomp.sparse_probing.model_side"] = side.origin
    return SuiteResult("sparse_probing", output, metrics, seconds, tags, uncertainty=uncertainty)


def _side_without_answers(reason: str, side: ModelSide, kept_file: str) -> str:
    """Why a suite's tests were not traced, with the remedy where the cause is a loaded shared model side without the
    answers its computing run keeps (made before saecomp kept them, or damaged): every later SAE on it would fall back."""
    if side.computing or (side.folder / kept_file).is_file():
        return reason
    return f"the shared model side {side.folder} has no {kept_file} (older or damaged; delete that folder to have it recomputed): {reason}"


@contextmanager
def sparse_probing_accuracies(side: ModelSide | None = None) -> Iterator[tuple[dict[str, dict | None], dict[str, dict]]]:
    """What SAEBench's sparse probing does not return: per dataset (SAEBench's ``<dataset>_results`` key), how many
    texts each class's probes are tested on (``sizes``, by class), and which texts those were and whether each probe
    got each right (``runs``: ``{"texts": class -> a digest per test text, in SAEBench's row order, "by_name":
    accuracy name -> ``_class_outcomes`` or None}``).

    Sizes: `probe_training.prepare_probe_data` tests a class's probe on the class's texts and as many drawn from the
    other classes, so 2 x the class's test texts, counted from the test activations its `train_probe_on_activations`
    gets; the same for every probe of a dataset, else the dataset's count is None. Texts: from SAEBench's
    `dataset_utils.get_multi_label_train_test_data`. Answers: ``_traced_trainings``, each accuracy dict found by
    identity in SAEBench's per-class results.

    A run that loads a shared model side (``side``) gets the model's probe accuracies from SAEBench's pickle and never
    reads the texts, so the run that computes the side keeps those answers and the texts beside it
    (MODEL_PROBE_OUTCOMES_FILE) and a loading run reads them; a file that cannot be read or written costs only the
    traced errors. Nothing here raises into SAEBench's run. Hold ``_WRAPPING`` (entered inside
    ``per_dataset_random_state``)."""
    from sae_bench.evals.sparse_probing import main as sparse_probing
    from sae_bench.evals.sparse_probing import probe_training
    from sae_bench.sae_bench_utils import dataset_utils

    one_dataset, train_probes = sparse_probing.run_eval_single_dataset, probe_training.train_probe_on_activations
    get_data = dataset_utils.get_multi_label_train_test_data
    sizes: dict[str, dict | None] = {}
    runs: dict[str, dict] = {}
    current: list[dict] = []  # the dataset run in progress: its key, texts and traced trainings by id of their accuracies
    saved: dict = {}
    if side is not None and not side.computing and (side.folder / MODEL_PROBE_OUTCOMES_FILE).is_file():
        try:
            saved = torch.load(side.folder / MODEL_PROBE_OUTCOMES_FILE, weights_only=False)
        except Exception as error:  # the traced errors only: SAEBench's run is untouched
            warnings.warn(
                f"{side.folder / MODEL_PROBE_OUTCOMES_FILE} could not be read ({error}); sparse probing's errors fall back", stacklevel=2
            )
    kept: dict[str, dict] = {}

    def data(*args, **kwargs):
        train, test = get_data(*args, **kwargs)
        if current:
            try:
                current[-1]["texts"] = {key: [_text_digest(text) for text in texts] for key, texts in test.items()}
            except Exception:  # no identities: this run's errors fall back
                current[-1]["texts"] = None
        return train, test

    def dataset(dataset_name, *args, **kwargs):
        key = f"{dataset_name}_results"
        current.append({"key": key, "texts": None, "tests": {}})
        try:
            results, per_class = one_dataset(dataset_name, *args, **kwargs)
        finally:
            state = current.pop()
        # SAEBench keeps the very dicts its trainings returned (the model's when computed here, the SAE's always)
        by_name = {name: state["tests"].get(id(accuracies), (None, None))[1] for name, accuracies in per_class.items()}
        texts = state["texts"]
        if side is not None and side.computing and side.save:  # only what a shared side's loading runs will read
            try:
                kept[key] = {"texts": texts, "by_name": {n: _plain_class_outcomes(o) for n, o in by_name.items() if n.startswith("llm_")}}
            except Exception:  # the loading runs' traced errors only
                kept[key] = {}
        earlier = saved.get(key) if isinstance(saved, dict) and isinstance(saved.get(key), dict) else {}
        if texts is None:  # loaded: what the computing run kept
            texts = earlier.get("texts")
        for name, outcomes in (earlier.get("by_name") or {}).items():
            if name in by_name and by_name[name] is None:
                by_name[name] = outcomes
        runs[key] = {"texts": texts, "by_name": by_name}
        return results, per_class

    def training(train_activations, test_activations, *args, **kwargs):
        if not current:
            return train_probes(train_activations, test_activations, *args, **kwargs)
        try:
            counted = None if kwargs.get("perform_scr") else {str(name): 2 * len(acts) for name, acts in test_activations.items()}
        except Exception:
            counted = None
        if sizes.setdefault(current[-1]["key"], counted) != counted:
            sizes[current[-1]["key"]] = None
        classes: list[dict] = []
        with _traced_trainings(classes):
            probes, accuracies = train_probes(train_activations, test_activations, *args, **kwargs)
        try:
            outcomes = _class_outcomes(accuracies, classes)
        except Exception:  # never into SAEBench's run: this dataset's errors fall back
            outcomes = None
        current[-1]["tests"][id(accuracies)] = (accuracies, outcomes)
        return probes, accuracies

    sparse_probing.run_eval_single_dataset, probe_training.train_probe_on_activations = dataset, training
    dataset_utils.get_multi_label_train_test_data = data
    try:
        yield sizes, runs
    finally:
        sparse_probing.run_eval_single_dataset, probe_training.train_probe_on_activations = one_dataset, train_probes
        dataset_utils.get_multi_label_train_test_data = get_data
    if side is not None and side.computing and side.save:  # only after a suite that finished (else nothing is published)
        try:
            torch.save(kept, side.folder / MODEL_PROBE_OUTCOMES_FILE)
        except Exception as error:  # the loading runs' traced errors only
            (side.folder / MODEL_PROBE_OUTCOMES_FILE).unlink(missing_ok=True)
            warnings.warn(
                f"{MODEL_PROBE_OUTCOMES_FILE} could not be written ({error}); later SAEs' sparse probing errors fall back", stacklevel=2
            )


@contextmanager
def _traced_trainings(classes: list[dict]) -> Iterator[None]:
    """Within one call of SAEBench's `train_probe_on_activations`: per class, in order, which test texts its probe was
    tested on and whether it got each right, appended to ``classes`` as ``{"texts": [2n] int64 or None, "pools":
    ..., "epochs": [[2n] bool or None, ...], "accuracy": float}``. Which texts: ``_tracing_prepare`` (the class's test
    data is the last it prepares before training). A scikit-learn probe (`train_sklearn_probe`) has one test, its
    answers the probe's own ``predict`` on the test inputs as SAEBench computes them; a GPU probe (`train_probe_gpu`)
    is tested after every epoch and SAEBench keeps the best test accuracy, so each epoch's answers are kept
    (``_gpu_probe_answers``). SAEBench offers no way in."""
    from sae_bench.evals.sparse_probing import probe_training

    wrapped = ("prepare_probe_data", "train_sklearn_probe", "train_probe_gpu", "test_probe_gpu")
    originals = {name: getattr(probe_training, name) for name in wrapped}
    prepare, train_sklearn, train_gpu, test_gpu = originals.values()
    current: dict = {"texts": None, "pools": None}
    testing: list[tuple] = []  # (the test inputs of the GPU probe in training, its answers per epoch)

    def traced_sklearn(train_inputs, train_labels, test_inputs, test_labels, *args, **kwargs):
        texts, pools = current["texts"], current["pools"]
        probe, accuracy = train_sklearn(train_inputs, train_labels, test_inputs, test_labels, *args, **kwargs)
        try:  # as SAEBench's own test: float32 numpy, the probe's predict
            correct = probe.predict(test_inputs.to(dtype=torch.float32).cpu().numpy()) == test_labels.cpu().numpy()
        except Exception:
            correct = None
        classes.append({"texts": texts, "pools": pools, "epochs": [correct], "accuracy": accuracy})
        return probe, accuracy

    def traced_gpu(train_inputs, train_labels, test_inputs, test_labels, *args, **kwargs):
        texts, pools, answers = current["texts"], current["pools"], []
        testing.append((test_inputs, answers))
        try:
            probe, accuracy = train_gpu(train_inputs, train_labels, test_inputs, test_labels, *args, **kwargs)
        finally:
            testing.pop()
        classes.append({"texts": texts, "pools": pools, "epochs": answers, "accuracy": accuracy})
        return probe, accuracy

    def traced_test(inputs, labels, batch_size, probe):
        if not testing or inputs is not testing[-1][0]:  # its test on the training texts
            return test_gpu(inputs, labels, batch_size, probe)
        accuracy, correct = _gpu_probe_answers(test_gpu, inputs, labels, batch_size, probe)
        testing[-1][1].append(correct)
        return accuracy

    for name, traced in zip(wrapped, (_tracing_prepare(prepare, current), traced_sklearn, traced_gpu, traced_test), strict=True):
        setattr(probe_training, name, traced)
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(probe_training, name, original)


def _class_outcomes(accuracies: dict, classes: list[dict]) -> dict | None:
    """The traced trainings (``_traced_trainings``) by class: `train_probe_on_activations` fills its dict in the order
    it trains, so the i-th class is the i-th training; ``{"pools", "by_class": class -> (texts, [correct per test])}``
    (a GPU probe's tests, one per epoch, all read the same texts),
    or None unless every test was traced, all read the same pools, and the best test's answers average to SAEBench's
    accuracy."""
    import numpy as np

    if len(classes) != len(accuracies) or not classes:
        return None
    by_class = {}
    for name, traced in zip(accuracies, classes, strict=True):
        texts, epochs = traced["texts"], traced["epochs"]
        if texts is None or not epochs or any(c is None or len(c) != len(texts) for c in epochs) or traced["pools"] != classes[0]["pools"]:
            return None
        if traced["accuracy"] != accuracies[name] or abs(max(float(np.mean(c)) for c in epochs) - accuracies[name]) > 1e-6:
            return None
        by_class[name] = (texts, [np.asarray(c, dtype=bool) for c in epochs])
    return {"pools": classes[0]["pools"], "by_class": by_class}


def _plain_class_outcomes(outcomes: dict | None) -> dict | None:
    """``_class_outcomes`` as plain lists: nothing of NumPy pickled into a folder other runs read."""
    if outcomes is None:
        return None
    by_class = {
        name: ([int(t) for t in texts], [[bool(c) for c in correct] for correct in tests])
        for name, (texts, tests) in outcomes["by_class"].items()
    }
    return {"pools": [list(pool) for pool in outcomes["pools"]], "by_class": by_class}


def _sparse_probing_traced(per_class: dict, runs: dict) -> tuple[dict | None, str | None]:
    """Per dataset, its ``TextUnits`` and per accuracy name and class the tests' entries and answers
    ([(texts int64, correct bool) per test]), for ``sparse_probing_bootstrap``; or None and why not, if any accuracy
    that is a proportion lacks them (then the run falls back to the closed form)."""
    import numpy as np

    traced = {}
    for dataset, metrics in per_class.items():
        run = runs.get(dataset)
        if run is None:
            return None, f"{dataset}: no traced probe tests"
        pools, tests = None, {}
        for name, accuracies in metrics.items():
            if not all(0.0 <= p <= 1.0 for p in accuracies.values()):
                continue  # SAEBench's -1 placeholder: no error either way
            outcomes = run["by_name"].get(name)
            if outcomes is None or set(outcomes["by_class"]) != set(accuracies):
                return None, f"{dataset}: a probe test of {name} was not traced"
            tested_on = tuple(tuple(pool) for pool in outcomes["pools"])  # a loaded side's are lists
            if pools is not None and tested_on != pools:
                return None, f"{dataset}: probe tests over different texts"
            pools = tested_on
            tests[name] = {}
            for label, accuracy in accuracies.items():
                texts, epochs = outcomes["by_class"][label]
                read = np.asarray(texts, dtype=np.int64)
                answers = [(read, np.asarray(c, dtype=bool)) for c in epochs]
                if abs(max(float(np.mean(c)) for _, c in answers) - accuracy) > 1e-6:  # a loaded model side must be this run's
                    return None, f"{dataset}: traced answers to {name} ({label}) do not give SAEBench's accuracy"
                tests[name][label] = answers
        units = TextUnits.of(pools, run["texts"]) if pools is not None else None
        if units is None:
            return None, f"{dataset}: which texts SAEBench tested was not recorded"
        traced[dataset] = (units, tests)
    return traced, None


def sparse_probing_bootstrap(
    per_class: dict[str, dict[str, dict]],
    traced: dict,
    test_sizes: dict,
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = BOOTSTRAP_SEED,
) -> dict:
    """Standard errors of sparse probing's accuracies by a bootstrap of the texts the probes were tested on (traced by
    ``sparse_probing_accuracies``): per dataset, its distinct test texts resampled with replacement within the texts of
    the same classes (``TextUnits``, as SCR's and TPP's), every probe's accuracy recomputed from its answers on the
    resample, and SAEBench's metric (the mean over datasets of the mean over classes) recomputed per replicate. A GPU
    probe's accuracy is its best epoch's, picked by test accuracy as SAEBench picks it, so each replicate picks again:
    the maximum over the epochs it ran (their number, set by early stopping, is kept).

    What this covers that the closed form did not: a class's probe is tested on its own texts and on texts of the
    other classes, so the classes' tests share texts; and the resamples depend only on ``seed``, the dataset and the
    texts, not on the SAE, so every SAE on the same texts draws the same (``sample_id``) and compare pairs them text
    by text. Not covered: the probes' training (the spread over ``evaluation.seed`` replicates measures that)."""
    import numpy as np

    by_dataset: dict[str, dict[str, np.ndarray]] = {}  # dataset -> metric -> [replicates]
    drawn_counts, joint = resampled_runs([traced[d][0] for d in per_class], replicates, [seed, 5])
    for dataset, counts in zip(per_class, drawn_counts, strict=True):  # counts: [replicates, entries]
        _, tests = traced[dataset]
        columns: list[tuple] = []
        spans: dict[tuple, tuple[int, int]] = {}  # (metric, class) -> its tests' columns
        for name, by_class in tests.items():
            for label, answers in by_class.items():
                spans[(name, label)] = (len(columns), len(columns) + len(answers))
                columns += answers
        drawn = _reweighted_accuracies(counts, columns) if columns else np.zeros((replicates, 0))  # [replicates, tests]
        by_dataset[dataset] = {
            name: np.mean([drawn[:, slice(*spans[(name, label)])].max(axis=1) for label in by_class], axis=0)
            for name, by_class in tests.items()
        }
    common = set.intersection(*(set(m) for m in by_dataset.values())) if by_dataset else set()
    samples = {name: np.mean([by_dataset[d][name] for d in per_class], axis=0) for name in sorted(common)}
    digests = [traced[d][0].digest for d in per_class]
    names = list(per_class)
    drawn_on = ["sparse_probing", "texts", names, digests] + (["jointly", joint] if joint else [])  # draws changed with joint
    sample_id = hashlib.sha256(json.dumps(drawn_on).encode()).hexdigest()[:20]
    return {
        "unit": "test text (a distinct text, resampled within the texts of its classes)",
        "method": (
            "bootstrap of the test texts (resampled within the texts of the same classes; datasets that test on the same texts "
            "resampled together, each text drawn once for all); each probe's accuracy recomputed from its answers text by text "
            "(a GPU probe's best epoch picked again per replicate), the same resamples for every SAE with the same sample_id; "
            "SAEBench's averaging over classes and datasets"
        ),
        "resampled_together": [[names[i] for i in group] for group in joint],
        "se_kind": "bootstrap_se",
        "texts": {d: traced[d][0].summary() for d in per_class},
        "replicates": replicates,
        "seed": seed,
        "sample_id": sample_id,
        "n_test": test_sizes,
        "se": {name: float(np.std(values, ddof=1)) for name, values in samples.items()},
        "per_dataset_se": {d: {name: float(np.std(v, ddof=1)) for name, v in sorted(m.items())} for d, m in by_dataset.items()},
        "samples": {name: [round(float(v), 9) for v in values] for name, values in samples.items()},
    }


def sparse_probing_uncertainty(per_class: dict[str, dict[str, dict[str, float]]], test_sizes: dict[str, dict[str, int]]) -> dict:
    """Standard errors of sparse probing's accuracies over the test texts in closed form, where the tests could not be
    traced (``sparse_probing_bootstrap`` otherwise). Each probe's test accuracy p on n texts has the binomial standard
    error sqrt(p (1 - p) / n), what a bootstrap over those texts alone gives. SAEBench's metric is the mean
    over datasets of the mean over classes, so its standard error is sqrt(sum of the classes' variances) / classes
    per dataset, and the same over datasets, treating the probes' test sets as independent (a class's negatives are
    other classes' texts, so they are not quite). What it covers: which texts were drawn for the test. Not covered:
    the probes' training (its seed; the spread over ``evaluation.seed`` replicates measures that), and the GPU probe's
    choice of its best epoch by test accuracy (SAEBench's), which biases the accuracy up. A class whose accuracy is
    not a proportion (SAEBench's -1 placeholder) leaves its metric without one.

    ``per_class``: SAEBench's ``eval_result_unstructured`` (dataset -> metric -> class -> accuracy); ``test_sizes``:
    ``sparse_probing_accuracies``'s counts. Returns ``{"unit", "n_test", "se", "per_dataset_se"}``, ``se`` keyed by SAEBench's
    metric name."""
    variances: dict[str, list[float]] = {}  # metric -> per dataset: the variance of its mean over classes
    broken: set[str] = set()
    for dataset, metrics in per_class.items():
        sizes = test_sizes.get(dataset)
        if sizes is None:
            counted = sorted(test_sizes)
            raise RuntimeError(f"no test sizes were counted for {dataset} (counted: {counted}), or they differed between its probes")
        for metric, accuracies in metrics.items():
            if set(accuracies) != set(sizes) or not all(0.0 <= p <= 1.0 for p in accuracies.values()):
                broken.add(metric)
                continue
            variance = sum(p * (1.0 - p) / sizes[c] for c, p in accuracies.items()) / len(accuracies) ** 2
            variances.setdefault(metric, []).append(variance)
    n_datasets = len(per_class)
    per_metric = {m: v for m, v in variances.items() if m not in broken and len(v) == n_datasets}
    return {
        "unit": "test text (binomial, per probe)",
        "n_test": test_sizes,
        "se": {metric: math.sqrt(sum(v)) / n_datasets for metric, v in per_metric.items()},
        "per_dataset_se": {dataset: {metric: math.sqrt(v[i]) for metric, v in per_metric.items()} for i, dataset in enumerate(per_class)},
    }


def run_scr_or_tpp(
    model: HookedTransformer, sae: SAE, config, workdir: Path, sae_name: str = "sae", shared: Path | None = None
) -> SuiteResult:
    """SAEBench's SCR (``config.perform_scr``) or TPP (`scr_and_tpp.main.run_eval_single_sae`): probe accuracy
    after ablating the top-n latents, packed into `ScrEvalOutput`/`TppEvalOutput` as its `run_eval` does. With
    ``shared``, the model-side work is shared with other SAEs on the same model, hook and config (``model_side_folder``)."""
    from datetime import datetime

    from sae_bench.evals.scr_and_tpp import eval_output as out
    from sae_bench.evals.scr_and_tpp.main import run_eval_single_sae
    from sae_bench.sae_bench_utils import get_eval_uuid

    suite = "scr" if config.perform_scr else "tpp"
    started = time.perf_counter()
    sae = prepared_for_saebench(sae, config.model_name)
    needed = model_side_bytes(config, sae.cfg.d_in) if shared is not None else 0
    with (
        torch.enable_grad(),
        model_side_folder(shared, config, sae.cfg.hook_name, str(sae.device), workdir / suite, needed) as side,
        per_dataset_random_state(suite, side, config.random_seed),
        padding_masked_ablations() as masked_runs,
        scr_tpp_accuracies(side) as accuracy_runs,
        repeated_inputs_cached(sae),
    ):
        results, per_class = run_eval_single_sae(config, sae, model, str(sae.device), str(side.folder), save_activations=side.save)
    masked = padding_masked_results(suite, results, masked_runs)
    common = {
        "eval_config": config,
        "eval_id": get_eval_uuid(),
        "datetime_epoch_millis": int(datetime.now().timestamp() * 1000),
        **_provenance(sae, sae_name),
    }
    scalars = {k: v for k, v in results.items() if not isinstance(v, dict)}
    if suite == "scr":
        eval_output = out.ScrEvalOutput(
            eval_type_id=out.EVAL_TYPE_ID_SCR,
            eval_result_metrics=out.ScrMetricCategories(scr_metrics=out.ScrMetrics(**scalars)),
            eval_result_details=[out.ScrResultDetail(dataset_name=name, **r) for name, r in results.items() if isinstance(r, dict)],
            **common,
        )
        output_class = out.ScrEvalOutput
    else:
        eval_output = out.TppEvalOutput(
            eval_type_id=out.EVAL_TYPE_ID_TPP,
            eval_result_metrics=out.TppMetricCategories(tpp_metrics=out.TppMetrics(**scalars)),
            eval_result_details=[out.TppResultDetail(dataset_name=name, **r) for name, r in results.items() if isinstance(r, dict)],
            eval_result_unstructured=per_class,
            **common,
        )
        output_class = out.TppEvalOutput
    output = _output_of(eval_output, workdir)
    validate_output(output_class, output)
    metrics = _scalar_metrics(suite, output)
    tags = {f"saecomp.{suite}.model_side": side.origin}
    if masked is None:  # SAEBench's numbers stand; the run says why they have no twins
        tags[f"saecomp.{suite}.padding_masked_failed"] = str(masked_runs.failed)
        warnings.warn(
            f"{suite}: the padding-masked twins could not be computed ({masked_runs.failed}); SAEBench's numbers are logged", stacklevel=2
        )
    else:
        for name in [m.split(".", 1)[1] for m in metrics]:  # SAEBench's metrics, each with its padding-masked twin
            if isinstance(masked["averaged"].get(name), (int, float)):
                metrics[f"{suite}.{name}{PADDING_MASKED}"] = float(masked["averaged"][name])
    keys = [key for key, value in results.items() if isinstance(value, dict)]  # "<run name>_results", in run order
    twins = masked_runs.runs if masked is not None else None
    # the SAE's identity seeds its ablated accuracies' draws; SAEBench's seed and sizes decide which texts were tested
    identity = hashlib.sha256(sae.W_enc.detach().float().sum(0).cpu().numpy().tobytes() + sae_name.encode()).hexdigest()[:20]
    drawn_from = {name: getattr(config, name, None) for name in ("random_seed", "train_set_size", "test_set_size", "context_length")}

    def uncertainty_of_runs() -> dict:
        return scr_tpp_uncertainty(suite, keys, accuracy_runs, twins, sae_identity=identity, drawn_from=drawn_from)

    uncertainty, se_tags = standard_errors(suite, "binomial_se", metrics, uncertainty_of_runs)
    tags.update(se_tags)
    if uncertainty is not None and uncertainty.get("untraced"):  # said on the run, not only inside its JSON
        uncertainty["untraced"] = _side_without_answers(uncertainty["untraced"], side, CLEAN_OUTCOMES_FILE)
        tags[f"saecomp.{suite}.se_untraced"] = uncertainty["untraced"][:500]
        warnings.warn(f"{suite}: the probe tests could not be traced ({uncertainty['untraced']}); parametric errors logged", stacklevel=2)
    seconds = time.perf_counter() - started
    return SuiteResult(suite, output, metrics, seconds, tags, uncertainty=uncertainty, corrected=masked)


@contextmanager
def scr_tpp_accuracies(side: ModelSide | None = None) -> Iterator[list[dict]]:
    """Per dataset run of SCR or TPP, in SAEBench's order: its ablated accuracies (``raw``), its clean ones
    (``clean``), how many test texts each accuracy is over (``n_test``, per accuracy name), and which texts those
    were and whether the probe got each right (``outcomes``, ``_traced_probe_tests``), none of which SAEBench
    returns. Its `probe_training.prepare_probe_data` tests a probe on the class's texts and as many of the other
    classes' (TPP) or of the paired class's (SCR; "X probe on Y data" reads Y's), so 2 x that class's test texts,
    counted from the activations its `get_probe_test_accuracy` gets: the same at every call for a dataset, else None
    (no standard error; never an error in SAEBench's run).

    Which texts those are (``outcomes["texts"]``: per class, a digest of each test text, in SAEBench's row order)
    comes from SAEBench's `dataset_creation.get_train_test_data`: SCR's classes hold the same bios under different
    labels (its "male / female" and "female_data_only" are the four quadrants that "professor / nurse" and
    "nurse_data_only" regroup), so a text is known by its content, not by its class and row.

    A run that loads a shared model side (``side``) gets SAEBench's clean accuracies from its pickle, not from a probe
    test, and its activations without reading the texts, so the run that computes the side keeps both there
    (CLEAN_OUTCOMES_FILE) and a loading run reads them; a file that cannot be read or written only costs the traced
    errors (``scr_tpp_uncertainty`` falls back). Hold ``_WRAPPING`` (entered inside ``per_dataset_random_state``)."""
    from sae_bench.evals.scr_and_tpp import dataset_creation
    from sae_bench.evals.scr_and_tpp import main as scr_tpp

    one_dataset, probe_test = scr_tpp.run_eval_single_dataset, scr_tpp.get_probe_test_accuracy
    get_data = dataset_creation.get_train_test_data
    runs: list[dict] = []
    counting: list[dict[str, int]] = []
    traced: list[list] = []  # per dataset run in progress: (accuracies dict SAEBench got, its outcomes or None)
    texts_read: list[dict | None] = []  # per dataset run in progress: class -> digest per test text
    saved: list = []
    if side is not None and not side.computing and (side.folder / CLEAN_OUTCOMES_FILE).is_file():
        try:
            saved = torch.load(side.folder / CLEAN_OUTCOMES_FILE, weights_only=False)
        except Exception as error:  # the traced errors only: SAEBench's run is untouched
            warnings.warn(f"{side.folder / CLEAN_OUTCOMES_FILE} could not be read ({error}); SCR/TPP errors fall back", stacklevel=2)
    kept: list = []

    def data(*args, **kwargs):
        train, test = get_data(*args, **kwargs)
        if texts_read:
            try:
                texts_read[-1] = {key: [_text_digest(text) for text in texts] for key, texts in test.items()}
            except Exception:  # no identities: this run's errors fall back
                texts_read[-1] = None
        return train, test

    def dataset(*args, **kwargs):
        counting.append({})
        traced.append([])
        texts_read.append(None)
        try:
            raw, clean = one_dataset(*args, **kwargs)
        finally:
            n_test, tests, texts = counting.pop(), traced.pop(), texts_read.pop()
        # SAEBench keeps the very dicts its probe tests returned (raw[ablated][k], the clean accuracies when computed,
        # the twins' raw), so each is found by identity; the dicts are held, so no id is reused meanwhile
        by_id = {id(accuracies): (accuracies, outcomes) for accuracies, outcomes in tests}
        computed_clean = by_id.get(id(clean), (None, None))[1]
        index = len(runs)
        kept.append({"clean": computed_clean, "texts": texts})
        if computed_clean is None and side is not None and not side.computing:  # loaded: what the computing run kept
            earlier = saved[index] if index < len(saved) and isinstance(saved[index], dict) else {}
            computed_clean, texts = earlier.get("clean"), texts if texts is not None else earlier.get("texts")
        outcomes = {"clean": computed_clean, "tests": by_id, "texts": texts}
        runs.append({"raw": raw, "clean": clean, "n_test": n_test, "outcomes": outcomes})
        return raw, clean

    def test_accuracy(probes, all_class_list, all_activations, *args, **kwargs):
        tests: list[dict] = []
        with _traced_probe_tests(tests) if counting else contextlib.nullcontext():
            accuracies = probe_test(probes, all_class_list, all_activations, *args, **kwargs)
        for name in accuracies if counting else ():  # never raises into SAEBench's run: a count that does not hold is None
            texts_of = name.split(" probe on ", 1)[1].removesuffix(" data") if " probe on " in name else name
            n = 2 * len(all_activations[texts_of]) if texts_of in all_activations else None
            if counting[-1].setdefault(name, n) != n:
                counting[-1][name] = None
        if counting:
            traced[-1].append((accuracies, _outcomes_by_name(accuracies, tests)))
        return accuracies

    scr_tpp.run_eval_single_dataset, scr_tpp.get_probe_test_accuracy = dataset, test_accuracy
    dataset_creation.get_train_test_data = data
    try:
        yield runs
    finally:
        scr_tpp.run_eval_single_dataset, scr_tpp.get_probe_test_accuracy = one_dataset, probe_test
        dataset_creation.get_train_test_data = get_data
    if side is not None and side.computing and side.save:  # only after a suite that finished (else nothing is published)
        try:  # plain lists: no numpy pickled into a folder other runs read
            plain = [{"clean": _plain_outcomes(k["clean"]), "texts": k["texts"]} for k in kept]
            torch.save(plain, side.folder / CLEAN_OUTCOMES_FILE)
        except Exception as error:  # the loading runs' traced errors only
            (side.folder / CLEAN_OUTCOMES_FILE).unlink(missing_ok=True)
            warnings.warn(f"{CLEAN_OUTCOMES_FILE} could not be written ({error}); later SAEs' SCR/TPP errors fall back", stacklevel=2)


def _text_digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _plain_outcomes(outcomes: dict | None) -> dict | None:
    if outcomes is None:
        return None
    by_name = {name: ([int(t) for t in texts], [bool(c) for c in correct]) for name, (texts, correct) in outcomes["by_name"].items()}
    return {"pools": [list(pool) for pool in outcomes["pools"]], "by_name": by_name}


def _tracing_prepare(prepare, current: dict):
    """SAEBench's `prepare_probe_data` (``prepare``), which also sets ``current["texts"]`` (the [2n] entries it put in
    its output, in order: pool offset + row, pools in sorted key order; None if unknown) and ``current["pools"]``
    (sorted (key, rows)). `prepare_probe_data` picks negatives and shuffles by the global torch generator, so it is run
    first on each pool's row indices in place of activations ([rows, 1], the same dict order and sizes, so the same
    draws), the generator's state is put back, and then SAEBench's call runs on the activations: its draws, and
    everything after, are unchanged."""

    def traced_prepare(all_activations, class_name, perform_scr=False):
        state = torch.get_rng_state()
        current["texts"] = current["pools"] = id_acts = id_labels = after_ids = None
        try:
            pools = tuple(sorted((key, len(acts)) for key, acts in all_activations.items()))
            offsets = dict(zip([key for key, _ in pools], itertools.accumulate([0] + [n for _, n in pools]), strict=False))
            ids = {  # [rows, 1] on the CPU, whose generator SAEBench's randperm draws from
                key: (torch.arange(len(acts), dtype=torch.float64, device="cpu") + offsets[key]).unsqueeze(1)
                for key, acts in all_activations.items()
            }
            current["pools"] = pools
            id_acts, id_labels = prepare(ids, class_name, perform_scr=perform_scr)
            after_ids = torch.get_rng_state()
        except Exception:  # no outcomes for this test; SAEBench's call below is untouched
            pass
        torch.set_rng_state(state)
        acts, labels = prepare(all_activations, class_name, perform_scr=perform_scr)
        try:
            same_draws = after_ids is not None and torch.equal(torch.get_rng_state(), after_ids)
            if same_draws and torch.equal(labels.cpu().long(), id_labels.long()):
                current["texts"] = id_acts[:, 0].long().numpy()
        except Exception:
            pass
        return acts, labels

    return traced_prepare


def _gpu_probe_answers(test, inputs, labels, batch_size, probe):
    """SAEBench's `test_probe_gpu` (``test``) and whether the probe got each input right ([inputs] bool numpy, or None):
    the probe's own logits as that test computes them (its ``forward`` is recorded for the call), thresholded as it
    does."""
    logits: list[torch.Tensor] = []

    def forward(x, _forward=probe.forward):
        out = _forward(x)
        logits.append(out.detach())
        return out

    own = probe.__dict__.get("forward")  # an instance attribute, removed after: the probe SAEBench pickles is its own
    probe.forward = forward
    try:
        accuracy = test(inputs, labels, batch_size, probe)
    finally:
        del probe.forward
        if own is not None:
            probe.forward = own
    correct = ((torch.cat(logits) > 0.0).long() == labels).cpu().numpy() if logits else None  # as test_probe_gpu
    return accuracy, correct


@contextmanager
def _traced_probe_tests(tests: list[dict]) -> Iterator[None]:
    """Within one call of SAEBench's `get_probe_test_accuracy`: for each of its probe tests (`test_probe_gpu`, in
    order) which test texts it read and whether the probe got each right, appended to ``tests`` as ``{"texts": [2n]
    int64 or None, "correct": [2n] bool, "accuracy": float, "pools": ...}``.

    Which texts: ``_tracing_prepare``. Whether right: ``_gpu_probe_answers``; the mean of ``correct`` is checked
    against its accuracy by the reader. An entry is ``pool offset + row``, pools in sorted key order (which text it
    is: ``scr_tpp_accuracies``). SAEBench offers no way in."""
    from sae_bench.evals.sparse_probing import probe_training

    prepare, test = probe_training.prepare_probe_data, probe_training.test_probe_gpu
    current: dict = {"texts": None, "pools": None}
    traced_prepare = _tracing_prepare(prepare, current)

    def traced_test(inputs, labels, batch_size, probe):
        accuracy, correct = _gpu_probe_answers(test, inputs, labels, batch_size, probe)
        tests.append({"texts": current["texts"], "correct": correct, "accuracy": accuracy, "pools": current["pools"]})
        return accuracy

    probe_training.prepare_probe_data, probe_training.test_probe_gpu = traced_prepare, traced_test
    try:
        yield
    finally:
        probe_training.prepare_probe_data, probe_training.test_probe_gpu = prepare, test


def _outcomes_by_name(accuracies: dict[str, float], tests: list[dict]) -> dict | None:
    """The traced tests (``_traced_probe_tests``) by accuracy name: `get_probe_test_accuracy` fills its dict in the
    order it tests, so the i-th name is the i-th test; None unless every test was traced, its correct answers average
    to SAEBench's accuracy and all read the same pools."""
    import numpy as np

    if len(tests) != len(accuracies) or not tests:
        return None
    by_name = {}
    for name, traced in zip(accuracies, tests, strict=True):
        texts, correct = traced["texts"], traced["correct"]
        if texts is None or correct is None or len(texts) != len(correct) or traced["pools"] != tests[0]["pools"]:
            return None
        if abs(float(np.mean(correct)) - accuracies[name]) > 1e-6 or traced["accuracy"] != accuracies[name]:
            return None
        by_name[name] = (texts, correct)
    return {"pools": tests[0]["pools"], "by_name": by_name}


def scr_tpp_uncertainty(
    suite: str,
    keys: list[str],
    runs: list[dict],
    masked_runs: list[tuple[dict, dict]] | None = None,
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = BOOTSTRAP_SEED,
    sae_identity: str = "",
    drawn_from: object = None,
) -> dict:
    """Standard errors of SCR's or TPP's metrics over the texts their probes were tested on, by a bootstrap through
    SAEBench's own scoring (`get_scr_plotting_dict`, `create_tpp_plotting_dict`) and averaging over dataset runs
    (`average_results_dictionaries`): each replicate redraws every accuracy, SAEBench turns them into metrics, and the
    standard error is their spread over the replicates. Not the delta method: SCR is a ratio of accuracy gaps with a
    guard (a gap under 0.001 scores 0) and a direction chosen by the clean accuracies, and at small test sets the
    linearised error was a third of the simulated one. Not covered: the probes' training (the spread over
    ``evaluation.seed`` replicates measures that).

    **Where every probe test was traced** (``scr_tpp_accuracies``: which texts each test read and whether the probe got
    each right), the texts themselves are resampled (``se_kind`` ``bootstrap_se``): the distinct test texts of a
    dataset run, with replacement, within the texts that are entries of the same classes (``TextUnits``: SCR's classes
    regroup the same bios, so a bio is one text however many classes hold it, and every class keeps its number of
    entries), and every accuracy recomputed from its answers on the resample (``_resampled_text_counts``,
    ``_reweighted_accuracies``). A clean and an ablated test of one probe read the same positives (SCR: and the same
    negatives, the whole paired class; TPP draws its negatives from the other classes afresh at every test, so they
    overlap in part), so a text both get right (or both wrong) moves neither's difference: the error is carried by the
    answers the ablation flips and the negatives the tests do not share, where the parametric draw below counted both
    accuracies' whole errors. The resamples depend only on ``seed``, the dataset run and the texts (not on the SAE), so
    two SAEs evaluated on the same texts draw the same resamples (the same ``sample_id``, which includes a digest of
    every text), and compare's replicate-wise difference of a metric is paired text by text.

    **Otherwise** (runs recorded without traced tests, a test not traced (a twin's too), unknown texts, or answers
    that do not give SAEBench's accuracies: ``untraced`` says why, and the run's tag
    ``saecomp.<suite>.se_untraced``), a parametric bootstrap (``se_kind`` ``binomial_se``): every accuracy p on n
    texts is redrawn as a binomial proportion, independently. A clean and an ablated accuracy of one probe share
    their texts and move together, and every metric is a difference of such pairs, so this overstates the error:
    conservative. Two SAEs on one model share their clean accuracies (a shared model side), so those are drawn from
    ``seed`` alone, in run order and by name, and ``sample_id`` names what they are drawn from (the suite, the
    dataset runs, the clean accuracies, the test counts and ``drawn_from``: SAEBench's seed and sizes, which decide
    the texts); the replicate-wise difference of two such runs leaves out the clean accuracies' error instead of
    counting it twice. The ablated accuracies are drawn from a stream seeded by ``sae_identity`` and the accuracies
    (a rerun draws the same; two SAEs with equal ablated accuracies still draw independently), which overstates a
    difference's error where two SAEs' probes get the same texts right. A traced and a parametric run never share a
    ``sample_id``.

    ``keys``: SAEBench's per-dataset keys, in run order; ``masked_runs``: the padding-masked raw results with their
    clean accuracies (``PaddingMaskedRuns.runs``), whose metrics' errors are keyed ``<metric>_padding_masked``. A
    replicate is SAEBench's whole statistic on the redrawn accuracies, so a metric is averaged over the dataset runs
    that have it in that replicate, as SAEBench would (SCR's ``scr_metric`` is missing where the clean accuracies of
    its two directions tie), and its error is over the replicates that have it at all (``samples`` holds None in the
    others, so that replicate i is the same resample in every run on the texts). SCR's ``scr_metric`` follows
    the direction the redrawn clean accuracies choose, so where the two directions' clean accuracies are close its
    replicates mix both directions' scores: its error then includes that the direction itself is uncertain, and can
    be far wider than either direction's. Returns ``{"unit", "method", "se_kind", ["untraced",] "replicates", "seed",
    "sample_id", "n_test", "se", "per_dataset_se", "samples", "accuracies"}``, the last SAEBench's ablated and clean
    accuracies per dataset run, which its output does not keep."""
    import numpy as np
    from sae_bench.evals.scr_and_tpp.main import create_tpp_plotting_dict, get_scr_plotting_dict
    from sae_bench.sae_bench_utils.general_utils import average_results_dictionaries

    if len(keys) != len(runs):
        raise RuntimeError(f"{suite}: {len(keys)} dataset results from SAEBench, accuracies of {len(runs)} dataset runs")

    def score(raw: dict, clean: dict) -> dict[str, float]:
        with contextlib.redirect_stdout(io.StringIO()):  # SAEBench prints every score it computes
            return get_scr_plotting_dict(raw, clean) if suite == "scr" else create_tpp_plotting_dict(raw, clean)[0]

    def flat(raw: dict) -> list[tuple[tuple, float]]:
        """raw (ablated class -> k -> measured accuracy name -> accuracy) as ((ablated, k, name), accuracy) pairs."""
        return [((a, k, name), p) for a, by_k in raw.items() for k, acc in by_k.items() for name, p in acc.items()]

    def nested(places: list[tuple], values) -> dict:
        raw: dict = {}
        for (a, k, name), value in zip(places, values, strict=True):
            raw.setdefault(a, {}).setdefault(k, {})[name] = value
        return raw

    def draw(accuracies: list[tuple[tuple, float]], n_test: dict[str, int], from_generator) -> list[list[float]]:
        if not accuracies:
            return [[] for _ in range(replicates)]
        n = np.array([n_test[place[-1]] for place, _ in accuracies])
        return (from_generator.binomial(n, [p for _, p in accuracies], size=(replicates, len(accuracies))) / n).tolist()

    def stream(part: int, accuracies: list) -> np.random.Generator:
        """A generator for one SAE's own accuracies: seeded by them, so a rerun draws the same and another SAE (other
        accuracies) draws independently."""
        digest = hashlib.sha256(json.dumps([sae_identity, accuracies], sort_keys=True, default=str).encode()).digest()
        return np.random.default_rng([seed, part, int.from_bytes(digest[:8], "little")])

    # per run, every accuracy redrawn for all replicates at once: [replicates, accuracies]: the clean ones from one
    # stream over all runs (seed alone: the same draws for every SAE on the model), SAEBench's ablated ones and the
    # twins' ablated ones from streams of their own (so SAEBench's metrics' errors are the same whether or not the twins
    # could be computed)
    cleans = [[((name,), p) for name, p in sorted(run["clean"].items())] for run in runs]  # by name: one draw per accuracy
    ablated = [flat(run["raw"]) for run in runs]
    twins_ablated = [flat(masked[0]) if masked is not None else [] for masked in masked_runs or [None] * len(runs)]
    traced, untraced = _traced_outcomes(runs, masked_runs)
    redrawn = []
    joint: list[list[int]] = []
    if traced is not None:  # the texts themselves resampled: every accuracy of a run, and every SAE on the model, alike
        drawn_counts, joint = resampled_runs([units for units, _ in traced], replicates, [seed, 3])  # [replicates, entries] each
        for parts, (_, outcomes), counts in zip(zip(cleans, ablated, twins_ablated, strict=True), traced, drawn_counts, strict=True):
            tests = [outcomes[(i, place)] for i, part in enumerate(parts) for place, _ in part]
            drawn = _reweighted_accuracies(counts, tests).tolist() if tests else [[] for _ in range(replicates)]
            redrawn.append(([len(part) for part in parts], [[place for place, _ in part] for part in parts], drawn))
        method = (
            "bootstrap of the test texts (distinct bios or reviews, resampled within the texts of the same classes); each accuracy "
            "recomputed from the probes' answers text by text, the same resamples for every SAE with the same sample_id; "
            "SAEBench's scoring and averaging"
        )
        unit, kind = "test text (a distinct bio or review, resampled within the texts of its classes)", "bootstrap_se"
    else:
        for run in runs:  # the draws need every accuracy's test count
            ablated_accuracies = (item for by_k in run["raw"].values() for acc in by_k.values() for item in acc.items())
            for name, p in [*run["clean"].items(), *ablated_accuracies]:
                if not run["n_test"].get(name) or not 0.0 <= p <= 1.0:
                    counted = sorted(run["n_test"])
                    raise RuntimeError(f"{suite}: no test count for {name!r} (counted: {counted}) or accuracy {p} not a proportion")
        # per run, every accuracy redrawn for all replicates at once: [replicates, accuracies]: the clean ones from one
        # stream over all runs (seed alone: the same draws for every SAE on the model), SAEBench's ablated ones and the
        # twins' ablated ones from streams of their own (so SAEBench's metrics' errors are the same whether or not the
        # twins could be computed)
        clean_generator = np.random.default_rng([seed, 0])
        ablated_generator, twin_generator = stream(2, ablated), stream(1, twins_ablated)
        for run, parts in zip(runs, zip(cleans, ablated, twins_ablated, strict=True), strict=True):
            generators = (clean_generator, ablated_generator, twin_generator)
            drawn_parts = [draw(part, run["n_test"], generator) for part, generator in zip(parts, generators, strict=True)]
            drawn = [clean + own + twin for clean, own, twin in zip(*drawn_parts, strict=True)]
            redrawn.append(([len(part) for part in parts], [[place for place, _ in part] for part in parts], drawn))
        method = (
            "parametric bootstrap: each accuracy redrawn as a binomial proportion, independently (conservative); "
            "SAEBench's scoring and averaging; the clean accuracies' draws shared by every SAE with the same sample_id"
        )
        unit, kind = "test text (binomial, per accuracy)", "binomial_se"
    drawn_on = [suite, keys, [run["clean"] for run in runs], [run["n_test"] for run in runs], drawn_from]
    if traced is not None:  # never the same sample_id as a parametric draw: compare pairs only like with like
        drawn_on += ["texts", [units.digest for units, _ in traced]] + (["jointly", joint] if joint else [])
    sample_id = hashlib.sha256(json.dumps(drawn_on, sort_keys=True, default=str).encode()).hexdigest()[:20]

    samples: dict[str, list[float | None]] = {}  # metric (twins: <metric>_padding_masked) -> its value per replicate
    per_dataset_samples: dict[str, dict[str, list[float]]] = {key: {} for key in keys}
    for replicate in range(replicates):
        scored: dict[str, dict[str, float]] = {}
        for key, (sizes, places, drawn) in zip(keys, redrawn, strict=True):
            row = drawn[replicate]
            clean = dict(zip((place[0] for place in places[0]), row[: sizes[0]], strict=True))
            scored[key] = score(nested(places[1], row[sizes[0] : sizes[0] + sizes[1]]), clean)
            if sizes[2]:
                twins = score(nested(places[2], row[sizes[0] + sizes[1] :]), clean)
                scored[key].update({f"{m}{PADDING_MASKED}": v for m, v in twins.items()})
            for metric, value in scored[key].items():
                per_dataset_samples[key].setdefault(metric, []).append(value)
        for metric, value in average_results_dictionaries(scored, [key.removesuffix("_results") for key in keys]).items():
            samples.setdefault(metric, [None] * replicate).append(float(value))
        for values in samples.values():  # a metric this replicate lacks: None, so that position i is replicate i
            values.extend([None] * (replicate + 1 - len(values)))

    def spread(values: list[float]) -> float:
        return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")

    present = {metric: [v for v in values if v is not None] for metric, values in samples.items()}
    return {
        "unit": unit,
        "method": method,
        "se_kind": kind,
        **({"untraced": untraced} if untraced else {}),
        **({"texts": [units.summary() for units, _ in traced]} if traced is not None else {}),
        **({"resampled_together": [[keys[i] for i in group] for group in joint]} if joint else {}),
        "replicates": replicates,
        "seed": seed,
        "sample_id": sample_id,
        "replicates_with_metric": {metric: len(values) for metric, values in present.items() if len(values) < replicates},
        "n_test": {key: run["n_test"] for key, run in zip(keys, runs, strict=True)},
        "se": {metric: spread(values) for metric, values in sorted(present.items()) if len(values) > 1},
        "per_dataset_se": {
            key: {m: spread(v) for m, v in sorted(metrics.items()) if len(v) > 1} for key, metrics in per_dataset_samples.items()
        },
        "samples": {metric: [None if v is None else round(v, 9) for v in values] for metric, values in sorted(samples.items())},
        "accuracies": {key: {"raw": run["raw"], "clean": run["clean"]} for key, run in zip(keys, runs, strict=True)},
    }


def _traced_outcomes(runs: list[dict], masked_runs: list[tuple[dict, dict]] | None) -> tuple[list | None, str | None]:
    """Per dataset run, its ``TextUnits`` and each accuracy's traced entries and answers by part and place, as
    ``scr_tpp_uncertainty`` lays them out: ``(0, (name,))`` clean, ``(1, (ablated, k, name))`` SAEBench's ablated,
    ``(2, (ablated, k, name))`` the twins'; from ``scr_tpp_accuracies``. Or None and why not, if any accuracy lacks
    them or which texts were read is unknown (then every run falls back to the parametric draw)."""
    import numpy as np

    traced = []
    for index, run in enumerate(runs):
        recorded = run.get("outcomes")
        if recorded is None:
            return None, "no traced probe tests (runs recorded without them)"
        by_place: dict[tuple, tuple] = {}
        tests = recorded["tests"]
        groups = [(0, (), recorded["clean"], run["clean"])]
        for part, raw in [(1, run["raw"]), *([(2, masked_runs[index][0])] if masked_runs is not None else [])]:
            groups += [(part, (a, k), tests.get(id(acc), (None, None))[1], acc) for a, by_k in raw.items() for k, acc in by_k.items()]
        pools = None
        for part, prefix, outcomes, accuracies in groups:
            if outcomes is None or set(outcomes["by_name"]) != set(accuracies):
                return None, f"dataset run {index}: a probe test was not traced ({['clean', 'ablated', 'twin'][part]} {prefix})"
            tested_on = tuple(tuple(pool) for pool in outcomes["pools"])  # a loaded side's are lists
            if pools is not None and tested_on != pools:
                return None, f"dataset run {index}: probe tests over different texts"
            pools = tested_on
            for name, (texts, correct) in outcomes["by_name"].items():
                if abs(float(np.mean(correct)) - accuracies[name]) > 1e-6:  # a loaded clean side must be this run's
                    return None, f"dataset run {index}: traced answers to {name!r} do not give SAEBench's accuracy"
                by_place[(part, (*prefix, name))] = (np.asarray(texts, dtype=np.int64), np.asarray(correct, dtype=bool))
        units = TextUnits.of(pools, recorded.get("texts"))
        if units is None:
            return None, f"dataset run {index}: which texts SAEBench tested was not recorded"
        traced.append((units, by_place))
    return traced, None


@dataclass(frozen=True)
class TextUnits:
    """What SCR's and TPP's bootstrap resamples: the distinct test texts of one dataset run. A probe test reads entries
    (class, row); one bio can be an entry of several classes (SCR regroups the same four quadrants under its labels),
    so entries are mapped to texts by content (``scr_tpp_accuracies``), and texts are resampled within their
    ``strata``: the texts that are entries of the same classes. Every class then keeps its own number of entries in
    every resample, as SAEBench tests every class on a fixed number of texts, and the entries of one text move
    together."""

    entry_text: tuple  # [entries] the text each entry is (entry: pool offset + row, pools in sorted class order)
    strata: tuple  # ((texts, ...), ...): the texts that are entries of the same classes, in a fixed order
    digest: str  # of every entry's text, in order: two runs resample alike only on the same texts
    texts: tuple  # [texts] each numbered text's content digest: what tells another run's same text (``resampled_runs``)

    @classmethod
    def of(cls, pools: tuple, texts: dict[str, list[str]] | None) -> TextUnits | None:
        if texts is None or any(len(texts.get(key) or ()) != n for key, n in pools):
            return None
        entries = [(key, digest) for key, _ in pools for digest in texts[key]]
        number = {digest: i for i, digest in enumerate(sorted({digest for _, digest in entries}))}
        classes_of: dict[int, list[str]] = {}  # text -> the classes it is an entry of
        for key, digest in entries:
            classes_of.setdefault(number[digest], []).append(key)
        strata: dict[tuple, list[int]] = {}
        for text in range(len(number)):
            strata.setdefault(tuple(classes_of[text]), []).append(text)
        digest = hashlib.sha256(json.dumps([pools, [d for _, d in entries]]).encode()).hexdigest()[:20]
        ordered = tuple(tuple(strata[signature]) for signature in sorted(strata))
        return cls(tuple(number[d] for _, d in entries), ordered, digest, tuple(sorted(number)))

    def summary(self) -> dict:
        return {"entries": len(self.entry_text), "texts": sum(map(len, self.strata)), "strata": len(self.strata)}


def _resampled_text_counts(units: TextUnits, replicates: int, seed: list[int]):
    """[replicates, entries] int32: how often each entry's text is drawn in each replicate, the texts of each stratum
    (``TextUnits``) resampled with replacement to the stratum's size. Seeded by ``seed`` and the texts alone, so two
    SAEs tested on the same texts draw the same."""
    import numpy as np

    generator = np.random.default_rng([*seed, int(units.digest[:15], 16)])
    per_text = np.zeros((replicates, sum(map(len, units.strata))), dtype=np.int32)
    for texts in units.strata:
        n = len(texts)
        per_text[:, list(texts)] = generator.multinomial(n, np.full(n, 1.0 / n), size=replicates)
    return per_text[:, list(units.entry_text)]


def resampled_runs(units: list[TextUnits], replicates: int, seed: list[int]) -> tuple[list, list[list[int]]]:
    """(per dataset run, its [replicates, entries] draw counts; the groups of runs drawn together). A run that shares no
    text with another is resampled alone, exactly as ``_resampled_text_counts`` with ``[*seed, index]``. Runs that test on
    some of the same texts (views of one repository: SAEBench's two Amazon sparse-probing tasks read the same reviews)
    are resampled together: each text drawn once for all of them, within the texts that are entries of the same
    classes in every run of the group (so each run's classes keep their sizes, as alone), where drawing them apart
    would treat one review's two tests as independent and make the error of their mean too small."""
    import numpy as np

    parent = list(range(len(units)))  # union-find over the runs: joined where they share a text

    def root(index: int) -> int:
        while parent[index] != index:
            index = parent[index]
        return index

    first_run: dict[str, int] = {}  # text -> the first run that tests on it
    for index, run in enumerate(units):
        for text in run.texts:
            parent[root(index)] = root(first_run.setdefault(text, index))
    by_root: dict[int, list[int]] = {}
    for index in range(len(units)):
        by_root.setdefault(root(index), []).append(index)
    groups = sorted(by_root.values())
    counts: list = [None] * len(units)
    for group in groups:
        if len(group) == 1:
            counts[group[0]] = _resampled_text_counts(units[group[0]], replicates, [*seed, group[0]])
            continue
        union = sorted(set().union(*(units[g].texts for g in group)))
        number = {text: i for i, text in enumerate(union)}
        stratum_of = [{number[units[g].texts[t]]: s for s, stratum in enumerate(units[g].strata) for t in stratum} for g in group]
        strata: dict[tuple, list[int]] = {}
        for text in range(len(union)):
            strata.setdefault(tuple(of.get(text, -1) for of in stratum_of), []).append(text)
        digest = hashlib.sha256(json.dumps([units[g].digest for g in group]).encode()).hexdigest()[:15]
        generator = np.random.default_rng([*seed, len(units) + group[0], int(digest, 16)])
        per_text = np.zeros((replicates, len(union)), dtype=np.int32)
        for signature in sorted(strata):
            texts = strata[signature]
            per_text[:, texts] = generator.multinomial(len(texts), np.full(len(texts), 1.0 / len(texts)), size=replicates)
        for g in group:
            counts[g] = per_text[:, [number[units[g].texts[t]] for t in units[g].entry_text]]
    return counts, [group for group in groups if len(group) > 1]


def _reweighted_accuracies(counts, tests: list[tuple]):
    """[replicates, tests] each probe test's accuracy in each resample: its texts weighted by how often each was drawn.
    ``tests``: (texts, correct) per test. One matrix product: per test, its right answers and its texts as columns
    over all texts ([texts, tests], a text read twice counted twice)."""
    import numpy as np

    right, read = np.zeros((counts.shape[1], len(tests))), np.zeros((counts.shape[1], len(tests)))
    for column, (texts, correct) in enumerate(tests):
        np.add.at(right[:, column], texts, correct)
        np.add.at(read[:, column], texts, 1.0)
    weights = counts.astype(np.float64)
    return (weights @ right) / (weights @ read)


class RepeatedInputCache:
    """Exact memo of an SAE's ``encode`` (and of the ``decode`` of its untouched output) for inputs SAEBench passes
    again. SCR's and TPP's ablation loop (`scr_and_tpp.main.ablated_precomputed_activations`) encodes the same test
    activations once per ablated class and per n, 21 to 35 times, only to zero a few latents of the result: most of
    those suites' time. SAEBench offers no way in, so the SAE object it is handed memoises.

    An input is recognised by its storage, offset, shape, strides, dtype and version counter (bumped by any in-place
    write through it or a view of it; SAEBench never writes its activations through ``.data``), and cached the second
    time the same tensor is seen (a new tensor at a freed address is a first sight again); a cached entry holds its
    input, so no other tensor can take that storage while the entry lives, and the budget counts that storage.
    Callers get a fresh copy each time (SAEBench zeroes latents in place). Only without autograd, and only up to
    ``budget_bytes`` of cached tensors; past that it computes as before. The numbers are those of the uncached code,
    bit for bit (tests/test_evaluate_suites.py)."""

    def __init__(self, sae: SAE, budget_bytes: int):
        self.budget, self.used = budget_bytes, 0
        self.encode, self.decode = sae.encode, sae.decode  # the SAE's own (bound) methods
        # SAELens's layer_norm and constant_norm_rescale SAEs keep the statistics of the input at encode and drop them
        # at decode (GUIDE §4); SAEBench's ablation decodes twice per encode (AttributeError: 'ln_std'). Each decode of
        # latents this memo handed out is given the statistics of the input they were encoded from, as a forward would.
        self.restate = sae.process_sae_in if sae.cfg.normalize_activations in STATEFUL_NORMS else None  # sets them
        self.inputs: dict[int, tuple] = {}  # id(latents handed out) -> (weakref to them, weakref to their input)
        self.seen: dict[tuple, weakref.ref] = {}  # key of a first sight -> the tensor it views (alive: the same data)
        self.held: set[int] = set()  # ids of the tensors whose storage an entry keeps alive (counted once each)
        self.entries: dict[tuple, list] = {}  # key -> [input, latents, reconstruction or None]
        self.handed_out: dict[int, tuple] = {}  # id(copy of latents) -> (weakref to it, its version, key)
        self.hits = 0

    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype, x.device, x._version)

    def cached_encode(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.requires_grad:
            return self.encode(x)
        key = self._key(x)
        entry = self.entries.get(key)
        if entry is None:
            latents = self.encode(x)
            base = x._base if x._base is not None else x
            first = self.seen.get(key)
            if first is None or first() is not base:  # a first sight (or a new tensor at a freed address)
                self.seen[key] = weakref.ref(base)
                return self._from(latents, x)
            size = latents.numel() * latents.element_size()
            size += 0 if id(base) in self.held else base.untyped_storage().nbytes()  # an entry keeps its input's storage
            if self.used + size > self.budget:
                return self._from(latents, x)
            self.used += size
            self.held.add(id(base))
            entry = self.entries[key] = [x, latents, None]
        else:
            self.hits += 1
        copy = self._from(entry[1].clone(), x)
        self.handed_out = {i: h for i, h in self.handed_out.items() if h[0]() is not None}
        self.handed_out[id(copy)] = (weakref.ref(copy), copy._version, key)
        return copy

    def _from(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Remember which input ``latents`` were encoded from (for a stateful normalisation's decode)."""
        if self.restate is not None:
            self.inputs = {i: h for i, h in self.inputs.items() if h[0]() is not None}
            self.inputs[id(latents)] = (weakref.ref(latents), weakref.ref(x))
        return latents

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The SAE's decode, with the normalisation statistics of the input ``latents`` came from when we know it."""
        known = self.inputs.get(id(latents))
        if known is not None and known[0]() is latents and known[1]() is not None:
            self.restate(known[1]())  # sets the statistics the decode reads (and deletes)
        return self.decode(latents)

    def cached_decode(self, latents: torch.Tensor) -> torch.Tensor:
        handed = self.handed_out.get(id(latents))
        if handed is None or handed[0]() is not latents or latents._version != handed[1] or torch.is_grad_enabled():
            return self._decode(latents)  # not a copy we handed out, or written to since (ablated latents)
        entry = self.entries[handed[2]]
        if entry[2] is None:
            reconstruction = self._decode(latents)
            size = reconstruction.numel() * reconstruction.element_size()
            if self.used + size > self.budget:
                return reconstruction
            self.used += size
            entry[2] = reconstruction
        return entry[2].clone()


STATEFUL_NORMS = ("layer_norm", "constant_norm_rescale")
"""SAELens input normalisations whose statistics ``encode`` stores on the SAE and ``decode`` consumes."""
REPEATED_INPUT_CACHE_BYTES: int | None = None
"""How much SCR's and TPP's memo of the SAE's latents may hold (on the SAE's device); 0 turns it off. None: 1 GiB on
the CPU, a quarter of the free memory on a GPU (at GPT-2 small's width one batch of SAEBench's latents is 1.6 GB)."""


def memo_budget(device: torch.device | str) -> int:
    """The memo's budget on ``device``: `REPEATED_INPUT_CACHE_BYTES` when set, else as its docstring says."""
    if REPEATED_INPUT_CACHE_BYTES is not None:
        return REPEATED_INPUT_CACHE_BYTES
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    return 1 << 30


@contextmanager
def repeated_inputs_cached(sae: SAE, budget_bytes: int | None = None) -> Iterator[RepeatedInputCache]:
    """``sae.encode``/``sae.decode`` memoised by `RepeatedInputCache` inside the block, its own methods after it."""
    cache = RepeatedInputCache(sae, memo_budget(sae.device) if budget_bytes is None else budget_bytes)
    try:
        with shadowed(sae, encode=cache.cached_encode, decode=cache.cached_decode):
            yield cache
    finally:
        cache.entries.clear()


@dataclass(frozen=True)
class ModelSide:
    """Where SAEBench's model-side files for one suite run live (``model_side_folder``)."""

    folder: Path
    save: bool
    """Whether SAEBench saves its model-side files there (it loads them wherever they exist: a loading run saves
    nothing, so a published folder is never written to)."""
    computing: bool
    """Whether this run computes the model side (else it loads a complete shared folder)."""
    origin: str
    """Where the model side came from, for the run's tag."""


def model_side_bytes(config, d_in: int) -> int:
    """An estimate, with a margin, of what SAEBench saves of one suite's model side for an SAE reading ``d_in``
    activations: every labelled text's activations at every position, train and test, per dataset (SCR: per class
    pair). Measured on the tiny world at 1.8 (sparse probing), 2.5 (TPP) and 3.0 (SCR) times (train + test texts) x
    context x d_in x dtype size per dataset, for the several class views of each text; counted here as 4 times.
    SAEBench's own sizes make this several GB per dataset for GPT-2 small."""
    from sae_bench.sae_bench_utils.general_utils import str_to_dtype

    if hasattr(config, "probe_train_set_size"):  # sparse probing
        texts, units = config.probe_train_set_size + config.probe_test_set_size, len(config.dataset_names)
    else:
        texts, units = config.train_set_size + config.test_set_size, len(config.dataset_names)
        if config.perform_scr:  # one model side per class pair
            units = sum(len(config.column1_vals_lookup.get(name, ())) for name in config.dataset_names)
    return 4 * texts * config.context_length * d_in * str_to_dtype(config.llm_dtype).itemsize * max(units, 1)


SHARED_FREE_MARGIN = 2 << 30
"""Disk space a shared model side leaves free beyond its own estimate (``model_side_folder``)."""


@contextmanager
def model_side_folder(
    shared: Path | None, config, hook_name: str, device: str, private: Path, bytes_needed: int = 0
) -> Iterator[ModelSide]:
    """SAEBench's artifacts folder for SCR, TPP or sparse probing (SHARED_MODEL_SIDE).

    Without ``shared``, or where the disk under it has less free space than ``bytes_needed`` (``model_side_bytes``)
    plus a margin: a fresh private folder, nothing saved (SAEBench's saved model side runs to tens of GB for
    GPT-2 small; a full disk must not fail the suite). With it: the folder of this model, hook and config
    under ``shared`` (the config names the suite, model, datasets, sizes and seed). The first SAE computes SAEBench's
    model-side files in a staging folder that becomes the keyed one by an atomic rename only when its suite
    succeeded, so a keyed folder is always complete, and every later SAE only loads from it, as SAEBench's own
    `run_eval` does for the SAEs after its first. Their SAE sides start from the random state
    ``per_dataset_random_state`` records there, so a loaded folder gives exactly the numbers a fresh computation gives
    (tests/test_evaluate_suites.py)."""
    if shared is None:
        private.mkdir(parents=True, exist_ok=True)
        yield ModelSide(private, False, True, "computed by this run")
        return
    identity = {"hook_name": hook_name, "device": device, "config": dataclasses.asdict(config)}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    folder = Path(shared) / key
    if folder.is_dir():  # SAEBench only loads
        yield ModelSide(folder, False, False, f"loaded from {folder} (computed by an earlier run of this pipeline)")
        return
    Path(shared).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(shared).free
    if free < bytes_needed + SHARED_FREE_MARGIN:
        private.mkdir(parents=True, exist_ok=True)
        why = f"not shared: it may take {bytes_needed / 1e9:.1f} GB and {shared} has {free / 1e9:.1f} GB free"
        yield ModelSide(private, False, True, f"computed by this run ({why})")
        return
    staging = Path(shared) / f".{key}.{os.getpid()}.{threading.get_ident()}.partial"
    staging.mkdir(parents=True)
    try:
        yield ModelSide(staging, True, True, f"computed by this run and shared in {folder}")
        try:
            os.replace(staging, folder)
        except OSError:  # another process published the same folder first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _random_state() -> dict:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_random_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:  # per device this process sees (the pipeline shares folders on one machine only)
        for index, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


_WRAPPING = threading.Lock()  # the wrapped SAEBench functions are module attributes: one suite at a time per process


@contextmanager
def per_dataset_random_state(suite: str, side: ModelSide, seed: int) -> Iterator[None]:
    """SCR, TPP and sparse probing with the random state of each dataset's SAE side independent of whether this run
    computed the model side or loaded it (SHARED_MODEL_SIDE); other suites as they are.

    - Where a dataset's SAE side starts (SAE_SIDE_ENTRIES), the run that computes a shared model side records the
      global generators' state (Python, NumPy, torch with CUDA) in the shared folder, and a run that loads it sets
      that state: the state a computing run of any SAE has there.
    - For sparse probing (MODEL_SIDE_RESEEDED), the generators are seeded with the suite's ``random_seed`` where a
      dataset's model side starts, as SAEBench seeds them at the start of its run (NumPy: as ``run_suite`` does), so
      that the state recorded there does not depend on the SAE side of the dataset before it. For the first dataset
      this changes nothing.

    SAEBench offers no way in between a dataset's model side and its SAE side, so for the duration of the suite those
    functions are wrapped; as are SCR's and TPP's in ``padding_masked_ablations`` and ``scr_tpp_accuracies``, and
    sparse probing's in ``sparse_probing_accuracies``."""
    import importlib
    import random

    import numpy as np

    if suite not in SAE_SIDE_ENTRIES:
        yield
        return
    path = side.folder / RANDOM_STATES_FILE
    states: list[dict] = [] if side.computing else torch.load(path, weights_only=False)
    starts = 0

    def seed_all() -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # every device's generator

    def sae_side_starts() -> None:
        nonlocal starts
        if side.computing:
            states.append(_random_state())
        elif starts < len(states):
            _set_random_state(states[starts])
        else:
            raise RuntimeError(f"{path} records {len(states)} SAE-side starts of {suite}; this run reached a {starts + 1}th")
        starts += 1

    entries = [(SAE_SIDE_ENTRIES[suite], sae_side_starts)]
    if suite in MODEL_SIDE_RESEEDED:
        entries.append((MODEL_SIDE_RESEEDED[suite], seed_all))
    wrapped = []
    with _WRAPPING:
        try:
            for (module_name, name), before in entries:
                module = importlib.import_module(module_name)
                original = getattr(module, name)

                def call(*args, _original=original, _before=before, **kwargs):
                    _before()
                    return _original(*args, **kwargs)

                setattr(module, name, call)
                wrapped.append((module, name, original))
            yield
        finally:
            for module, name, original in reversed(wrapped):
                setattr(module, name, original)
    if side.computing and side.save:
        torch.save(states, path)
    elif not side.computing and starts != len(states):
        raise RuntimeError(f"{path} records {len(states)} SAE-side starts of {suite}; this run made {starts}")


PADDING_MASKED = "_padding_masked"
"""Suffix of SCR's and TPP's metrics computed with the padded positions masked in the ablation
(``padding_masked_ablations``), logged beside SAEBench's own."""


def padding_leak(
    acts_BLD: torch.Tensor,
    sae: SAE,
    to_ablate: torch.Tensor,
    at_padding_D: torch.Tensor | None = None,
    real_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, D]``: what SAEBench's `scr_and_tpp.main.ablated_precomputed_activations` adds to each text's mean from
    its zeroed (padded) positions when it ablates ``to_ablate``: at such a position it computes ``decode(ablated
    f(0)) + (0 - decode(f(0)))``, the same vector at every one (``at_padding_D``, computed when not given), and sums it
    with the real positions before dividing by their number (``real_B``, counted as SAEBench counts them when not
    given). Exactly zero when no ablated latent fires on a zero input (the two decodes are then the same).
    Returned in float32. SAEBench's mean less this is the mean over the real positions up to the rounding of SAEBench's
    sum in the activations' dtype, which carries every padded position's leak (in float32 measured 2.3e-5 at most for
    54 padded positions of 57); a masked second decode would be exact and cost as much again as SAEBench's ablation
    loop. A real position whose activations sum to exactly zero counts as padding here, as SAEBench counts it."""
    if at_padding_D is None:
        at_padding_D = ablation_at_padding(acts_BLD, sae, to_ablate)
    if real_B is None:
        real_B = real_positions(acts_BLD)
    real_B = real_B.float()  # in float32 whatever the model's dtype (bf16 cannot hold 1/3 to 3 digits)
    padded_share_B = (acts_BLD.shape[1] - real_B) / real_B
    return padded_share_B[:, None] * at_padding_D.float()[None, :]


def ablation_at_padding(acts_BLD: torch.Tensor, sae: SAE, to_ablate: torch.Tensor) -> torch.Tensor:
    """``[D]``: SAEBench's ablated activation at a zeroed position, ``decode(ablated f(0)) + (0 - decode(f(0)))``,
    for activations like ``acts_BLD`` (its dtype, device and width)."""
    zero = acts_BLD.new_zeros(1, 1, acts_BLD.shape[-1])
    latents = sae.encode(zero)
    error = zero - sae.decode(latents)
    latents[..., to_ablate] = 0.0
    return (sae.decode(latents) + error)[0, 0]


def real_positions(acts_BLD: torch.Tensor) -> torch.Tensor:
    """``[B]``: the positions SAEBench counts as real, those whose activations do not sum to zero (as it counts)."""
    import einops

    return (einops.reduce(acts_BLD, "B L D -> B L", "sum") != 0.0).to(acts_BLD.dtype).sum(dim=1)


@dataclass
class PaddingMaskedRuns:
    """What ``padding_masked_ablations`` collects: per dataset run in SAEBench's order, the masked raw results with
    that dataset's clean model accuracies; or why the twins could not be computed (SAEBench's numbers stand)."""

    runs: list[tuple[dict, dict]] = field(default_factory=list)
    failed: str | None = None

    def fail(self, error: BaseException) -> None:
        if self.failed is None:
            self.failed = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


@contextmanager
def padding_masked_ablations() -> Iterator[PaddingMaskedRuns]:
    """SCR and TPP as SAEBench computes them, and beside them with the padded positions masked in the ablation: the
    README's "Known SAEBench deviation". SAEBench masks padding everywhere else (its node effects and its meaned SAE
    activations multiply by the mask), but `ablated_precomputed_activations` does not, so its numbers move with the
    context's padding for any SAE that fires on a zero input.

    SAEBench's `perform_feature_ablations` runs unchanged and its results are what SAEBench returns; it is then run
    a second time from the same random state (its probe tests draw samples), on the same ablated means less their
    padding leak (``padding_leak``, in float32; no second SAE pass), and the state SAEBench's pass left is restored, so
    SAEBench's numbers stay bit for bit its own (tests/test_evaluate_suites.py). The twins are ours, SAEBench's numbers
    are the paper's: an error in computing the twins is recorded (``PaddingMaskedRuns.failed``), never raised.
    ``padding_masked_results`` turns what this collects into SAEBench's metrics. Hold ``_WRAPPING`` (entered inside
    ``per_dataset_random_state``)."""
    from sae_bench.evals.scr_and_tpp import main as scr_tpp

    ablate, ablations, one_dataset = (
        scr_tpp.ablated_precomputed_activations, scr_tpp.perform_feature_ablations, scr_tpp.run_eval_single_dataset
    )  # fmt: skip
    collected = PaddingMaskedRuns()
    pending: list[dict | None] = []

    def both_ablations(*args, **kwargs):
        recorded: list[tuple[tuple, torch.Tensor]] = []  # per call: (its arguments' identity, masked mean [B, D])
        at_padding: dict[bytes, torch.Tensor] = {}  # per ablated set (applied to every class's texts in turn)
        reals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per test tensor (alive: SAEBench's dict holds it)

        def recording(acts_BLD, sae, to_ablate, sae_batch_size):
            pooled_BD = ablate(acts_BLD, sae, to_ablate, sae_batch_size)
            if collected.failed is None:
                try:
                    key = (id(acts_BLD), to_ablate.cpu().numpy().tobytes())
                    if key[1] not in at_padding:
                        at_padding[key[1]] = ablation_at_padding(acts_BLD, sae, to_ablate)
                    if key[0] not in reals or reals[key[0]][0] is not acts_BLD:
                        reals[key[0]] = (acts_BLD, real_positions(acts_BLD))
                    leak_BD = padding_leak(acts_BLD, sae, to_ablate, at_padding[key[1]], reals[key[0]][1])
                    recorded.append((key, (pooled_BD.float() - leak_BD).to(pooled_BD.dtype)))
                except Exception as error:  # the twin only: SAEBench's pass goes on
                    collected.fail(error)
            return pooled_BD

        def replaying(acts_BLD, sae, to_ablate, sae_batch_size):
            if not recorded:
                raise RuntimeError("SAEBench's ablation loop made more ablations the second time")
            key, masked_BD = recorded.pop(0)
            if key != (id(acts_BLD), to_ablate.cpu().numpy().tobytes()):
                raise RuntimeError("SAEBench's ablation loop called its ablations in another order the second time")
            return masked_BD

        before = _random_state()
        scr_tpp.ablated_precomputed_activations = recording
        try:
            results = ablations(*args, **kwargs)
        finally:
            scr_tpp.ablated_precomputed_activations = ablate
        masked = None
        if collected.failed is None:
            after = _random_state()
            _set_random_state(before)  # the masked pass's probe tests draw the samples SAEBench's drew
            scr_tpp.ablated_precomputed_activations = replaying
            try:
                masked = ablations(*args, **kwargs)
                if recorded:
                    raise RuntimeError(f"SAEBench's ablation loop made {len(recorded)} fewer ablations the second time")
            except Exception as error:
                collected.fail(error)
                masked = None
            finally:
                scr_tpp.ablated_precomputed_activations = ablate
                _set_random_state(after)  # what follows draws as in SAEBench alone
        pending.append(masked)
        return results

    def dataset(*args, **kwargs):
        raw, clean_accuracies = one_dataset(*args, **kwargs)
        masked = pending.pop() if pending else None
        if masked is not None:
            collected.runs.append((masked, clean_accuracies))
        return raw, clean_accuracies

    scr_tpp.perform_feature_ablations, scr_tpp.run_eval_single_dataset = both_ablations, dataset
    try:
        yield collected
    finally:
        scr_tpp.perform_feature_ablations, scr_tpp.run_eval_single_dataset = ablations, one_dataset


def padding_masked_results(suite: str, results: dict, collected: PaddingMaskedRuns) -> dict | None:
    """SAEBench's SCR or TPP metrics of the padding-masked ablations (``padding_masked_ablations``), per dataset run
    and averaged over them, by SAEBench's own plotting and averaging functions as its `run_eval_single_sae` applies
    them: ``{"datasets": {<SAEBench's per-dataset key>: metrics}, "averaged": metrics}``; None (and
    ``collected.failed`` says why) where they could not be computed."""
    from sae_bench.evals.scr_and_tpp.main import create_tpp_plotting_dict, get_scr_plotting_dict
    from sae_bench.sae_bench_utils.general_utils import average_results_dictionaries

    if collected.failed is not None:
        return None
    try:
        keys = [key for key, value in results.items() if isinstance(value, dict)]  # "<run name>_results", in run order
        if len(keys) != len(collected.runs):
            raise RuntimeError(f"{suite}: {len(keys)} dataset results from SAEBench, {len(collected.runs)} padding-masked ones")
        with contextlib.redirect_stdout(io.StringIO()):  # SAEBench prints every score it plots; the log has SAEBench's own
            per_dataset = {
                key: get_scr_plotting_dict(raw, clean) if suite == "scr" else create_tpp_plotting_dict(raw, clean)[0]
                for key, (raw, clean) in zip(keys, collected.runs, strict=True)
            }
        averaged = average_results_dictionaries(per_dataset, [key.removesuffix("_results") for key in keys])
    except Exception as error:
        collected.fail(error)
        return None
    return {
        "what": "SAEBench's metrics with the padded positions masked in its ablation (saecomp.evaluate.padding_masked_ablations)",
        "datasets": per_dataset,
        "averaged": averaged,
    }


def absorption_token_position(model: HookedTransformer, template: str) -> int:
    """The position of ``{word}`` in SAEBench's first-letter prompt, counted from the end, for this tokenizer
    (SAEBench's default -6 holds for GPT-2's and Gemma's tokenizers, not for every one)."""
    suffix = template.split("{word}", 1)[1]
    return -(len(model.tokenizer(suffix, add_special_tokens=False)["input_ids"]) + 1)


class NotApplicable(Exception):
    """A suite that cannot apply to this model or SAE: logged as a tag with the reason, no number, not a failure."""


def run_absorption(model: HookedTransformer, sae: SAE, config, workdir: Path, sae_name: str = "sae") -> SuiteResult:
    """SAEBench's feature absorption: its k-sparse probing experiment then its absorption experiment
    (`absorption.k_sparse_probing` and `absorption.feature_absorption`), with every results and probe folder a
    fresh one of ours, aggregated and packed into `AbsorptionEvalOutput` as its `run_eval` does.

    `NotApplicable` (with the reason) where SAEBench's absorption cannot measure this SAE: one off the residual
    stream; a model whose context is shorter than SAEBench's prompts; or fewer than ``config.min_feats_for_eval``
    letters with a ground-truth probe F1 above ``config.min_GT_probe_f1`` (SAEBench's own gate: the model does not
    represent enough first letters)."""
    started = time.perf_counter()
    if not sae.cfg.metadata.hook_name.endswith("hook_resid_post"):
        # SAEBench's absorption reads blocks.<layer>.hook_resid_post for its probes and for the SAE's input, whatever
        # the SAE's hook: any other SAE would be fed residual activations (same width in GPT-2: no error, wrong numbers).
        raise NotApplicable(
            f"SAEBench's absorption reads the residual stream (hook_resid_post); this SAE reads "
            f"{sae.cfg.metadata.hook_name.removesuffix(FLAT_Z_SUFFIX)}"
        )
    longest = absorption_prompt_tokens(model, config)
    if longest > model.cfg.n_ctx:
        raise NotApplicable(
            f"SAEBench's first-letter prompts (up to 10 in-context examples) run to {longest} tokens here, longer than the "
            f"model's context of {model.cfg.n_ctx}: their ends, where the probes read, would be cut off"
        )
    sae = prepared_for_saebench(sae, config.model_name)
    folders = {name: workdir / "absorption" / name for name in ("probes", "k_sparse_probing", "feature_absorption")}
    # SAEBench reads each prompt's word at a fixed offset from the end of a padded batch, which holds only with left
    # padding (Gemma's tokenizer pads left; GPT-2's pads right, and the offset would land on padding).
    padding_side, model.tokenizer.padding_side = model.tokenizer.padding_side, "left"
    try:
        with alphabetic_tokens_in_one_order():
            return _absorption(model, sae, config, folders, sae_name, started)
    finally:
        model.tokenizer.padding_side = padding_side


ALPHABETIC_TOKEN_READERS = ("sae_bench.evals.absorption.common", "sae_bench.evals.absorption.feature_absorption")
"""The modules of SAEBench's absorption that list the alphabetic tokens (`get_alpha_tokens`, imported by name)."""


@contextmanager
def alphabetic_tokens_in_one_order() -> Iterator[None]:
    """SAEBench's absorption with the tokenizer's alphabetic tokens sorted, for the duration.

    SAEBench lists them in ``tokenizer.vocab``'s order, which a fast tokenizer builds from a Rust hash map: another
    order in every process. Its seeded shuffles of that list (the probes' train and test words, the in-context
    examples) then drew other words in every run, so one key gave other absorption numbers each time."""
    import importlib

    wrapped = []
    with _WRAPPING:
        try:
            for module_name in ALPHABETIC_TOKEN_READERS:
                module = importlib.import_module(module_name)
                original = module.get_alpha_tokens

                def in_one_order(*args, _original=original, **kwargs) -> list[str]:
                    return sorted(_original(*args, **kwargs))

                module.get_alpha_tokens = in_one_order
                wrapped.append((module, original))
            yield
        finally:
            for module, original in reversed(wrapped):
                module.get_alpha_tokens = original


def absorption_prompt_tokens(model: HookedTransformer, config, n: int = 256) -> int:
    """The longest of ``n`` first-letter prompts built as SAEBench builds them (`create_icl_prompt`, 10 examples
    from the model's alphabetic tokens), in this model's tokens."""
    import random

    from sae_bench.evals.absorption.prompting import create_icl_prompt, first_letter_formatter
    from sae_bench.evals.absorption.vocab import get_alpha_tokens

    vocab = sorted(get_alpha_tokens(model.tokenizer))  # as SAEBench gets them (alphabetic_tokens_in_one_order)
    state = random.getstate()
    random.seed(config.random_seed)
    try:
        prompts = [
            create_icl_prompt(
                word, vocab, base_template=config.prompt_template, answer_formatter=first_letter_formatter(), max_icl_examples=10
            )
            for word in random.sample(vocab, min(n, len(vocab)))
        ]
    finally:
        random.setstate(state)
    return max(len(model.tokenizer(p.base)["input_ids"]) for p in prompts)


def _absorption(model: HookedTransformer, sae: SAE, config, folders: dict, sae_name: str, started: float) -> SuiteResult:
    workdir = folders["probes"].parent.parent
    import statistics
    from datetime import datetime

    from sae_bench.evals.absorption import eval_output as out
    from sae_bench.evals.absorption.feature_absorption import run_feature_absortion_experiment
    from sae_bench.evals.absorption.k_sparse_probing import run_k_sparse_probing_experiment
    from sae_bench.evals.absorption.main import _aggregate_results_df
    from sae_bench.sae_bench_utils import get_eval_uuid

    common = {
        "model": model,
        "sae": sae,
        "layer": sae.cfg.hook_layer,
        "sae_name": sae_name.replace("/", "_"),
        "max_k_value": config.max_k_value,
        "prompt_template": config.prompt_template,
        "prompt_token_pos": config.prompt_token_pos,
        "device": str(sae.device),
        "probes_dir": folders["probes"],
        "force": True,
    }
    with torch.enable_grad():
        # SAEBench's own gate, checked before the k-sparse probes are trained: it depends on the model alone.
        letter_f1 = ground_truth_probe_f1(model, sae.cfg.hook_layer, config, folders["probes"], str(sae.device))
        good_letters = sum(f1 > config.min_GT_probe_f1 for f1 in letter_f1.values())
        if good_letters < config.min_feats_for_eval:
            raise NotApplicable(
                f"the model represents too few first letters at layer {sae.cfg.hook_layer}: {good_letters} letters have a "
                f"ground-truth probe F1 above {config.min_GT_probe_f1}, SAEBench needs {config.min_feats_for_eval} (min_feats_for_eval)"
            )
        k_sparse = run_k_sparse_probing_experiment(
            **common,
            experiment_dir=folders["k_sparse_probing"],
            f1_jump_threshold=config.f1_jump_threshold,
            k_sparse_probe_l1_decay=config.k_sparse_probe_l1_decay,
            k_sparse_probe_batch_size=config.k_sparse_probe_batch_size,
            k_sparse_probe_num_epochs=config.k_sparse_probe_num_epochs,
            eval_batch_size=config.eval_k_sparse_probe_batch_size,
            precalc_k_sparse_probe_sae_acts=config.precalc_k_sparse_probe_sae_acts,
            verbose=False,
        )
        raw = run_feature_absortion_experiment(
            **common,
            experiment_dir=folders["feature_absorption"],
            sparse_probing_experiment_dir=folders["k_sparse_probing"],
            feature_split_f1_jump_threshold=config.f1_jump_threshold,
            batch_size=config.llm_batch_size,
        )
    aggregated = _aggregate_results_df(raw)
    good = set(k_sparse[k_sparse["f1_probe"] > config.min_GT_probe_f1]["letter"])
    rows = [row for _, row in aggregated.iterrows() if row["letter"] in good]
    details = [
        out.AbsorptionResultDetail(
            first_letter=row["letter"],
            mean_absorption_fraction=row["mean_absorption_fraction"],
            full_absorption_rate=row["full_absorption_rate"],
            num_full_absorption=row["num_full_absorption"],
            num_probe_true_positives=row["num_probe_true_positives"],
            num_split_features=row["num_split_feats"],
        )
        for row in rows
    ]
    fractions = [row["mean_absorption_fraction"] for row in rows]
    full = [row["full_absorption_rate"] for row in rows]
    splits = [row["num_split_feats"] for row in rows]
    eval_output = out.AbsorptionEvalOutput(
        eval_type_id=out.EVAL_TYPE_ID_ABSORPTION,
        eval_config=config,
        eval_id=get_eval_uuid(),
        datetime_epoch_millis=int(datetime.now().timestamp() * 1000),
        eval_result_metrics=out.AbsorptionMetricCategories(
            mean=out.AbsorptionMeanMetrics(
                mean_absorption_fraction_score=statistics.mean(fractions),
                mean_full_absorption_score=statistics.mean(full),
                mean_num_split_features=statistics.mean(splits),
                std_dev_absorption_fraction_score=statistics.stdev(fractions),
                std_dev_full_absorption_score=statistics.stdev(full),
                std_dev_num_split_features=statistics.stdev(splits),
            )
        ),
        eval_result_details=details,
        **_provenance(sae, sae_name),
    )
    output = _output_of(eval_output, workdir)
    validate_output(out.AbsorptionEvalOutput, output)
    metrics = _scalar_metrics("absorption", output)
    metrics["absorption.n_letters_evaluated"] = float(len(rows))

    def uncertainty() -> dict:
        import pandas as pd
        from sae_bench.evals.absorption.k_sparse_probing import get_sparse_probing_raw_results_filename

        found = absorption_uncertainty(raw, rows)
        name = common["sae_name"]  # SAEBench's per-test-word scores of the k-sparse probes, where it wrote them
        try:  # on its own: a failure here must not take the means' errors with it
            scores = pd.read_parquet(folders["k_sparse_probing"] / name / get_sparse_probing_raw_results_filename(name, common["layer"]))
            splits = split_features_uncertainty(scores, {row["letter"]: int(row["num_split_feats"]) for row in rows},
                                                config.max_k_value, config.f1_jump_threshold)  # fmt: skip
        except Exception as error:  # noqa: BLE001 - ours, beside SAEBench's numbers: said, never raised
            warnings.warn(f"absorption: no standard error for the split latents ({type(error).__name__}: {error})", stacklevel=2)
            splits = {"se": {}, "failed": f"{type(error).__name__}: {str(error)[:300]}"}
        found["se"].update(splits.pop("se"))
        found["split_features"] = splits
        return found

    uncertainty, tags = standard_errors("absorption", "word_se", metrics, uncertainty)
    return SuiteResult("absorption", output, metrics, time.perf_counter() - started, tags, uncertainty=uncertainty)


ABSORPTION_PER_WORD = {"mean_absorption_fraction_score": "absorption_fraction", "mean_full_absorption_score": "is_full_absorption"}
"""SAEBench's absorption means over letters, each of a per-letter mean over the words its probe detects, and the
per-word column of its raw results that mean is over."""


def absorption_uncertainty(raw, letters: list) -> dict:
    """Standard errors of absorption's two means over the words tested: SAEBench's per-letter score is the mean over
    the letter's probe true positives of a per-word value (its raw results, one row per word: ``absorption_fraction``
    in [0, 1], ``is_full_absorption`` 0 or 1), so its standard error is that of a mean, sqrt(mean squared deviation
    / n) (what a bootstrap over those words gives, in closed form); the score is the mean over the letters
    evaluated, so its error is sqrt(sum of the letters' variances) / letters. Not covered: the probes' training
    and the choice of each letter's main latents (feature splitting), which every word of a letter shares; nor the
    spreads over letters, which are not means over words (the number of split latents: `split_features_uncertainty`,
    over other words). ``letters``: SAEBench's
    aggregated rows of the letters that passed its probe gate; a letter whose words do not reproduce SAEBench's
    per-letter value leaves the metrics without an error. Returns ``{"unit", "n_words", "se", "per_letter_se"}``."""
    per_letter: dict[str, dict[str, float]] = {}
    n_words: dict[str, int] = {}
    consistent = True
    for row in letters:
        letter, n = row["letter"], int(round(float(row["num_probe_true_positives"])))
        words = raw[raw["letter"] == letter]
        n_words[letter] = n
        if n < 1 or len(words) > n:
            consistent = False
            continue
        for metric, column in ABSORPTION_PER_WORD.items():
            # SAEBench divides the sum over the rows by its count of true positives: a missing row counts as 0
            values = [float(v) for v in words[column]] + [0.0] * (n - len(words))
            mean = sum(values) / n
            aggregated = float(row["mean_absorption_fraction" if column == "absorption_fraction" else "full_absorption_rate"])
            if not math.isclose(mean, aggregated, rel_tol=1e-9, abs_tol=1e-12):
                consistent = False
            per_letter.setdefault(letter, {})[metric] = math.sqrt(sum((v - mean) ** 2 for v in values) / n / n)
    se = {}
    if consistent and per_letter:
        for metric in ABSORPTION_PER_WORD:
            se[metric] = math.sqrt(sum(errors[metric] ** 2 for errors in per_letter.values())) / len(per_letter)
    return {"unit": "word (a probe true positive)", "n_words": n_words, "se": se, "per_letter_se": per_letter}


SPLIT_REPLICATES = 1000
SPLIT_SEED = 0


def split_feature_counts(scores, letters: list[str], max_k: int, threshold: float, weights: torch.Tensor) -> torch.Tensor:
    """``[rows of weights, letters]``: SAEBench's count of split latents per letter (`add_feature_splits_to_metrics_df`:
    the k of the last k-sparse probe whose F1 rose by more than ``threshold`` over the one before, counting from k = 1)
    with the k-sparse probes' test words weighted by ``weights`` ``[replicates, words]`` (how often each word is
    drawn; ones: SAEBench's own sample). ``scores``: SAEBench's raw k-sparse probing results, one row per test word
    (``answer_letter``, ``score_sparse_sae_<letter>_k_<k>``), scored as its `build_metrics_df` scores them: a yes
    where the score is above 0, F1 0 where a letter has neither a yes nor a positive (sklearn's zero division)."""
    answers = scores["answer_letter"].to_numpy()
    counts = torch.zeros(weights.shape[0], len(letters), dtype=torch.long)
    for column, letter in enumerate(letters):
        positive = torch.tensor(answers == letter, dtype=torch.float64)  # [words]
        best = torch.full((weights.shape[0],), -100.0, dtype=torch.float64)  # SAEBench's starting prev_best
        rising = torch.ones(weights.shape[0], dtype=torch.bool)  # the replicates whose F1 has risen at every k so far
        for k in range(1, max_k + 1):
            said_yes = torch.tensor(scores[f"score_sparse_sae_{letter}_k_{k}"].to_numpy() > 0.0, dtype=torch.float64)
            true_pos = weights @ (positive * said_yes)
            wrong = weights @ ((1 - positive) * said_yes) + weights @ (positive * (1 - said_yes))  # false yes + false no
            f1 = torch.where(2 * true_pos + wrong > 0, 2 * true_pos / (2 * true_pos + wrong).clamp_min(1e-300), 0.0)
            rising &= f1 > best + threshold
            counts[rising, column] = k
            best = torch.where(rising, f1, best)
    return counts


def split_features_uncertainty(
    scores, expected: dict[str, int], max_k: int, threshold: float, replicates: int = SPLIT_REPLICATES, seed: int = SPLIT_SEED
) -> dict:
    """The standard error of absorption's ``mean_num_split_features`` over the k-sparse probes' test words: a bootstrap
    of those words (one draw shared by every letter, since they are one test set), SAEBench's split rule applied to
    each resample's F1 scores (`split_feature_counts`), averaged over the letters evaluated (``expected``: SAEBench's
    count per letter). Not covered: the k-sparse probes' training, on their own training words, which every resample
    shares; and which letters count (SAEBench's gate on its ground-truth probe's F1 over the same test words, held as
    in the full sample). Where the full sample does not reproduce SAEBench's counts, no error (``inconsistent``)."""
    letters = sorted(expected)
    n = len(scores)
    full = split_feature_counts(scores, letters, max_k, threshold, torch.ones(1, n, dtype=torch.float64))[0]
    ours = dict(zip(letters, full.tolist(), strict=True))
    mismatched = {letter: (count, expected[letter]) for letter, count in ours.items() if count != expected[letter]}
    out = {"unit": "k-sparse probe test word", "n_words": n, "replicates": replicates, "seed": seed}
    if mismatched or not letters:
        return {**out, "se": {}, "inconsistent": mismatched or "no letters"}
    picks = torch.randint(n, (replicates, n), generator=torch.Generator().manual_seed(seed))
    weights = torch.zeros(replicates, n, dtype=torch.float64).scatter_add_(1, picks, torch.ones(replicates, n, dtype=torch.float64))
    counts = split_feature_counts(scores, letters, max_k, threshold, weights).double()  # [replicates, letters]
    return {
        **out,
        "se": {"mean_num_split_features": float(counts.mean(1).std())},
        "per_letter_se": {letter: float(se) for letter, se in zip(letters, counts.std(0), strict=True)},
    }


def ground_truth_probe_f1(model: HookedTransformer, layer: int, config, probes_dir: Path, device: str) -> dict[str, float]:
    """F1 of SAEBench's ground-truth first-letter probe per letter on its test tokens: SAEBench's probe (trained
    into ``probes_dir``, which the k-sparse experiment then reuses) scored as its `build_metrics_df` scores
    ``f1_probe`` (a logit above 0 is a yes). Ours only because SAEBench computes it after the costly k-sparse probes."""
    from sae_bench.evals.absorption import common
    from sae_bench.evals.absorption.vocab import LETTERS
    from sklearn.metrics import f1_score

    # SAEBench's probe and its test activations in SAEBench's DEFAULT_DTYPE (bfloat16 wherever CUDA exists, float32
    # elsewhere), as its k-sparse experiment scores them (`eval_probe_and_sae_k_sparse_raw_scores`): one dtype for both
    kwargs = {"base_template": config.prompt_template, "pos_idx": config.prompt_token_pos, "layer": layer, "probes_dir": probes_dir,
              "dtype": common.DEFAULT_DTYPE, "device": device}  # fmt: skip
    probe = common.load_or_train_probe(model, **kwargs)
    activations, labels = common.load_probe_data_split_or_train(model, split="test", **kwargs)
    with torch.no_grad():
        scores = probe(activations).float().cpu()  # [tokens, 26]
    answers = torch.tensor([answer for _, answer in labels])
    return {
        letter: float(f1_score((answers == i).numpy(), (scores[:, i] > 0).numpy(), zero_division=0)) for i, letter in enumerate(LETTERS)
    }


def saebench_config(suite: str, ev, model_name: str, dtype: str, model: HookedTransformer, tiny: bool):
    """SAEBench's own config object for ``suite`` from the experiment's ``evaluation`` section (``ev``)."""
    from saecomp.saebench_data import default_datasets

    if suite == "sparse_probing":
        from sae_bench.evals.sparse_probing.eval_config import SparseProbingEvalConfig

        return SparseProbingEvalConfig(
            model_name=model_name,
            dataset_names=ev.sparse_probing_datasets or default_datasets("sparse_probing_datasets", tiny),
            probe_train_set_size=ev.sparse_probing_train_size,
            probe_test_set_size=ev.sparse_probing_test_size,
            context_length=ev.probe_context_length,
            llm_batch_size=ev.llm_batch_size,
            llm_dtype=dtype,
            k_values=list(ev.sparse_probing_k),
            random_seed=ev.seed,
        )
    if suite in ("scr", "tpp"):
        from sae_bench.evals.scr_and_tpp.eval_config import ScrAndTppEvalConfig

        return ScrAndTppEvalConfig(
            model_name=model_name,
            perform_scr=suite == "scr",
            dataset_names=ev.scr_tpp_datasets or default_datasets("scr_tpp_datasets", tiny),
            train_set_size=ev.scr_tpp_train_size,
            test_set_size=ev.scr_tpp_test_size,
            context_length=ev.probe_context_length,
            llm_batch_size=ev.llm_batch_size,
            llm_dtype=dtype,
            n_values=list(ev.scr_tpp_n_values),
            random_seed=ev.seed,
        )
    if suite == "absorption":
        from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig

        template = AbsorptionEvalConfig().prompt_template
        return AbsorptionEvalConfig(
            model_name=model_name,
            prompt_token_pos=absorption_token_position(model, template),
            llm_batch_size=ev.llm_batch_size,
            llm_dtype=dtype,
            max_k_value=ev.absorption_max_k,
            min_feats_for_eval=ev.absorption_min_letters,
            random_seed=ev.seed,
        )
    raise ValueError(f"suite={suite!r} has no SAEBench config here; valid: sparse_probing, scr, tpp, absorption")


def run_suite(
    suite: str, model: HookedTransformer, sae: SAE, config, workdir: Path, sae_name: str, shared: Path | None = None
) -> SuiteResult:
    """One of the probing suites (not core, which reads token windows) with its SAEBench ``config``; SCR, TPP and
    sparse probing share their model-side work with other SAEs through ``shared`` (``model_side_folder``; absorption
    ignores it)."""
    import random

    import numpy as np
    from sae_bench.sae_bench_utils.general_utils import str_to_dtype

    runners = {"sparse_probing": run_sparse_probing, "scr": run_scr_or_tpp, "tpp": run_scr_or_tpp, "absorption": run_absorption}
    (workdir := Path(workdir)).mkdir(parents=True, exist_ok=True)
    # SAEBench's absorption draws from the unseeded global generators: seed them all from the config's seed, so a
    # suite's result does not depend on which suites ran before it in this process.
    random.seed(config.random_seed)
    np.random.seed(config.random_seed)
    torch.manual_seed(config.random_seed)
    # SAEBench's run_eval casts the SAE to the model's dtype (its probes and ablations assume one dtype).
    sae = _copy(sae).to(dtype=str_to_dtype(config.llm_dtype))
    with flat_hook_z(model, sae) as hooked_sae:
        if suite in ZERO_PADDED_SUITES and (reason := not_finite_at_zero_input(hooked_sae)):
            raise NotApplicable(f"SAEBench's {suite} {reason}")
        extra = {"shared": shared} if suite in SHARED_MODEL_SIDE else {}
        result = runners[suite](model, hooked_sae, config, workdir, sae_name, **extra)
    result.output["sae_cfg_dict"] = sae.cfg.to_dict()  # the SAE as the user has it, not the flat view's copy
    return result


ZERO_PADDED_SUITES = ("sparse_probing", "scr", "tpp")
"""The suites whose SAEBench code zeroes the activations at padded positions, encodes them with the SAE and then
masks the latents by multiplying with 0 (`get_sae_meaned_activations`, the node effects; SCR's and TPP's ablation does
not mask at all)."""


@torch.no_grad()
def not_finite_at_zero_input(sae: SAE) -> str | None:
    """Why an SAE cannot go through SAEBench's padded suites (`ZERO_PADDED_SUITES`), or None when it can: its latents
    or reconstruction of a zero input are not finite. SAELens's `constant_norm_rescale` divides by the input's norm, so
    every padded position encodes to NaN, and NaN × 0 is NaN: every mean SAEBench takes over such a text is NaN, and
    its probes then score NaN inputs as if they were numbers."""
    zero = torch.zeros(1, 1, sae.cfg.d_in, dtype=sae.dtype, device=sae.device)
    latents = sae.encode(zero)
    reconstruction = sae.decode(latents)
    if bool(torch.isfinite(latents).all()) and bool(torch.isfinite(reconstruction).all()):
        return None
    return (
        "zeroes the activations at padded positions and encodes them with the SAE, whose latents or reconstruction of "
        f"a zero input are not finite (its input normalisation is {sae.cfg.normalize_activations!r}); SAEBench masks "
        "them by multiplying with 0, which leaves NaN, so every number it would give for this SAE is read from NaN"
    )


RAVEL_ARCHITECTURES = ("Gemma2ForCausalLM", "GPTNeoXForCausalLM")
"""The Hugging Face layouts whose decoder layers SAEBench's RAVEL can hook (`activation_collection.get_module`)."""


def ravel_not_applicable(hook_name: str, architecture: str) -> str | None:
    """Why SAEBench's RAVEL cannot measure this SAE on this model, or None when it can."""
    if architecture not in RAVEL_ARCHITECTURES:
        return f"SAEBench's RAVEL intervenes only on {' and '.join(RAVEL_ARCHITECTURES)} decoder layers; this model is {architecture}"
    if not hook_name.endswith("hook_resid_post"):
        # It replaces decoder layer L's output, the residual stream after block L: only a hook_resid_post SAE reads that.
        hook_name = hook_name.removesuffix(FLAT_Z_SUFFIX)
        return f"SAEBench's RAVEL patches the residual stream after a block (hook_resid_post); this SAE reads {hook_name}"
    return None


RAVEL_PROMPTS_REPO = "adamkarvonen/ravel_prompts"
"""The Hub dataset SAEBench's RAVEL downloads its prompts and facts from (`ravel.instance.RAVELInstance.load_files`)."""


def fetch_ravel_prompts(artifact_dir: Path, revision: str = "main") -> str:
    """RAVEL's data at ``revision`` (branch, tag or commit) of `RAVEL_PROMPTS_REPO`, written where SAEBench's RAVEL reads
    it (``<artifact_dir>/base``), so that its own download (always the newest commit) never runs. Returns the commit
    the revision resolved to, which names exactly the data the numbers come from."""
    from huggingface_hub import snapshot_download

    # Through the Hugging Face cache, whose snapshot folder is named by the commit: offline (HF_HUB_OFFLINE=1) the same
    # call resolves the revision from the cache.
    snapshot = Path(snapshot_download(repo_id=RAVEL_PROMPTS_REPO, repo_type="dataset", revision=revision, allow_patterns="*.json"))
    base = Path(artifact_dir) / "base"
    base.mkdir(parents=True, exist_ok=True)
    for file in snapshot.glob("*.json"):
        shutil.copyfile(file, base / file.name)
    return snapshot.name


def ravel_config(ev, tokenizer_source: str, dtype: str, artifact_dir: Path, tiny: bool):
    """SAEBench's RAVEL config: ``model_name`` is what its code passes to `AutoTokenizer.from_pretrained` (the
    checkpoint folder or Hub name), ``artifact_dir`` a fresh folder (its dataset caches live there)."""
    from sae_bench.evals.ravel.eval_config import RAVELEvalConfig

    from saecomp.saebench_data import TINY_RAVEL_SELECTION

    selection = ev.ravel_entity_attribute_selection or (TINY_RAVEL_SELECTION if tiny else None)
    kwargs = {"entity_attribute_selection": selection} if selection else {}  # none: SAEBench's default
    return RAVELEvalConfig(
        model_name=str(tokenizer_source),
        llm_dtype=dtype,
        llm_batch_size=ev.ravel_llm_batch_size,
        top_n_entities=ev.ravel_top_n_entities,
        num_pairs_per_attribute=ev.ravel_pairs_per_attribute,
        artifact_dir=str(artifact_dir),
        random_seed=ev.seed,
        **kwargs,
    )


class _TupleOutputLayer:
    """A decoder layer seen as SAEBench 0.6's RAVEL hooks expect it. Their hooks read ``outputs[0]`` and return a
    tuple, as transformers 4 layers returned; transformers 5's return the hidden states tensor itself (on which
    ``outputs[0]`` is the first sequence, and a returned tuple breaks the next layer)."""

    def __init__(self, layer: torch.nn.Module):
        self.layer = layer

    def register_forward_hook(self, hook):
        def as_tuple(module, inputs, output):
            if isinstance(output, tuple):
                return hook(module, inputs, output)
            result = hook(module, inputs, (output,))
            return None if result is None else result[0]

        return self.layer.register_forward_hook(as_tuple)


@contextmanager
def decoder_layers_as_tuples() -> Iterator[None]:
    """The one adapter RAVEL needs on transformers 5: SAEBench's `get_module` (which its RAVEL code looks up at each
    call) hands out :class:`_TupleOutputLayer` views for the duration."""
    from sae_bench.sae_bench_utils import activation_collection

    original = activation_collection.get_module
    activation_collection.get_module = lambda model, layer_num: _TupleOutputLayer(original(model, layer_num))
    try:
        yield
    finally:
        activation_collection.get_module = original


def run_ravel(hf_model, sae: SAE, config, workdir: Path, sae_name: str, model_label: str) -> SuiteResult:
    """SAEBench's RAVEL (`ravel.main.run_eval_single_sae`) on a Hugging Face model, packed into `RAVELEvalOutput` as
    its `run_eval` does. RAVEL first keeps the prompts this model completes correctly (its own generations), so the
    extra numbers say how much it knows: ``ravel.fact_accuracy`` over all prompts and ``ravel.n_entities_kept``.
    `NotApplicable` off the residual stream or on a layout SAEBench's RAVEL cannot hook."""
    import random
    from datetime import datetime

    import numpy as np
    from sae_bench.evals.ravel import eval_output as out
    from sae_bench.evals.ravel.main import run_eval_single_sae
    from sae_bench.sae_bench_utils import get_eval_uuid
    from sae_bench.sae_bench_utils.general_utils import str_to_dtype

    started = time.perf_counter()
    reason = ravel_not_applicable(sae.cfg.metadata.hook_name, hf_model.config.architectures[0])
    if reason:
        raise NotApplicable(reason)
    if getattr(hf_model.config, "saecomp_processing", None) and any(hf_model.config.saecomp_processing.values()):
        raise NotApplicable("this checkpoint's weights were saved processed by TransformerLens, which Hugging Face cannot run as they are")
    random.seed(config.random_seed)
    np.random.seed(config.random_seed)
    torch.manual_seed(config.random_seed)
    dtype = str_to_dtype(config.llm_dtype)
    sae = prepared_for_saebench(sae, model_label).to(dtype=dtype)
    sae.requires_grad_(False)  # RAVEL trains only its mask; gradients for the SAE and model weights are waste
    requires_grad = {name: p.requires_grad for name, p in hf_model.named_parameters()}
    training = hf_model.training  # RAVEL's mask module holds the model, and its .train() reaches it
    hf_model.requires_grad_(False)
    grad_enabled = torch.is_grad_enabled()  # SAEBench's RAVEL switches gradients on globally
    (workdir := Path(workdir)).mkdir(parents=True, exist_ok=True)
    try:
        kept = ravel_known_prompts(hf_model, config)
        check_ravel_facts(kept, config)
        ceiling, ceiling_pairs = residual_patch_cause(hf_model, kept, config, sae.cfg.hook_layer)
        with decoder_layers_as_tuples(), ravel_pair_counts() as pair_counts:
            results, per_class = run_eval_single_sae(config, sae, hf_model, str(next(hf_model.parameters()).device), str(workdir))
    finally:
        torch.set_grad_enabled(grad_enabled)
        hf_model.train(training)
        for name, p in hf_model.named_parameters():
            p.requires_grad_(requires_grad[name])
    saved_config = _copy_config(config, model_name=model_label)
    eval_output = out.RAVELEvalOutput(
        eval_config=saved_config,
        eval_id=get_eval_uuid(),
        datetime_epoch_millis=int(datetime.now().timestamp() * 1000),
        eval_result_metrics=out.RAVELMetricCategories(
            ravel=out.RAVELMetricResults(
                disentanglement_score=results["disentangle_score"],
                cause_score=results["cause_score"],
                isolation_score=results["isolation_score"],
            )
        ),
        eval_result_details=[],
        eval_result_unstructured=per_class,
        **_provenance(sae, sae_name),
    )
    output = _output_of(eval_output, workdir)
    validate_output(out.RAVELEvalOutput, output)
    metrics = _scalar_metrics("ravel", output)
    metrics.update(ravel_per_attribute(per_class, config))
    metrics.update(ravel_fact_counts(config))
    metrics["ravel.residual_patch_cause"] = ceiling
    uncertainty, tags = standard_errors("ravel", "binomial_se", metrics, lambda: ravel_standard_errors(pair_counts, per_class, config))
    if uncertainty is not None and "untraced" in uncertainty:
        tags["saecomp.ravel.se_untraced"] = uncertainty["untraced"]
    # ours, shares too: the model's known facts over all prompts, the whole-residual swap's hits over its pairs
    for name, n in (("fact_accuracy", metrics["ravel.n_prompts"]), ("residual_patch_cause", ceiling_pairs)):
        if n > 0 and 0.0 <= metrics[f"ravel.{name}"] <= 1.0:
            metrics[f"ravel.{name}.binomial_se"] = math.sqrt(metrics[f"ravel.{name}"] * (1.0 - metrics[f"ravel.{name}"]) / n)
    if uncertainty is not None:
        uncertainty.update(n_prompts=metrics["ravel.n_prompts"], residual_patch_pairs=ceiling_pairs)
    return SuiteResult("ravel", output, metrics, time.perf_counter() - started, tags, uncertainty=uncertainty)


@contextmanager
def ravel_pair_counts() -> Iterator[list[dict]]:
    """Per intervention run of SAEBench's RAVEL (one per entity class and cause attribute, in its order): how many
    validation pairs its cause and its isolation scores are means over, with the two scores, and each pair traced
    (``pairs``: (cause or not, base entity, source entity, the intervention's outcome), or None where it could not be).
    SAEBench returns only the means; its `intervention.generate_batched_interventions` counts a pair towards isolation
    where the base's and the source's first predicted tokens agree and towards cause otherwise, which is counted here
    the same way from the validation batches it receives (a list: reading it draws nothing). Which entity each prompt
    is comes from the prompts `main.create_dataloaders` is given (their token ids, which the batches hold left-padded),
    and each pair's outcome from SAEBench's own `evaluate_completion`, in the order it scores the batches."""
    from sae_bench.evals.ravel import intervention
    from sae_bench.evals.ravel import main as ravel_main

    generate, create, judge = intervention.generate_batched_interventions, ravel_main.create_dataloaders, intervention.evaluate_completion
    calls: list[dict] = []
    entity_of: dict[tuple, str] = {}  # a prompt's token ids -> its entity
    outcomes: list[bool] = []

    def remembered(*args, **kwargs):  # (cause base, cause source, iso base, iso source prompts, ...)
        try:
            for prompts in args[:4]:
                entity_of.update({tuple(prompt.input_ids): prompt.entity_label for prompt in prompts})
        except Exception:  # untraced: the scores fall back to the binomial errors
            entity_of.clear()
        return create(*args, **kwargs)

    def judged(*args, **kwargs):
        outcome = judge(*args, **kwargs)
        outcomes.append(bool(outcome))
        return outcome

    def ids(encoding, row: int) -> tuple:
        return tuple(encoding["input_ids"][row][encoding["attention_mask"][row].bool()].tolist())

    def counted(model, mdbm, tokenizer, val_loader, *args, **kwargs):
        n_isolation = n_cause = 0
        pairs: list | None = []
        try:  # never raises into SAEBench's run: uncounted, the scores get no standard error (0 pairs)
            for batch in val_loader:  # (base, source encodings, positions, base_pred_B, source_pred_B, texts, labels)
                for row, (base_pred, source_pred) in enumerate(zip(batch[4], batch[5], strict=True)):
                    cause = bool(base_pred != source_pred)
                    n_cause, n_isolation = n_cause + cause, n_isolation + (not cause)
                    if pairs is not None:
                        try:  # untraced, the counts still give the binomial errors
                            base, source = entity_of.get(ids(batch[0], row)), entity_of.get(ids(batch[1], row))
                        except Exception:
                            base = source = None
                        pairs = None if base is None or source is None else [*pairs, (cause, base, source)]
        except Exception:
            n_isolation = n_cause = 0
            pairs = None
        outcomes.clear()
        intervention.evaluate_completion = judged
        try:
            isolation, cause = generate(model, mdbm, tokenizer, val_loader, *args, **kwargs)
        finally:
            intervention.evaluate_completion = judge
        if pairs is not None and len(outcomes) == len(pairs):
            pairs = [(*pair, outcome) for pair, outcome in zip(pairs, outcomes, strict=True)]
        else:
            pairs = None
        calls.append({"n_isolation": n_isolation, "n_cause": n_cause, "isolation_score": isolation, "cause_score": cause, "pairs": pairs})
        return isolation, cause

    with _WRAPPING:
        intervention.generate_batched_interventions = counted
        ravel_main.create_dataloaders = remembered
        try:
            yield calls
        finally:
            intervention.generate_batched_interventions = generate
            ravel_main.create_dataloaders = create
            intervention.evaluate_completion = judge


def ravel_standard_errors(calls: list[dict], per_class: dict, config) -> dict:
    """RAVEL's standard errors, over its entities where every validation pair was traced (``ravel_pair_counts``), else
    the binomial errors over the pairs (``ravel_uncertainty``), with why.

    A pair is two entities (a base and a source city) and an entity is in many pairs (as base and as source, for every
    cause attribute of its class): an entity the model or RAVEL's mask handles badly fails many pairs together, so the
    pairs are not independent and the binomial error over them is too small. The error here is the dyadic-robust one
    (Fafchamps and Gubert; Aronow, Samii and Assenova: a two-way cluster-robust variance with one set of entities in
    both roles) of SAEBench's scores linearised in the pairs' outcomes. With a_p a pair's share of a score's deviation
    (its outcome minus the score, over the pairs the score is a mean of, times the weight SAEBench's averaging gives
    that score), V = sum over entities e of (sum of a_p over the pairs holding e)^2 - sum over entity pairs d (two
    distinct entities, in either order) of (sum of a_p over the pairs of d)^2: every two pairs that share an entity
    covary, counted once. Where no two pairs share an entity it is exactly the binomial variance; it is floored at the
    sum over entity pairs alone (pairs of the same two entities), which a two-way estimate can fall below in small
    samples. No small-sample factor G/(G - 1) (G entities): SAEBench keeps up to 500 per class. There are no
    replicates, so compare's differences of two SAEs' RAVEL scores are unpaired (conservative: both SAEs are scored on
    the same pairs). Not covered: the training of RAVEL's mask (on the training pairs, which share entities with the
    validation pairs)."""
    binomial = ravel_uncertainty(calls, per_class, config)
    order = [(entity, attribute) for entity, attributes in config.entity_attribute_selection.items() for attribute in attributes]
    why = None
    if len(calls) != len(order):
        why = f"{len(calls)} intervention runs for {len(order)} attributes"
    elif any(call.get("pairs") is None for call in calls):
        why = "a validation pair's entities or outcome could not be traced"
    else:
        for (entity, attribute), call in zip(order, calls, strict=True):
            scored = per_class.get(f"{entity}_results", {}).get(f"{entity}_{attribute}", {})
            for score, kind in (("cause_score", True), ("isolation_score", False)):
                outcomes = [outcome for cause, _, _, outcome in call["pairs"] if cause == kind]
                if not outcomes or sum(outcomes) / len(outcomes) != call[score] or scored.get(score) != call[score]:
                    why = why or f"{entity}.{attribute}: traced outcomes do not give SAEBench's {score}"
    if why is not None:
        return {**binomial, "se_kind": "binomial_se", "untraced": why}

    # per score: its linearisation, pair index -> a_p (pairs numbered over all calls)
    pairs = [(entity, base, source) for (entity, _), call in zip(order, calls, strict=True) for _, base, source, _ in call["pairs"]]
    shares: dict[str, dict[int, float]] = {}
    first = 0
    classes = config.entity_attribute_selection
    for (entity, attribute), call in zip(order, calls, strict=True):
        for score, kind in (("cause_score", True), ("isolation_score", False)):
            chosen = [(first + i, outcome) for i, (cause, _, _, outcome) in enumerate(call["pairs"]) if cause == kind]
            own = {p: (float(outcome) - call[score]) / len(chosen) for p, outcome in chosen}
            for name, weight in ((f"{entity}.{attribute}.{RAVEL_SCORES[score]}", 1.0),
                                 (f"{entity}.{attribute}.disentanglement_score", 0.5),
                                 (RAVEL_SCORES[score], 1.0 / (len(classes) * len(classes[entity]))),
                                 ("disentanglement_score", 0.5 / (len(classes) * len(classes[entity])))):  # fmt: skip
                into = shares.setdefault(name, {})
                for p, a in own.items():
                    into[p] = into.get(p, 0.0) + weight * a
        first += len(call["pairs"])
    se, floored = {}, []
    for name, by_pair in shares.items():
        per_entity: dict[tuple, float] = {}  # (class, entity) -> sum of a_p over the pairs holding it
        per_dyad: dict[tuple, float] = {}  # (class, the pair's entities) -> sum of a_p over the pairs of those entities
        for p, a in by_pair.items():
            entity, base, source = pairs[p]
            for member in {base, source}:
                per_entity[(entity, member)] = per_entity.get((entity, member), 0.0) + a
            dyad = (entity, *sorted({base, source}))
            per_dyad[dyad] = per_dyad.get(dyad, 0.0) + a
        within_dyads = sum(v * v for v in per_dyad.values())
        twice = sum(v * v for dyad, v in per_dyad.items() if len(dyad) == 3)  # two entities: in both their sums
        two_way = sum(v * v for v in per_entity.values()) - twice
        if two_way < within_dyads:
            floored.append(name)
        se[name] = math.sqrt(max(two_way, within_dyads))
    entities = {entity: len({m for e, b, s in pairs if e == entity for m in (b, s)}) for entity in classes}
    return {
        "unit": "entity (dyadic-robust: pairs sharing an entity, as base or as source, covary)",
        "method": (
            "dyadic-robust variance over the entities (every two pairs sharing an entity covary) of SAEBench's scores linearised "
            "in the validation pairs' outcomes, floored at the variance within pairs of the same two entities; binomial where "
            "no entity is shared"
        ),
        "se_kind": "cluster_se",
        "entities": entities,
        "pairs": binomial.get("pairs", {}),
        "se": dict(sorted(se.items())),
        "floored": sorted(floored),
        "binomial_se": binomial.get("se", {}),
    }


def ravel_uncertainty(calls: list[dict], per_class: dict, config) -> dict:
    """Binomial standard errors of RAVEL's scores over the validation pairs they are means over
    (``ravel_pair_counts``): each pair's intervention succeeds or not, so a cause score c over n pairs has
    sqrt(c (1 - c) / n), and likewise isolation; the disentanglement score is their mean, over disjoint pairs, so
    sqrt(se_cause^2 + se_isolation^2) / 2. SAEBench averages over cause attributes per entity class and then over
    entity classes, and the errors combine the same way. What it covers: which pairs were drawn for validation. Not
    covered: the training of RAVEL's mask on the training pairs, which every validation pair shares. ``calls`` map
    to SAEBench's per-attribute results in its order (entity classes, then cause attributes); a score a call does not
    reproduce, or one over no pairs, leaves its metric and those averaging it without an error. Returns ``{"unit",
    "pairs", "se"}``, ``se`` keyed by our metric names (``ravel.<class>.<attribute>.<score>`` and the headline
    scores, without ``ravel.``)."""
    order = [(entity, attribute) for entity, attributes in config.entity_attribute_selection.items() for attribute in attributes]
    pairs, se, variances = {}, {}, {}  # variances: (entity, score) -> per attribute
    if len(calls) != len(order):
        unmatched = f"{len(calls)} intervention runs for {len(order)} attributes"
        return {"unit": "validation pair", "pairs": {}, "se": {}, "unmatched": unmatched}
    for (entity, attribute), call in zip(order, calls, strict=True):
        scored = per_class.get(f"{entity}_results", {}).get(f"{entity}_{attribute}", {})
        pairs[f"{entity}.{attribute}"] = {"cause": call["n_cause"], "isolation": call["n_isolation"]}
        errors = {}
        for score, n in (("cause_score", call["n_cause"]), ("isolation_score", call["n_isolation"])):
            value = call[score]
            if n > 0 and scored.get(score) == value and 0.0 <= value <= 1.0:
                errors[score] = value * (1.0 - value) / n
        if len(errors) == 2:
            errors["disentangle_score"] = (errors["cause_score"] + errors["isolation_score"]) / 4
        for theirs, ours in RAVEL_SCORES.items():
            variances.setdefault((entity, ours), []).append(errors.get(theirs))
            if theirs in errors:
                se[f"{entity}.{attribute}.{ours}"] = math.sqrt(errors[theirs])
    for ours in RAVEL_SCORES.values():
        per_entity = [variances[(entity, ours)] for entity in config.entity_attribute_selection]
        if all(v is not None for attributes in per_entity for v in attributes):
            entity_variances = [sum(attributes) / len(attributes) ** 2 for attributes in per_entity]
            se[ours] = math.sqrt(sum(entity_variances)) / len(entity_variances)
    return {"unit": "validation pair", "pairs": pairs, "se": se}


RAVEL_SCORES = {"cause_score": "cause_score", "isolation_score": "isolation_score", "disentangle_score": "disentanglement_score"}
"""SAEBench's per-attribute score names -> the names its headline metrics use."""


def ravel_per_attribute(per_class: dict, config) -> dict[str, float]:
    """``ravel.<entity class>.<attribute>.<score>`` for every entity class and cause attribute SAEBench scored (its
    ``eval_result_unstructured``, ``<class>_results`` -> ``<class>_<attribute>``): the appendix's per entity-attribute
    rows, of which the headline scores are the means."""
    metrics = {}
    for entity, attributes in config.entity_attribute_selection.items():
        scored = per_class.get(f"{entity}_results", {})
        for attribute in attributes:
            for theirs, ours in RAVEL_SCORES.items():
                value = scored.get(f"{entity}_{attribute}", {}).get(theirs)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics[f"ravel.{entity}.{attribute}.{ours}"] = float(value)
    return metrics


@torch.no_grad()
def residual_patch_cause(hf_model, kept: dict[str, list], config, layer: int, pairs_per_attribute: int = 64) -> tuple[float, int]:
    """(share, pairs): RAVEL's ceiling at ``layer``, ours (SAEBench has none): the share of cause pairs (one attribute, two entities
    with different values and different first answer tokens) in which swapping the *whole* residual stream after
    block ``layer`` at the base prompt's entity token for the source prompt's makes the model answer with the
    source's first token (argmax, not RAVEL's graded 6-token generation, so an approximate ceiling). Where the model has
    already moved what it knows of the entity to the last token, this is near 0, and so is any SAE's cause score."""
    import random

    from sae_bench.sae_bench_utils import activation_collection  # its get_module is looked up inside the adapter

    rng = random.Random(config.random_seed)
    device = next(hf_model.parameters()).device
    hits = total = 0
    with decoder_layers_as_tuples():  # SAEBench's hooks, as RAVEL's own
        for entity, attributes in config.entity_attribute_selection.items():
            for attribute in attributes:
                prompts = [p for p in kept[entity] if p.attribute_type == attribute]
                for _ in range(pairs_per_attribute):
                    base = rng.choice(prompts)
                    sources = [p for p in prompts if p.first_generated_token_id != base.first_generated_token_id]
                    if not sources:
                        continue
                    source = rng.choice(sources)
                    source_ids = torch.tensor([source.input_ids], device=device)
                    position = torch.tensor([source.final_entity_token_pos])
                    source_act = activation_collection.get_layer_activations(hf_model, layer, {"input_ids": source_ids}, position)

                    def swap(module, inputs, outputs, position=base.final_entity_token_pos, act=source_act[0]):
                        outputs[0][0, position] = act
                        return outputs

                    handle = activation_collection.get_module(hf_model, layer).register_forward_hook(swap)
                    try:
                        logits = hf_model(input_ids=torch.tensor([base.input_ids], device=device)).logits[0, -1]  # [vocab]
                    finally:
                        handle.remove()
                    hits += int(logits.argmax()) == source.first_generated_token_id
                    total += 1
    return (hits / total if total else float("nan")), total


def ravel_known_prompts(hf_model, config) -> dict[str, list]:
    """Per entity class, the prompts RAVEL keeps: those this model completes correctly, from its top entities. The
    first half of SAEBench's `run_eval_single_dataset`, with its own classes, written where the second half loads it;
    done here so that a model that knows too few facts is told apart before RAVEL trains on nothing."""
    from sae_bench.evals.ravel.instance import RAVELInstance, get_instance_name
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model_name)
    kept = {}
    for entity, attributes in config.entity_attribute_selection.items():
        batch_size = config.llm_batch_size
        config.llm_batch_size = batch_size * 8  # as SAEBench does: generating needs less memory than training
        try:
            instance = RAVELInstance.create_from_files(
                config=config,
                entity_type=entity,
                tokenizer=tokenizer,
                data_dir=config.artifact_dir,
                model=hf_model,
                model_name=config.model_name,
                attribute_types=attributes,
                downsample=config.full_dataset_downsample,
            )
        finally:
            config.llm_batch_size = batch_size
        dataset = instance.create_and_save_filtered_dataset(artifact_dir=config.artifact_dir, top_n_entities=config.top_n_entities)
        name = get_instance_name(entity, config.model_name, config.full_dataset_downsample, config.top_n_entities)
        assert (Path(config.artifact_dir) / name).exists(), name  # where run_eval_single_dataset will load it from
        kept[entity] = dataset.prompts
    return kept


def check_ravel_facts(kept: dict[str, list], config) -> None:
    """`NotApplicable` unless every attribute has two values at least (its cause pairs need a source whose value
    differs) and enough known prompts for one batch of RAVEL's training and of its validation pairs, counted as
    `run_eval_single_cause_attribute` forms them."""
    for entity, attributes in config.entity_attribute_selection.items():
        known = {a: [p for p in kept[entity] if p.attribute_type == a] for a in attributes}
        for attribute in attributes:
            cause = min(len(known[attribute]), config.num_pairs_per_attribute)
            isolation = min(cause, sum(min(len(known[a]), config.num_pairs_per_attribute) for a in attributes if a != attribute))
            pairs = cause + isolation
            training = int(pairs * config.train_test_split)
            values = {p.attribute_label for p in known[attribute]}
            if len(values) < 2 or min(training, pairs - training) < config.llm_batch_size:
                raise NotApplicable(
                    f"the model completes too few {entity} facts for RAVEL: {len(known[attribute])} {attribute} prompts "
                    f"with {len(values)} values give {training} training and {pairs - training} validation pairs; RAVEL needs "
                    f"2 values and batches of evaluation.ravel_llm_batch_size={config.llm_batch_size} in both (a smaller "
                    "batch, or a model trained longer)"
                )


def _copy_config(config, **changes):
    """A copy of a SAEBench pydantic config with ``changes`` (the saved JSON names our model, not a temp folder)."""
    from dataclasses import asdict

    return type(config)(**{**asdict(config), **changes})


def ravel_fact_counts(config) -> dict[str, float]:
    """What the model knows, from the files SAEBench's RAVEL left in its ``artifact_dir``: the prompts (entity x
    template) it completed correctly over all prompts, and the entities kept for the interventions."""
    import json

    from sae_bench.evals.ravel.instance import get_instance_name

    artifact_dir = Path(config.artifact_dir)
    counts = {"ravel.n_prompts": 0.0, "ravel.n_prompts_correct": 0.0, "ravel.n_entities_kept": 0.0}
    for entity, attributes in config.entity_attribute_selection.items():
        base = artifact_dir / "base"
        entities = json.loads((base / f"ravel_{entity}_entity_attributes.json").read_text())
        templates = json.loads((base / f"ravel_{entity}_attribute_to_prompts.json").read_text())
        counts["ravel.n_prompts"] += len(entities) * sum(len(templates.get(a, [])) for a in attributes)
        name = get_instance_name(entity, config.model_name, config.full_dataset_downsample)
        correct = json.loads((artifact_dir / f"{name}_unfiltered_full_instance.json").read_text())["prompts"]
        counts["ravel.n_prompts_correct"] += len(correct)
        kept = get_instance_name(entity, config.model_name, config.full_dataset_downsample, config.top_n_entities)
        counts["ravel.n_entities_kept"] += len({p["entity_label"] for p in json.loads((artifact_dir / kept).read_text())["prompts"]})
    counts["ravel.fact_accuracy"] = counts["ravel.n_prompts_correct"] / max(counts["ravel.n_prompts"], 1.0)
    return counts


def _copy(sae: SAE) -> SAE:
    copy = SAE.from_dict(sae.cfg.to_dict())
    copy.load_state_dict(sae.state_dict())
    return copy.to(sae.device)


FLAT_Z_SUFFIX = "_flat"


@contextmanager
def flat_hook_z(model: HookedTransformer, sae: SAE) -> Iterator[SAE]:
    """An attention SAE (``blocks.L.attn.hook_z``) as SAEBench's probing suites can read it, else ``sae`` itself.

    SAEBench 0.6 collects and masks activations as [batch, pos, d] (``acts * mask[:, :, None]``); hook_z is
    [batch, pos, n_heads, d_head], and the suites fail on it. So, while inside, the model gets one more hook point,
    ``blocks.L.attn.hook_z_flat``, through which z passes flattened to [batch, pos, n_heads * d_head] (the SAE's
    d_in) and comes back reshaped, and the SAE copy yielded reads it there. The model computes exactly as before."""
    from transformer_lens.hook_points import HookPoint

    hook_name = sae.cfg.metadata.hook_name
    if not hook_name.endswith("attn.hook_z"):
        yield sae
        return
    attention = model.get_submodule(hook_name.rsplit(".", 1)[0])
    attention.hook_z_flat = HookPoint()
    model.setup()  # TransformerLens's own registry of hook points (hook_dict, mod_dict)

    def through_flat(z: torch.Tensor, hook) -> torch.Tensor:  # z: [batch, pos, n_heads, d_head]
        return attention.hook_z_flat(z.reshape(*z.shape[:-2], -1)).reshape(z.shape)

    hook_point = model.hook_dict[hook_name]
    hook_point.add_perma_hook(through_flat)
    ours = hook_point.fwd_hooks[-1]  # the handle just added
    cfg = sae.cfg.to_dict()
    cfg["reshape_activations"] = "none"  # it reads flat activations here
    cfg["metadata"] = {**cfg.get("metadata", {}), "hook_name": hook_name + FLAT_Z_SUFFIX}
    flat = SAE.from_dict(cfg)
    flat.load_state_dict(sae.state_dict())
    flat.to(sae.device)
    try:
        yield flat
    finally:
        ours.hook.remove()  # only our hook: any other on hook_z stays
        hook_point.fwd_hooks.remove(ours)
        del attention.hook_z_flat
        model.setup()
