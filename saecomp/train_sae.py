"""Training SAEs with SAELens's own runner, on a dense or pruned model, streaming metrics as it goes.

We do not write an SAE trainer: `LanguageModelSAETrainingRunner` builds the activation store, the SAE and
the evaluator, and `SAETrainer` trains. Two things SAELens lacks are added here: its training metrics go only
to wandb (no callback), so a small `SAETrainer` subclass hands them to a callback; and resuming needs the
checkpoint folder found and its three parts loaded, as `runner.run()` does when told where to resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import (
    SAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUTrainingSAEConfig,
    LanguageModelSAERunnerConfig,
    LoggingConfig,
    StandardTrainingSAEConfig,
    TopKTrainingSAEConfig,
)
from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner
from sae_lens.training.sae_trainer import SAETrainer
from transformer_lens import HookedTransformer

from saecomp.names import (  # noqa: F401  (re-exported: the spec and its checks are torch-free there)
    HOOKS,
    NORMALIZATIONS,
    SAE_ARCHITECTURES,
    SAETrainingSpec,
    check_spec,
    hook_d_in,
    resolved_d_sae,
)
from saecomp.saes import shadowed

ARCHITECTURES = {
    "standard": StandardTrainingSAEConfig,
    "topk": TopKTrainingSAEConfig,
    "batchtopk": BatchTopKTrainingSAEConfig,
    "jumprelu": JumpReLUTrainingSAEConfig,
}
def buffer_batches(spec: SAETrainingSpec) -> int:
    """SAELens crashes unless its buffer (n_batches_in_buffer * context_size tokens per prompt) holds at
    least one training batch (GUIDE §4); keep its default of 16 when that is enough."""
    return max(16, -(-2 * spec.batch_size_tokens // spec.context_size))


def runner_config(
    spec: SAETrainingSpec,
    model: HookedTransformer,
    model_name: str,
    model_kwargs: dict[str, bool],
    checkpoint_dir: str | Path,
    dataset_name: str,
    prepend_bos: bool = False,
    special_ids: list[int] | None = None,
) -> LanguageModelSAERunnerConfig:
    """SAELens's runner configuration for ``spec``. ``prepend_bos`` is recorded in the SAE's metadata (our
    windows carry BOS themselves); ``special_ids`` (BOS, EOS, padding) are left out of the training
    activations, as Gemma Scope left out BOS."""
    d_in = hook_d_in(model.cfg, spec.hook)
    sae_kwargs: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": resolved_d_sae(spec, d_in),
        "normalize_activations": spec.normalize_activations,
        "device": str(model.cfg.device),  # the experiment's device, where the model was loaded
    }
    if spec.hook == "attn.hook_z":
        sae_kwargs["reshape_activations"] = "hook_z"  # flatten [.., n_heads, d_head] -> n_heads * d_head
    if spec.architecture in ("topk", "batchtopk"):
        sae_kwargs["k"] = spec.k
    elif spec.architecture == "standard":
        sae_kwargs["l1_coefficient"] = spec.sparsity_coefficient
    else:
        sae_kwargs["l0_coefficient"] = spec.sparsity_coefficient
    device = sae_kwargs["device"]
    return LanguageModelSAERunnerConfig(
        sae=ARCHITECTURES[spec.architecture](**sae_kwargs),
        model_name=model_name,
        hook_name=f"blocks.{spec.layer}.{spec.hook}",
        dataset_path=dataset_name,
        is_dataset_tokenized=True,
        streaming=False,
        context_size=spec.context_size,
        training_tokens=spec.training_tokens,
        train_batch_size_tokens=spec.batch_size_tokens,
        n_batches_in_buffer=buffer_batches(spec),
        store_batch_size_prompts=8,
        lr=spec.learning_rate,
        lr_warm_up_steps=0,
        seed=spec.seed,
        device=device,
        # The SAE's metadata must say how the model was really loaded (GUIDE §4: SAELens's default claims
        # center_writing_weights=False only).
        model_from_pretrained_kwargs=dict(model_kwargs),
        prepend_bos=prepend_bos,
        exclude_special_tokens=sorted(special_ids) if special_ids else False,
        n_checkpoints=spec.n_checkpoints,
        checkpoint_path=str(checkpoint_dir),
        save_final_checkpoint=False,
        output_path=None,
        n_eval_batches=4,
        eval_batch_size_prompts=8,
        logger=LoggingConfig(log_to_wandb=False),
        dead_feature_window=200,
        feature_sampling_window=200,
        verbose=False,
    )


class StreamingTrainer(SAETrainer):
    """`SAETrainer` whose per-step metrics (the ones it would send to wandb) go to ``on_metrics``."""

    def __init__(self, *args, on_metrics: Callable[[int, dict], None], log_every: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_metrics = on_metrics
        self.log_every = log_every
        self.started = time.perf_counter()
        self.samples_at_start = self.n_training_samples

    def step(self, batch):
        output = super().step(batch)
        if self.n_training_steps % self.log_every == 0:
            metrics = self.build_train_step_log_dict(output=output, n_training_samples=self.n_training_samples)
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            metrics["details/tokens_per_second"] = (self.n_training_samples - self.samples_at_start) / elapsed
            self.on_metrics(self.n_training_steps, {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        return output


# Written into a checkpoint folder once SAELens has written all of it. SAELens writes a checkpoint file by file
# (weights, trainer state, activation scaler, activation store, runner config) and a step can die between any two: a
# folder without this file is half-written and is never resumed from.
CHECKPOINT_COMPLETE = "saecomp_checkpoint_complete"


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete SAELens checkpoint under ``checkpoint_dir``. SAELens writes them to
    ``<checkpoint_path>/<random run id>/<samples seen>/``, so we look two levels down; only folders that
    `save_checkpoint_marked` finished count."""
    root = Path(checkpoint_dir)
    complete = [marker.parent for marker in root.glob(f"*/*/{CHECKPOINT_COMPLETE}") if marker.parent.name.isdigit()]
    return max(complete, key=lambda p: int(p.name), default=None)


