"""The experiment schema: what an `experiments/*.yaml` file may say, validated before any compute.

Every field documents itself. An unknown key, a value of the wrong type or out of range is an error
naming the field, the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from saecomp.models import KNOWN_MODELS, TINY_MODELS, check_model_name
from saecomp.prune_llm import METHODS as LLM_PRUNING_METHODS
from saecomp.world.build import WorldConfig

SAE_HOOKS = ("attn.hook_z", "hook_mlp_out", "hook_resid_post")
SELECTION_METRICS = ("mse", "ce_loss_with_sae", "ce_loss_increase")
SELECTION_RULES = ("tolerance", "argmin")


class ConfigError(ValueError):
    """A user-caused configuration error; its message is one line for the terminal."""


@dataclass
class DataConfig:
    """The model's text: the SAE training stream and the held-out (validation, test) documents."""

    dataset: str = "tiny"
    """`tiny` (the tiny world's corpus), a Hugging Face dataset id (e.g. `Skylion007/openwebtext`, streamed), or a
    local folder that `datasets.load_dataset` (or `load_from_disk`) reads."""
    split: str = "train"
    """Split of the SAE training stream (and of calibration, unless `calibration.split` says otherwise)."""
    heldout_split: str = "validation"
    """Split of the validation documents; with one split (OpenWebText) the same split: the pools never overlap."""
    test_split: str = "test"
    """Split of the test documents; with one split the same split again (test then follows validation in it)."""
    text_column: str = "text"


@dataclass
class CalibrationConfig:
    """WANDA's calibration text (and the SAE pruning statistics): random windows of a pool of documents."""

    dataset: str | None = None
    """Calibration dataset; default: `data.dataset`. The paper calibrates on OpenWebText for both models."""
    split: str | None = None
    """Default: `data.split`."""
    text_column: str | None = None
    """Default: `data.text_column`."""
    documents: int = 1000
    """Documents in the calibration pool (the first of the split); nothing else ever reads them."""
    n_sequences: int = 128
    """Calibration sequences (WANDA: 128)."""
    seq_len: int | None = None
    """Tokens per sequence; default: the model's context (1024 for GPT-2)."""
    seed: int = 0
    batch_size: int = 8
    """Sequences per forward pass; changes speed and memory only."""


@dataclass
class LLMPruningConfig:
    method: str = "wanda"
    """`wanda`, `magnitude`, or `wanda-seed` (the paper's code, for reproduction only)."""
    sparsity: float = 0.5
    """Fraction of weights zeroed in each comparison group, in [0, 1)."""
    nm: str | None = None
    """N:M semi-structured pattern such as `2:4` (zero N of every M inputs); overrides sparsity."""
    layers: list[int] | None = None
    """Blocks to prune (0-based); default: all. Unpruned blocks still feed the ones after them."""


@dataclass
class HeldOutConfig:
    n_sequences: int = 64
    """Held-out sequences (validation and test alike) for losses and the SAE sweep."""
    seq_len: int | None = None
    """Tokens per held-out sequence for the dense/pruned cross-entropy; default: the model's context."""
    documents: int = 1000
    """Documents in each of the validation and test pools."""


@dataclass
class SAEConfig:
    hooks: list[str] = field(default_factory=lambda: list(SAE_HOOKS))
    """Hook points to train/prune SAEs at: attn.hook_z, hook_mlp_out, hook_resid_post."""
    layers: list[int] | str = field(default_factory=lambda: [2])
    """Layers (0-based) of the SAEs, or `all` (per-layer sweeps, the paper's appendix Figures 5-7)."""
    architecture: str = "topk"
    """SAELens architecture: standard, topk, batchtopk, jumprelu."""
    d_sae: int | None = None
    """Latents; default: expansion_factor * d_in."""
    expansion_factor: int = 8
    k: int = 32
    """Active latents for topk/batchtopk."""
    l1_coefficient: float = 5.0
    """Sparsity coefficient for standard/jumprelu."""
    training_tokens: int = 500_000
    batch_size_tokens: int = 4096
    learning_rate: float = 3e-4
    context_size: int = 128
    normalize_activations: str = "none"
    """SAELens input normalisation: none, expected_average_only_in, layer_norm."""
    max_passes: int = 1
    """Passes over the training stream allowed before training stops with an error (1: no text repeats)."""
    pretrained: dict[str, object] = field(default_factory=dict)
    """hook -> pretrained SAE source: `{release: ..., sae_id: ...}`, `runs:/<id>/sae`, `models:/<name>/<v>` or a
    SAELens folder; `{layer}` in it stands for the layer (so `layers: all` works with a release). Empty: the
    pretrained SAE is trained by train_sae on the dense model (the tiny world)."""


