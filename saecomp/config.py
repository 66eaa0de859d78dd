"""The experiment schema: what an `experiments/*.yaml` file may say, validated before any compute.

Every field documents itself. An unknown key, a value of the wrong type or out of range is an error
naming the field, the value and what would be valid. The schema is pydantic's; its JSON Schema is published as
`experiments/schema.json` (`python -m saecomp.config --schema`), so that editors complete and check the files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

from saecomp.names import KNOWN_MODELS, LLM_PRUNING_METHODS, TINY_MODELS, check_model_name
from saecomp.world.config import WorldConfig

SAE_HOOKS = ("attn.hook_z", "hook_mlp_out", "hook_resid_post")
SELECTION_METRICS = ("mse", "ce_loss_with_sae", "ce_loss_increase")
SELECTION_RULES = ("tolerance", "argmin")


DEVICES = ("cpu", "cuda", "cuda:<index>", "mps")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A user-caused configuration error; its message is one line for the terminal."""


def _as_list(value):
    # A single value where a list is expected is a list of one (`hooks: hook_mlp_out`).
    return value if isinstance(value, list) or value is None else [value]


def _as_number_list(kind: str):
    def check(value):
        items = _as_list(value)
        for item in items or []:
            if isinstance(item, bool) or (kind == "int" and isinstance(item, float)):
                raise PydanticCustomError(f"{kind}_parsing", "not a number")
        return items

    return check


def _one_or_many(item: dict) -> WithJsonSchema:
    # What the editor accepts: a list, or the single value that stands for a list of one.
    return WithJsonSchema({"anyOf": [{"type": "array", "items": item}, item]})


IntList = Annotated[list[int], BeforeValidator(_as_number_list("int")), _one_or_many({"type": "integer"})]
FloatList = Annotated[list[float], BeforeValidator(_as_number_list("float")), _one_or_many({"type": "number"})]
StrList = Annotated[list[str], BeforeValidator(_as_list), _one_or_many({"type": "string"})]