def save_checkpoint_marked(save_checkpoint: Callable[..., None], still_wanted: Callable[[], bool] | None = None) -> Callable[..., None]:
    """SAELens's runner-side checkpoint save (the last part of a checkpoint it writes), followed by our completion
    marker, so that `latest_checkpoint` never picks a folder whose writing was cut short. With ``still_wanted``, a
    checkpoint is left unfinished (so never resumed from) once it says no: a step whose run was closed under it (its
    launcher died) trains on for a few seconds, and a checkpoint it finished then would outlive the rerun that redid
    the training and deleted the folder, and a later run would resume from it."""

    def save(checkpoint_path: Path | None) -> None:
        if still_wanted is not None and not still_wanted():
            return
        save_checkpoint(checkpoint_path=checkpoint_path)
        if checkpoint_path is not None:
            (Path(checkpoint_path) / CHECKPOINT_COMPLETE).write_text("")

    return save


SHARED_FORWARD_MARGIN = 2 << 30
"""Disk space a shared forward pass leaves free beyond its estimate (``SharedForward.open``)."""


def store_tokens(spec: SAETrainingSpec) -> int:
    """The tokens SAELens's activation store runs through the model for ``spec``: the training tokens, and before them,
    for ``expected_average_only_in``, SAELens's norm estimate of ``n_batches_for_norm_estimate`` batches (1,000 by
    default), drawn from the same stream: 10x tiny.yaml's training tokens."""
    extra = 0
    if spec.normalize_activations == "expected_average_only_in":
        extra = LanguageModelSAERunnerConfig.__dataclass_fields__["n_batches_for_norm_estimate"].default * spec.batch_size_tokens
    return spec.training_tokens + extra