@dataclass
class SAEPruningConfig:
    method: str = "wanda"
    sparsities: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99])
    tolerance: float = 0.05
    """Selection (rule `tolerance`): a level passes when its validation mse <= (1 + tolerance) x the trained
    SAE's, or, for the cross-entropy metrics, when it is <= the trained SAE's + tolerance x the clean CE."""
    selection_metric: str = "mse"
    """`mse`, `ce_loss_with_sae` or `ce_loss_increase` (cross-entropy added by splicing)."""
    selection_rule: str = "tolerance"
    """`tolerance`: the highest level (>= 0.25) at which it and every lower level (>= 0.25) pass (our reading of
    the paper); `argmin`: the level (>= 0.25) with the lowest spliced CE (the paper's code)."""


@dataclass
class EvaluationConfig:
    """SAEBench on the test pool (`evaluate`); every variant compared in one table reads the same tokens."""

    suites: list[str] = field(default_factory=lambda: ["core"])
    """core, absorption, scr, tpp, sparse_probing, ravel (only core is built so far)."""
    n_sequences: int = 128
    """Test windows that core reads."""
    context_size: int | None = None
    """Tokens per window; default: the SAE's context (the paper's SAEBench runs: 128)."""
    batch_size_prompts: int = 16
    """Prompts per batch (the paper: 16)."""
    n_reconstruction_batches: int = 8
    """Core's batches for the spliced-loss metrics (the paper: 200)."""
    n_sparsity_variance_batches: int = 8
    """Core's batches for the sparsity and variance metrics (the paper: 2000)."""