class Section(BaseModel):
    """A part of the experiment file: unknown keys are errors; the docstring under a field is its description."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, coerce_numbers_to_str=True, allow_inf_nan=False)

    def to_dict(self) -> dict:
        return self.model_dump()

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value, info):
        # pydantic would read `true` as 1 and 64.0 as 64; a number field takes a number, an integer field an integer.
        hint = cls.model_fields[info.field_name].annotation
        if value is None and isinstance(hint, type) and issubclass(hint, Section):
            return {}  # a section whose lines are all commented out: its defaults
        kind = {int: "int", float: "float", int | None: "int", float | None: "float"}.get(hint)
        if kind and isinstance(value, bool):
            raise PydanticCustomError(f"{kind}_parsing", "not a number")
        if kind == "int" and (isinstance(value, float) or (isinstance(value, str) and not value.strip().lstrip("-").isdigit())):
            raise PydanticCustomError("int_parsing", "not an integer")
        return value


class DataConfig(Section):
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


class CalibrationConfig(Section):
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


class LLMPruningConfig(Section):
    method: str = "wanda"
    """`wanda`, `magnitude`, or `wanda-seed` (the paper's code, for reproduction only)."""
    sparsity: float = 0.5
    """Fraction of weights zeroed in each comparison group, in [0, 1)."""
    nm: str | None = None
    """N:M semi-structured pattern such as `2:4` (zero N of every M inputs); overrides sparsity."""
    layers: IntList | None = None
    """Blocks to prune (0-based); default: all. Unpruned blocks still feed the ones after them."""


class HeldOutConfig(Section):
    n_sequences: int = 64
    """Held-out sequences (validation and test alike) for losses and the SAE sweep."""
    seq_len: int | None = None
    """Tokens per held-out sequence for the dense/pruned cross-entropy; default: the model's context."""
    documents: int = 1000
    """Documents in each of the validation and test pools."""


class SAEConfig(Section):
    hooks: StrList = Field(default_factory=lambda: list(SAE_HOOKS))
    """Hook points to train/prune SAEs at: attn.hook_z, hook_mlp_out, hook_resid_post."""
    layers: Annotated[
        list[int] | str, WithJsonSchema({"anyOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "integer"}, {"const": "all"}]})
    ] = Field(default_factory=lambda: [2])
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
    prepend_bos: bool | None = None
    """Whether the trained SAEs' windows open with BOS (recorded in their metadata; `evaluate`'s core then reads
    windows the same way). Default: as the model's own text (Gemma-2: BOS; GPT-2: none). Set it as the pretrained
    SAEs have it, so that every variant of a hook reads the same core windows. `train_sae -P like=...` takes the copied
    SAE's own setting instead."""
    pretrained: dict[str, str | dict[str, str]] = Field(default_factory=dict)
    """hook -> pretrained SAE source: `{release: ..., sae_id: ...}`, `runs:/<id>/sae`, `models:/<name>/<v>` or a
    SAELens folder; `{layer}` in it stands for the layer (so `layers: all` works with a release). Empty: the
    pretrained SAE is trained by train_sae on the dense model (the tiny world)."""

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value):
        # `layers: 3` is [3], `-P layers=1,2` is [1, 2]; `layers: all` stays the word.
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        if isinstance(value, str) and value != "all" and all(part.strip().isdigit() for part in value.split(",")):
            return [int(part) for part in value.split(",")]
        return value


class SAEPruningConfig(Section):
    method: str = "wanda"
    sparsities: FloatList = Field(default_factory=lambda: [0.25, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99])
    tolerance: float = 0.05
    """Selection (rule `tolerance`): a level passes when its validation mse <= (1 + tolerance) x the trained
    SAE's, or, for the cross-entropy metrics, when it is <= the trained SAE's + tolerance x the clean CE."""
    selection_metric: str = "mse"
    """`mse`, `ce_loss_with_sae` or `ce_loss_increase` (cross-entropy added by splicing)."""
    selection_rule: str = "tolerance"
    """`tolerance`: the highest level (>= 0.25) at which it and every lower level (>= 0.25) pass (our reading of
    the paper); `argmin`: the level (>= 0.25) with the lowest spliced CE (the paper's code)."""


class EvaluationConfig(Section):
    """SAEBench on the pruned model (`evaluate`); every variant compared in one table reads the same tokens and
    data, with the same sizes. Defaults are SAEBench's own, except where noted."""

    suites: StrList = Field(default_factory=lambda: ["core", "absorption", "scr", "tpp", "sparse_probing", "ravel"])
    """core, absorption, scr, tpp, sparse_probing, ravel (SAEBench's six). A suite that cannot apply to an SAE
    (absorption and RAVEL off the residual stream, RAVEL on GPT-2) is logged as not applicable."""
    # core
    n_sequences: int = 128
    """Test windows that core reads."""
    context_size: int | None = None
    """Tokens per core window; default: the SAE's context (the paper's SAEBench runs: 128)."""
    batch_size_prompts: int = 16
    """Prompts per batch (the paper: 16)."""
    n_reconstruction_batches: int = 8
    """Core's batches for the spliced-loss metrics (the paper: 200)."""
    n_sparsity_variance_batches: int = 8
    """Core's batches for the sparsity and variance metrics (the paper: 2000)."""
    seed: int = 42
    """SAEBench's ``random_seed`` for every suite but core (its default, 42): the balanced samples, the probes, the
    pairs. Runs with other seeds that fill one table cell print as their mean and its standard error over seeds."""
    replicates: int = 1
    """Seeds the pipeline evaluates each SAE with in the suites that read one (``seed``, ``seed`` + 1, ...): with
    2 or more, compare's cells for those suites are the mean over seeds with its standard error. Each seed's runs are
    reused by their own keys, so raising it only adds the new seeds' runs."""

    def replicate_seeds(self) -> list[int]:
        """The seeds the pipeline evaluates the seeded suites with (SEEDED_SUITES), ``seed`` first."""
        return [self.seed + i for i in range(self.replicates)]
    # the probing suites (SCR, TPP, sparse probing)
    probe_context_length: int = 128
    """Tokens per labelled text (longer ones are truncated, shorter padded; padding is masked out)."""
    llm_batch_size: int = 32
    """Texts per model batch in SCR, TPP, sparse probing and absorption."""
    sparse_probing_train_size: int = 4000
    sparse_probing_test_size: int = 1000
    sparse_probing_k: IntList = Field(default_factory=lambda: [1, 2, 5])
    """Top-k latents (and model dimensions) the probes read."""
    sparse_probing_datasets: StrList | None = None
    """SAEBench dataset names; default: SAEBench's eight, or the five the tiny world has."""
    scr_tpp_train_size: int = 4000
    scr_tpp_test_size: int = 1000
    scr_tpp_n_values: IntList = Field(default_factory=lambda: [2, 5, 10, 20, 50, 100, 500])
    """Numbers of latents ablated."""
    scr_tpp_datasets: StrList | None = None
    """SAEBench dataset names; default: SAEBench's two (bias_in_bios class set 1, Amazon reviews)."""
    labelled_data_revisions: dict[str, str] = Field(default_factory=dict)
    """Per Hub dataset the probing suites read online (`LabHC/bias_in_bios`, `canrager/amazon_reviews_mcauley_1and5`,
    `codeparrot/github-code`, `fancyzhx/ag_news`, `Helsinki-NLP/europarl`), the branch, tag or commit to read; "main"
    for any not named (not for a tiny model, whose labelled texts come from its world). The commits they resolved to
    are tagged on the run (``saecomp.labelled_data``): set them here to rerun on exactly that data."""
    # absorption
    absorption_max_k: int = 10
    """Largest k of the k-sparse first-letter probes."""
    absorption_min_letters: int = 20
    """Letters whose ground-truth probe must reach F1 0.6 for absorption to apply (SAEBench's min_feats_for_eval)."""
    # RAVEL
    ravel_llm_batch_size: int = 8
    """Prompt pairs per batch of RAVEL's mask training (SAEBench's runner uses a quarter of its LLM batch for RAVEL:
    8 for Gemma-2-2B); the number of training steps, and so the result, depends on it."""
    ravel_top_n_entities: int = 500
    """Entities RAVEL keeps, those whose facts the model completes correctly most often."""
    ravel_pairs_per_attribute: int = 5000
    """Base/source prompt pairs per attribute for RAVEL's interventions (fewer when fewer prompts are known)."""
    ravel_data_revision: str = "main"
    """Branch, tag or commit of the Hub dataset SAEBench's RAVEL reads (`adamkarvonen/ravel_prompts`; not for a tiny
    model, whose facts come from its world). The commit it resolved to is tagged on the run (``saecomp.ravel.data``):
    set it here to rerun on exactly that data."""
    ravel_entity_attribute_selection: dict[str, list[str]] | None = None
    """RAVEL's entity classes, each with the attribute classes to disentangle (at least two; SAEBench's
    ``entity_attribute_selection``). Default: SAEBench's own (city: Country, Continent, Language; nobel_prize_winner:
    Country of Birth, Field, Gender), which `ravel_data_revision`'s files must hold; for a tiny model, the world's
    city facts, of which a selection must be a part."""


# Which evaluation fields each suite reads: a suite's finished result is reused unless one of its own fields changed.
# The labelled data's size follows the largest train and test sizes of the three probing suites, and SAEBench samples
# its balanced sets from all the rows (`df.sample`), so each of them depends on all four sizes.
_LABELLED_DATA = ("sparse_probing_train_size", "sparse_probing_test_size", "scr_tpp_train_size", "scr_tpp_test_size")
SUITE_FIELDS = {
    "core": ("n_sequences", "context_size", "batch_size_prompts", "n_reconstruction_batches", "n_sparsity_variance_batches"),
    "sparse_probing": ("seed", "probe_context_length", "llm_batch_size", *_LABELLED_DATA, "sparse_probing_k", "sparse_probing_datasets",
                       "labelled_data_revisions"),
    "scr": ("seed", "probe_context_length", "llm_batch_size", *_LABELLED_DATA, "scr_tpp_n_values", "scr_tpp_datasets",
            "labelled_data_revisions"),
    "tpp": ("seed", "probe_context_length", "llm_batch_size", *_LABELLED_DATA, "scr_tpp_n_values", "scr_tpp_datasets",
            "labelled_data_revisions"),
    "absorption": ("seed", "llm_batch_size", "absorption_max_k", "absorption_min_letters"),
    "ravel": ("seed", "ravel_llm_batch_size", "ravel_top_n_entities", "ravel_pairs_per_attribute", "ravel_data_revision",
              "ravel_entity_attribute_selection"),
}  # fmt: skip

ACCELERATOR_TAG = "saecomp.accelerator"
"""The tag naming the processor behind a step's ``device`` (`tracking.accelerator_name`): an H100 and an H200, or two
CPUs' kernels, round differently, so compare never reads a difference between two of them as a finding."""

SEEDED_SUITES = tuple(suite for suite, fields in SUITE_FIELDS.items() if "seed" in fields)
"""The suites that read ``evaluation.seed`` (SAEBench's random_seed; core reads none): runs of one of them with
different seeds are replicates of one cell."""


class Experiment(Section):
    name: str = "tiny"
    model: str = "tiny-gpt2"
    """Base model: gpt2, google/gemma-2-2b, tiny-gpt2, tiny-gemma2."""
    device: str = Field("cpu", json_schema_extra={"pattern": "^(cpu|mps|cuda(:[0-9]+)?)$"})
    """Where every step computes: cpu, cuda, cuda:<index> or mps. Part of each step's key (the bits differ)."""
    dtype: str = Field("float32", json_schema_extra={"enum": list(DTYPES)})
    """The model's weights and activations in every step: float32, bfloat16 or float16 (the paper ran Gemma-2-2B
    in bfloat16). SAEs keep their own dtype. Part of each step's key."""
    world: dict = Field(default_factory=dict)
    """Settings of the tiny world (saecomp.world.build.WorldConfig); only for tiny models."""
    data: DataConfig = Field(default_factory=DataConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    llm_pruning: LLMPruningConfig = Field(default_factory=LLMPruningConfig)
    held_out: HeldOutConfig = Field(default_factory=HeldOutConfig)
    sae: SAEConfig = Field(default_factory=SAEConfig)
    sae_pruning: SAEPruningConfig = Field(default_factory=SAEPruningConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    def runtime(self) -> dict[str, str]:
        """Where and in what precision steps compute: part of every step's key, logged by every step."""
        return {"device": self.device, "dtype": self.dtype}

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


def _where(loc: tuple) -> str:
    return ".".join(str(part) if not isinstance(part, int) else f"[{part}]" for part in loc).replace(".[", "[")


def _one_line(error: ValidationError, data: dict) -> str:
    """pydantic's first error as the one line this project has always printed: field, value, what is valid."""
    first = error.errors()[0]
    # A union reports each option; its name (e.g. `list[int]`) is not a field.
    loc = tuple(part for part in first["loc"] if not (isinstance(part, str) and ("[" in part or part in ("str", "int", "float"))))
    where, value, kind = _where(loc), first.get("input"), first["type"]
    if kind == "extra_forbidden":
        section: type[Section] = Experiment
        for part in loc[:-1]:
            section = section.model_fields[part].annotation if isinstance(part, str) else section
        return f"unknown key {where}; valid keys: {', '.join(section.model_fields)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{where or 'experiment'} must be a mapping, got {value!r}"
    if kind in ("float_parsing", "float_type"):
        return f"{where}={value!r} is not a number"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"{where}={value!r} is not an integer"
    if kind == "finite_number":
        return f"{where}={value!r} is not a finite number"
    if kind in ("bool_parsing", "bool_type"):
        return f"{where}={value!r} is not a boolean; valid: true, false"
    if kind == "string_type":
        return f"{where}={value!r} must be a string"
    if kind == "list_type":
        return f"{where}={value!r} must be a list"
    return f"{where}={value!r}: {first['msg']}"


def parse_experiment(data: dict) -> Experiment:
    """The typed experiment from a mapping (YAML), or a ConfigError naming the first wrong field."""
    if not isinstance(data, dict):
        raise ConfigError(f"experiment must be a mapping, got {data!r}")
    try:
        return Experiment.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_one_line(error, data)) from None


def json_schema() -> dict:
    """The JSON Schema of an experiment file (what `experiments/schema.json` holds)."""
    schema = Experiment.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "saecomp experiment"
    schema["required"] = ["name"]  # a file must name its MLflow experiment (load_experiment refuses one that does not)
    return schema


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
    if exp.dtype not in DTYPES:
        raise ConfigError(f"dtype={exp.dtype!r} is not valid; valid: {', '.join(DTYPES)}")
    device = exp.device.split(":")
    if (
        device[0] not in ("cpu", "cuda", "mps")
        or (len(device) == 2 and not (device[0] == "cuda" and device[1].isdigit()))
        or len(device) > 2
    ):
        raise ConfigError(f"device={exp.device!r} is not valid; valid: {', '.join(DEVICES)}")
    pruning = exp.llm_pruning
    if pruning.method not in LLM_PRUNING_METHODS:
        raise ConfigError(f"method={pruning.method!r} is not valid; valid: {', '.join(LLM_PRUNING_METHODS)}")
    if not 0.0 <= pruning.sparsity < 1.0:
        raise ConfigError(f"sparsity={pruning.sparsity} is not valid; valid: a number in [0, 1)")
    if pruning.layers is not None and not pruning.layers:
        raise ConfigError("llm_pruning.layers=[] prunes no block; valid: the blocks to prune, or null (the default) for every block")
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
    from saecomp.names import SUITES

    for suite in exp.evaluation.suites:
        if suite not in SUITES:
            raise ConfigError(f"suite={suite!r} is not valid; valid: {', '.join(SUITES)}")
    ev = exp.evaluation
    sizes = ("n_sequences", "batch_size_prompts", "n_reconstruction_batches", "n_sparsity_variance_batches", "probe_context_length",
             "llm_batch_size", "sparse_probing_train_size", "sparse_probing_test_size", "scr_tpp_train_size", "scr_tpp_test_size",
             "absorption_max_k", "absorption_min_letters", "replicates")  # fmt: skip
    for name in sizes:
        if getattr(ev, name) < 1:
            raise ConfigError(f"evaluation.{name}={getattr(ev, name)} must be at least 1")
    if not 0 <= ev.seed <= 2**32 - ev.replicates:  # SAEBench seeds numpy and pandas with it (and seed + 1, ... for replicates)
        raise ConfigError(f"evaluation.seed={ev.seed} is not valid; valid: a whole number in 0..{2**32 - ev.replicates}")
    needed = ev.batch_size_prompts * max(ev.n_reconstruction_batches, ev.n_sparsity_variance_batches)
    if ev.n_sequences < needed:
        raise ConfigError(
            f"evaluation.n_sequences={ev.n_sequences} is fewer than core reads ({ev.batch_size_prompts} x "
            f"{max(ev.n_reconstruction_batches, ev.n_sparsity_variance_batches)} = {needed}); valid: at least {needed}"
        )
    for name in ("sparse_probing_train_size", "sparse_probing_test_size", "scr_tpp_train_size", "scr_tpp_test_size"):
        if getattr(ev, name) < 8:
            raise ConfigError(f"evaluation.{name}={getattr(ev, name)} is too small: SAEBench splits it into quarters; valid: at least 8")
    # SAEBench's output classes have a field per k and n only for these; others would be dropped from its JSON.
    for name, allowed in (("sparse_probing_k", (1, 2, 5, 10, 20, 50, 100)), ("scr_tpp_n_values", (2, 5, 10, 20, 50, 100, 500))):
        values = getattr(ev, name)
        if not values or any(v not in allowed for v in values):
            valid = ", ".join(map(str, allowed))
            raise ConfigError(f"evaluation.{name}={values} is not valid; valid: a list drawn from {valid} (SAEBench's)")
    if not 2 <= ev.absorption_min_letters <= 26:
        raise ConfigError(f"evaluation.absorption_min_letters={ev.absorption_min_letters} is not valid; valid: 2 to 26 letters")
    tiny = exp.model in ("tiny-gpt2", "tiny-gemma2")
    correlation = exp.world_config().corpus.profession_gender_correlation if tiny else 0.5
    if {"scr", "tpp", "sparse_probing"} & set(ev.suites) and correlation in (0.0, 1.0):
        raise ConfigError(
            f"world.corpus.profession_gender_correlation={correlation} leaves a gender without biographies of some professions, "
            "which SCR, TPP and sparse probing need; valid: a value strictly between 0 and 1"
        )
    from saecomp.saebench_data import check_datasets, check_labelled_data_revisions, check_ravel_selection

    for name in ("sparse_probing_datasets", "scr_tpp_datasets"):
        try:
            check_datasets(name, getattr(ev, name), tiny)
        except ValueError as error:
            raise ConfigError(f"evaluation.{error}") from None
    try:
        check_labelled_data_revisions(ev.labelled_data_revisions)
    except ValueError as error:
        raise ConfigError(f"evaluation.{error}") from None
    try:
        check_ravel_selection(ev.ravel_entity_attribute_selection, tiny)
    except ValueError as error:
        raise ConfigError(f"evaluation.{error}") from None
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
    exp = validate(parse_experiment(data))
    if "name" not in data:  # else its runs would land in the default experiment's MLflow experiment, `tiny`, mixed with its own
        raise ConfigError(
            f"experiment={str(path)!r} names no experiment; valid: a `name:` line, the MLflow experiment its runs go to "
            "(e.g. name: my-study)"
        )
    return exp


def model_choices() -> str:
    return ", ".join(sorted(KNOWN_MODELS))


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="The experiment schema.")
    parser.add_argument("--schema", action="store_true", help="print the JSON Schema of experiment files")
    if parser.parse_args().schema:
        print(json.dumps(json_schema(), indent=2))


if __name__ == "__main__":
    main()