@dataclass
class SharedForward:
    """The model's forward pass shared by the SAEs of one layer, through a folder on this machine.

    SAELens's activation store runs the model up to the hook's block for every batch of training tokens, and it does so
    once per SAE: a layer's three hooks (``attn.hook_z``, ``hook_mlp_out``, ``hook_resid_post``) stop at the same block,
    so two of their three forward passes repeat the first (about 60% of a tiny-world training). Here the first store
    to meet a batch of tokens records every sibling hook's activations in one forward (the very call SAELens makes,
    with the sibling hooks added to its names filter: the same computation), saved per batch under a digest of the
    tokens; a store that meets the same tokens later reads them instead of running the model. Results are bit for bit
    those of a store that runs the model (tests/test_train_sae.py), so neither keys nor runs change. Only where the model
    runs on the CPU (on a GPU the forward is faster than the disk) and the activations fit on the disk.
    SAELens's `MultiSAETrainingRunner` would share the forward within one process, but changes the data order and with
    it every trained SAE (benchmarks/README.md)."""

    folder: Path
    hooks: tuple[str, ...]  # full hook names, all stopping at the same block
    read: int = 0
    computed: int = 0

    @classmethod
    def open(cls, root: str | Path, model: HookedTransformer, model_identity: str, layer: int, hooks, tokens: int):
        """The folder of this model and layer under ``root``, or (None, why not)."""
        from saecomp.names import hook_d_in

        if str(model.cfg.device).split(":")[0] != "cpu":
            return None, f"the model runs on {model.cfg.device}, where its forward is faster than reading the disk"
        hooks = sorted(set(hooks))
        names = tuple(f"blocks.{layer}.{hook}" for hook in hooks)  # one folder whichever hook asks first
        itemsize = next(model.parameters()).element_size()
        needed = 2 * tokens * sum(hook_d_in(model.cfg, hook) for hook in hooks) * itemsize  # 2x: buffer refills, evaluation
        Path(root).mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        if free < needed + SHARED_FORWARD_MARGIN:
            return None, f"it may take {needed / 1e9:.1f} GB and {root} has {free / 1e9:.1f} GB free"
        identity = json.dumps([model_identity, layer, names, str(next(model.parameters()).dtype)])
        folder = Path(root) / hashlib.sha256(identity.encode()).hexdigest()[:20]
        folder.mkdir(exist_ok=True)
        return cls(folder, names), None

    @contextmanager
    def serving(self, store) -> Iterator[SharedForward]:
        """Shadows ``store``'s ``get_activations`` so that its model call is served from the folder where it can be."""
        from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name

        model, get_activations = store.model, store.get_activations
        stop = {extract_stop_at_layer_from_tlens_hook_name(name) for name in self.hooks}
        if store.hook_name not in self.hooks or len(stop) != 1 or store.autocast_lm:  # (autocast: not in the folder's identity)
            yield self
            return
        run_with_cache = model.run_with_cache

        def shared_run_with_cache(batch_tokens, *, names_filter, stop_at_layer, prepend_bos, **kwargs):
            if kwargs or list(names_filter) != [store.hook_name] or stop_at_layer not in stop:
                return run_with_cache(
                    batch_tokens, names_filter=names_filter, stop_at_layer=stop_at_layer, prepend_bos=prepend_bos, **kwargs
                )
            tokens = batch_tokens.cpu().contiguous()
            digest = hashlib.sha256(repr((tuple(tokens.shape), str(tokens.dtype), prepend_bos)).encode() + tokens.numpy().tobytes())
            path = self.folder / f"{digest.hexdigest()}.pt"
            if path.exists():
                self.read += 1
                # mmap: only this hook's tensor is read of the file's three
                return None, {store.hook_name: torch.load(path, map_location=batch_tokens.device, mmap=True)[store.hook_name]}
            _, cache = run_with_cache(batch_tokens, names_filter=list(self.hooks), stop_at_layer=stop_at_layer, prepend_bos=prepend_bos)
            partial = path.with_suffix(f".{os.getpid()}.partial")
            torch.save({name: cache[name].cpu() for name in self.hooks}, partial)
            os.replace(partial, path)  # whole or absent: a reader never sees half a batch
            self.computed += 1
            return None, {store.hook_name: cache[store.hook_name]}

        def shared_get_activations(batch_tokens):
            with shadowed(model, run_with_cache=shared_run_with_cache):
                return get_activations(batch_tokens)

        with shadowed(store, get_activations=shared_get_activations):
            yield self

    def describe(self) -> str:
        return f"{self.read} batches of activations read from {self.folder}, {self.computed} computed there for {', '.join(self.hooks)}"


class _QuietOverrides(logging.Filter):
    # SAELens warns that an overriding model or dataset makes the run irreproducible from its config alone; ours
    # are recorded by the step's key, params and tokens, so the warning says nothing here.
    def filter(self, record):
        return "You just passed in a" not in record.getMessage()