@dataclass
class Experiment:
    name: str = "tiny"
    model: str = "tiny-gpt2"
    """Base model: gpt2, google/gemma-2-2b, tiny-gpt2, tiny-gemma2."""
    world: dict = field(default_factory=dict)
    """Settings of the tiny world (saecomp.world.build.WorldConfig); only for tiny models."""
    data: DataConfig = field(default_factory=DataConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    llm_pruning: LLMPruningConfig = field(default_factory=LLMPruningConfig)
    held_out: HeldOutConfig = field(default_factory=HeldOutConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    sae_pruning: SAEPruningConfig = field(default_factory=SAEPruningConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def world_config(self) -> WorldConfig:
        return WorldConfig.from_dict(self.world)

    def pretrained_source(self, hook: str, layer: int):
        """The experiment's pretrained SAE source for (hook, layer), ``{layer}`` filled in; None if not named."""
        source = self.sae.pretrained.get(hook)
        if source is None:
            return None
        if isinstance(source, dict):
            return {k: str(v).replace("{layer}", str(layer)) for k, v in source.items()}
        return str(source).replace("{layer}", str(layer))

    def sae_layers(self, n_layers: int) -> list[int]:
        return list(range(n_layers)) if self.sae.layers == "all" else list(self.sae.layers)

    def nm_tuple(self) -> tuple[int, int] | None:
        return parse_nm(self.llm_pruning.nm)

    def digest(self, *sections: str) -> str:
        """A short hash of the named sections (all if none): the identity of a step's inputs."""
        data = self.to_dict()
        chosen = {s: data[s] for s in sections} if sections else data
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def parse_nm(text: str | None) -> tuple[int, int] | None:
    if text in (None, "", "none"):
        return None
    try:
        n, m = (int(part) for part in str(text).split(":"))
    except ValueError:
        raise ConfigError(f"nm={text!r} is not an N:M pattern; valid: e.g. 2:4 or 4:8") from None
    if not 0 < n < m:
        raise ConfigError(f"nm={text!r} is not valid; N:M needs 0 < N < M, e.g. 2:4")
    return n, m


def _convert(value, hint, where: str):
    """Check/convert one YAML value against a type hint; raise ConfigError naming ``where``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, where)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        (item,) = typing.get_args(hint)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} must be a mapping")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
        raise ConfigError(f"{where}={value!r} is not a boolean; valid: true, false")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} is not a number")
        try:
            number = hint(value) if hint is float else int(str(value), 10)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r} is not {'an integer' if hint is int else 'a number'}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}={value!r} is not a finite number")
        return number
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}={value!r} must be a string")
        return str(value)
    return value


def _build(cls, data, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'experiment'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; valid keys: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def validate(exp: Experiment) -> Experiment:
    """Check the values that the types alone cannot."""
    try:
        check_model_name(exp.model)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if exp.model in TINY_MODELS and exp.data.dataset != "tiny":
        raise ConfigError(f"model={exp.model} lives in the tiny world; data.dataset must be 'tiny', not {exp.data.dataset!r}")
    if exp.model not in TINY_MODELS and exp.data.dataset == "tiny":
        raise ConfigError(f"data.dataset=tiny only serves the tiny models ({', '.join(sorted(TINY_MODELS))}), not model={exp.model}")
    if exp.world and exp.model not in TINY_MODELS:
        raise ConfigError(f"world settings apply only to tiny models, not model={exp.model}")
    try:
        world = exp.world_config()
    except (TypeError, ValueError) as error:
        raise ConfigError(f"world: {error}") from None
    if exp.model in TINY_MODELS and exp.model not in world.models:
        raise ConfigError(f"model={exp.model} is not among world.models ({', '.join(world.models)})")
    pruning = exp.llm_pruning
    if pruning.method not in LLM_PRUNING_METHODS:
        raise ConfigError(f"method={pruning.method!r} is not valid; valid: {', '.join(LLM_PRUNING_METHODS)}")
    if not 0.0 <= pruning.sparsity < 1.0:
        raise ConfigError(f"sparsity={pruning.sparsity} is not valid; valid: a number in [0, 1)")
    nm = parse_nm(pruning.nm)
    if nm and pruning.method == "wanda-seed":
        raise ConfigError("nm is not valid with method=wanda-seed (the paper's code is unstructured)")
    for name, value in (
        ("calibration.n_sequences", exp.calibration.n_sequences),
        ("calibration.batch_size", exp.calibration.batch_size),
        ("calibration.documents", exp.calibration.documents),
        ("held_out.n_sequences", exp.held_out.n_sequences),
        ("held_out.documents", exp.held_out.documents),
        ("sae.max_passes", exp.sae.max_passes),
    ):
        if value < 1:
            raise ConfigError(f"{name}={value} must be at least 1")
    for name, value in (("calibration.seq_len", exp.calibration.seq_len), ("held_out.seq_len", exp.held_out.seq_len)):
        if value is not None and value < 2:
            raise ConfigError(f"{name}={value} must be at least 2")
    if isinstance(exp.sae.layers, str) and exp.sae.layers != "all":
        raise ConfigError(f"sae.layers={exp.sae.layers!r} is not valid; valid: a list of layers or 'all'")
    if not exp.sae.layers or not exp.sae.hooks:
        raise ConfigError("sae.layers and sae.hooks must not be empty")
    for hook in exp.sae.hooks:
        if hook not in SAE_HOOKS:
            raise ConfigError(f"hook={hook!r} is not valid; valid: {', '.join(SAE_HOOKS)}")
    if exp.sae_pruning.selection_metric not in SELECTION_METRICS:
        raise ConfigError(f"selection_metric={exp.sae_pruning.selection_metric!r} is not valid; valid: {', '.join(SELECTION_METRICS)}")
    if exp.sae_pruning.selection_rule not in SELECTION_RULES:
        raise ConfigError(f"selection_rule={exp.sae_pruning.selection_rule!r} is not valid; valid: {', '.join(SELECTION_RULES)}")
    if exp.model in TINY_MODELS and (exp.calibration.dataset or "tiny") != "tiny":
        raise ConfigError(f"model={exp.model} lives in the tiny world; calibration.dataset must be 'tiny', not {exp.calibration.dataset!r}")
    if exp.sae_pruning.tolerance < 0:
        raise ConfigError(f"tolerance={exp.sae_pruning.tolerance} is not valid; valid: a number >= 0")
    for hook, source in exp.sae.pretrained.items():
        if hook not in SAE_HOOKS:
            raise ConfigError(f"sae.pretrained has hook {hook!r}; valid: {', '.join(SAE_HOOKS)}")
        if isinstance(source, dict) and set(source) != {"release", "sae_id"}:
            raise ConfigError(f"sae.pretrained.{hook}={source!r} must have exactly the keys release and sae_id")
    from saecomp.evaluate import SUITES

    for suite in exp.evaluation.suites:
        if suite not in SUITES:
            raise ConfigError(f"suite={suite!r} is not valid; valid: {', '.join(SUITES)}")
    ev = exp.evaluation
    for name in ("n_sequences", "batch_size_prompts", "n_reconstruction_batches", "n_sparsity_variance_batches"):
        if getattr(ev, name) < 1:
            raise ConfigError(f"evaluation.{name}={getattr(ev, name)} must be at least 1")
    needed = ev.batch_size_prompts * max(ev.n_reconstruction_batches, ev.n_sparsity_variance_batches)
    if ev.n_sequences < needed:
        raise ConfigError(
            f"evaluation.n_sequences={ev.n_sequences} is fewer than core reads ({ev.batch_size_prompts} x "
            f"{max(ev.n_reconstruction_batches, ev.n_sparsity_variance_batches)} = {needed}); valid: at least {needed}"
        )
    for sparsity in exp.sae_pruning.sparsities:
        if not 0.0 <= sparsity < 1.0:
            raise ConfigError(f"sae_pruning.sparsities contains {sparsity}; valid: numbers in [0, 1)")
    return exp


def load_experiment(path: str | Path, overrides: dict[str, object] | None = None) -> Experiment:
    """Read, override (dotted keys such as ``llm_pruning.sparsity``) and validate an experiment."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(
            f"experiment={str(path)!r} cannot be read ({error.strerror}); valid: a YAML file such as experiments/tiny.yaml"
        ) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"experiment={str(path)!r} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"experiment={str(path)!r} must hold a mapping of settings")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot override {dotted}: {key} is not a mapping")
        node[leaf] = value
    return validate(_build(Experiment, data, ""))


def model_choices() -> str:
    return ", ".join(sorted(KNOWN_MODELS))