def train_sae(
    spec: SAETrainingSpec,
    model: HookedTransformer,
    token_dataset,
    model_name: str,
    model_kwargs: dict[str, bool],
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    dataset_name: str = "override",
    on_metrics: Callable[[int, dict], None] = lambda step, metrics: None,
    log_every: int = 5,
    prepend_bos: bool = False,
    special_ids: list[int] | None = None,
    shared_forward: SharedForward | None = None,
    still_wanted: Callable[[], bool] | None = None,
):
    """Train one SAE with SAELens on activations of ``model`` over ``token_dataset`` (rows with an ``input_ids``
    list of ``context_size`` tokens: a `datasets.Dataset`, or a streamed `saecomp.data.TokenStream`). Resumes
    from the newest checkpoint in ``checkpoint_dir`` if one exists. With ``shared_forward``, the model's forward
    passes are shared with the other hooks' trainings of the layer (`SharedForward`; the same SAE either way). Saves
    the inference SAE to ``output_dir`` (SAELens format) and returns (that SAE as `SAE.load_from_disk` gives it, the
    number of samples it resumed from or None). ``still_wanted``: see `save_checkpoint_marked`."""
    cfg = runner_config(spec, model, model_name, model_kwargs, checkpoint_dir, dataset_name, prepend_bos, special_ids)
    logging.getLogger("sae_lens").addFilter(_QuietOverrides())
    torch.manual_seed(spec.seed)
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=token_dataset, override_model=model)
    # What `runner.run()` does, with our trainer in place of SAETrainer.
    runner._set_sae_metadata()
    save_runner_state = runner.save_checkpoint
    trainer = StreamingTrainer(
        sae=runner.sae,
        data_provider=runner.activations_store,
        evaluator=runner.evaluator,
        save_checkpoint_fn=save_checkpoint_marked(save_runner_state, still_wanted),
        cfg=cfg.to_sae_trainer_config(),
        on_metrics=on_metrics,
        log_every=log_every,
    )
    resume = latest_checkpoint(checkpoint_dir)
    if resume is not None:
        trainer.load_trainer_state(resume)
        runner.sae.load_weights_from_checkpoint(resume)
        runner.activations_store.load_from_checkpoint(resume)
        trainer.samples_at_start = trainer.n_training_samples
    # `trainer.fit()`, not the runner's `run_trainer_with_interruption_handling`, whose two additions are both wrong
    # here. On an interrupt it saves only the runner's part (activation store, runner config) into
    # `<checkpoint_path>/<samples seen>`: never resumable without the trainer's state, and, when no step ran since the
    # last checkpoint, into that checkpoint's own folder, after its completion marker. A killed run resumes from its last
    # complete checkpoint instead. And it installs SAELens's SIGINT/SIGTERM handlers for good (never restored), which
    # turn Ctrl-C and `kill` into an `Exception` (`InterruptedException`) that any `except Exception` swallows, in place
    # of the step's own (KeyboardInterrupt; a counted SIGTERM that never lets the run end FINISHED).
    with shared_forward.serving(runner.activations_store) if shared_forward else nullcontext():
        trained = trainer.fit()
    trained.save_inference_model(str(output_dir))
    return SAE.load_from_disk(str(output_dir)), (int(resume.name) if resume is not None else None)


def spec_like(spec: SAETrainingSpec, sae) -> SAETrainingSpec:
    """``spec`` with the configuration of a pretrained SAE (architecture, width, input normalisation,
    context size, hook, k): the paper trains "closely following the pretrained SAE configurations"."""
    from dataclasses import replace

    architecture = sae.cfg.architecture()
    if architecture not in ARCHITECTURES:
        raise ValueError(f"the pretrained SAE's architecture {architecture!r} cannot be trained here; valid: {', '.join(ARCHITECTURES)}")
    name = sae.cfg.metadata.hook_name or ""
    parts = name.split(".", 2)
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in HOOKS:
        raise ValueError(f"the pretrained SAE's hook {name!r} is not one of blocks.<layer>.{{{', '.join(HOOKS)}}}")
    return replace(
        spec,
        architecture=architecture,
        hook=parts[2],
        layer=int(parts[1]),
        d_sae=sae.cfg.d_sae,
        k=getattr(sae.cfg, "k", spec.k),
        normalize_activations=sae.cfg.normalize_activations,
        context_size=sae.cfg.metadata.context_size or spec.context_size,
        prepend_bos=sae.cfg.metadata.prepend_bos,
    )
