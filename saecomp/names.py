"""What an experiment may name, and the checks on it, without importing a model library.

Models, LLM pruning methods, hooks, suites, SAE sources and a model's shape are all a pipeline needs to validate an
experiment and find its finished runs. Importing torch, TransformerLens and SAELens to learn them cost a cached
`mlflow run .` about 8 of its 20 s on 2 cores (py-spy, 2026-11-27), so they live here, and `models`, `saes`,
`evaluate`, `prune_llm` and `train_sae` re-export them. This file's source is in no step's key (graph.py): what it
decides about a result goes into the keys as a resolved input instead (an SAE training's whole spec and its resolved
width, hook names, SAE sources), so an edit here that changes a result changes those keys, and one that does not (a
new model name, a clearer error) leaves every finished run valid.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

# --- models --------------------------------------------------------------------------------------------

# Names a user may give, and what they are. Tiny models live in the tiny world built by `build_world`.
HUB_MODELS = {"gpt2": "GPT2LMHeadModel", "google/gemma-2-2b": "Gemma2ForCausalLM"}
TINY_MODELS = {"tiny-gpt2": "GPT2LMHeadModel", "tiny-gemma2": "Gemma2ForCausalLM"}
KNOWN_MODELS = {**HUB_MODELS, **TINY_MODELS}
SUPPORTED_ARCHITECTURES = ("GPT2LMHeadModel", "Gemma2ForCausalLM")


def check_model_name(name: str) -> None:
    if name not in KNOWN_MODELS and not Path(name).is_dir():
        raise ValueError(
            f"model={name!r} is not a known model; valid: {', '.join(sorted(KNOWN_MODELS))}, "
            "or a directory holding a Hugging Face checkpoint"
        )


def check_device(device: str) -> None:
    """A clear error before any compute when ``device`` is not on this machine (torch is asked only for a GPU)."""
    kind, _, index = device.partition(":")
    if kind == "cuda":
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(
                f"device={device!r} is not available: torch {torch.__version__} sees no CUDA device here; "
                "valid: cpu (--device cpu, or -P device=cpu under mlflow run)"
            )
        if index and int(index) >= count:
            raise ValueError(
                f"device={device!r} is not available: this machine has {count} CUDA device(s); valid: cuda:0..cuda:{count - 1}"
            )
    elif kind == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ValueError(
                f"device={device!r} is not available on this machine; valid: cpu (--device cpu, or -P device=cpu under mlflow run)"
            )


def unreachable_now(url: str, timeout_s: float) -> str | None:
    """Why no TCP connection to the host of ``url`` opens within ``timeout_s``, or None when one does or nobody can
    tell: a proxy stands between (a direct connection says nothing of its reach), or the URL names no host or port
    that can be read. One try; ``tracking`` retries it for a tracking server that may be restarting."""
    import socket
    import urllib.request
    from urllib.parse import urlparse

    try:
        parsed = urlparse(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:  # a malformed URL: the client that reads it will say what is wrong with it
        return None
    if parsed.hostname is None or (urllib.request.getproxies().get(parsed.scheme) and not urllib.request.proxy_bypass(parsed.hostname)):
        return None
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError as error:  # no name service, no route, refused, timed out
        return f"{type(error).__name__}: {error}"
    return None


def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face Hub (``HF_ENDPOINT``) cannot be reached from here, or None when it can or nobody can tell
    (offline mode asked for already; see ``unreachable_now``)."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or os.environ.get("TRANSFORMERS_OFFLINE"):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    why = unreachable_now(endpoint, timeout_s)
    return None if why is None else f"{endpoint} cannot be reached from here ({why})"


def read_the_cache_when_the_hub_is_unreachable() -> str | None:
    """Offline mode (``HF_HUB_OFFLINE=1``) for this process and the steps it starts when the Hub cannot be reached:
    huggingface_hub would otherwise retry every file five times (about 26 s each) before reading its cache. Returns
    the line to say, or None when nothing changed."""
    import os
    import sys

    why = hub_unreachable()
    if why is None:
        return None
    os.environ["HF_HUB_OFFLINE"] = "1"  # the libraries read it at import, and the steps started from here inherit it
    for module, attribute in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
        if module in sys.modules:  # imported already (a warm step server's preload): set what they read at import
            setattr(sys.modules[module], attribute, True)
    return f"the Hugging Face Hub at {why}; reading the Hugging Face cache only, as with HF_HUB_OFFLINE=1 (set it to skip this check)"


@dataclass(frozen=True)
class ModelDims:
    """The shape of a model, read from its config alone (no weights): enough to validate a request."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    n_ctx: int
    d_mlp: int
    architecture: str

    @classmethod
    def from_hf_config(cls, config) -> ModelDims:
        if config.model_type == "gpt2":
            return cls(
                config.n_layer,
                config.n_embd,
                config.n_head,
                config.n_embd // config.n_head,
                config.n_positions,
                config.n_inner or 4 * config.n_embd,
                "GPT2LMHeadModel",
            )
        return cls(
            config.num_hidden_layers,
            config.hidden_size,
            config.num_attention_heads,
            config.head_dim,
            config.max_position_embeddings,
            config.intermediate_size,
            "Gemma2ForCausalLM",
        )

    @classmethod
    def from_config_json(cls, data: dict) -> ModelDims | None:
        """The shape from a checkpoint's ``config.json`` as written, or None where it leaves a field to transformers'
        defaults (GPT-2's ``n_inner`` excepted: null or absent means 4 x ``n_embd`` there too)."""
        from types import SimpleNamespace

        gpt2 = data.get("model_type") == "gpt2"
        needed = ("n_layer", "n_embd", "n_head", "n_positions") if gpt2 else (
            "num_hidden_layers", "hidden_size", "num_attention_heads", "head_dim", "max_position_embeddings", "intermediate_size"
        )  # fmt: skip
        if any(data.get(name) is None for name in needed):
            return None
        return cls.from_hf_config(SimpleNamespace(**{"n_inner": None, **data}))

    @classmethod
    def from_tiny(cls, model) -> ModelDims:
        """A tiny world model's shape from its `TinyModelConfig`, as `world.build.hf_config` lays it out (a test
        holds the two equal), without importing transformers (and with it torch)."""
        architectures = {"gpt2": "GPT2LMHeadModel", "gemma2": "Gemma2ForCausalLM"}
        if model.architecture not in architectures:
            raise ValueError(f"architecture={model.architecture!r} is not valid; valid: {', '.join(architectures)}")
        architecture = architectures[model.architecture]
        return cls(model.n_layers, model.d_model, model.n_heads, model.d_model // model.n_heads, model.n_ctx, model.d_mlp, architecture)



def hf_model_dims(model: str) -> ModelDims:
    """The shape of a Hub model (``gpt2``: from the Hugging Face cache, or downloaded) or of a checkpoint folder, from
    its ``config.json`` read as JSON: transformers' ``AutoConfig`` would import torch (seconds of a cached run), and
    is asked only where the file leaves a field to its defaults. A model without a readable config is a ValueError
    naming it."""
    folder = Path(model)
    try:
        if folder.is_dir():
            path = folder / "config.json"
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, "config.json"))
        data = json.loads(path.read_text())
    except Exception as error:  # not found, offline without the cache, gated, unreadable
        raise ValueError(f"model={model!r}: its config.json could not be read ({type(error).__name__}: {error})") from error
    dims = ModelDims.from_config_json(data)
    if dims is None:
        from transformers import AutoConfig

        dims = ModelDims.from_hf_config(AutoConfig.from_pretrained(model))
    return dims

# --- LLM pruning ---------------------------------------------------------------------------------------

LLM_PRUNING_METHODS = ("wanda", "magnitude", "wanda-seed")
SAE_PRUNING_METHODS = (*LLM_PRUNING_METHODS, "latents")

# --- hooks ---------------------------------------------------------------------------------------------

HOOKS = ("attn.hook_z", "hook_mlp_out", "hook_resid_post")


def hook_name(hook: str, layer: int) -> str:
    if hook not in HOOKS:
        raise ValueError(f"hook={hook!r} is not valid; valid: {', '.join(HOOKS)}")
    return f"blocks.{layer}.{hook}"


def hook_d_in(cfg, hook: str) -> int:
    """Width of the activations at ``hook``: hook_z SAEs see all heads flattened (n_heads * d_head)."""
    return cfg.n_heads * cfg.d_head if hook == "attn.hook_z" else cfg.d_model


def check_hook(dims, hook: str, layer: int) -> str:
    """The full hook name, or a ValueError naming what is valid; ``dims`` has ``n_layers`` (a
    `ModelDims` or a TransformerLens config)."""
    name = hook_name(hook, layer)
    if not 0 <= layer < dims.n_layers:
        raise ValueError(f"layer={layer} is outside the model; valid: 0..{dims.n_layers - 1}")
    return name


# --- SAE training ---------------------------------------------------------------------------------------

SAE_ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")  # SAELens's training configs: train_sae.ARCHITECTURES
NORMALIZATIONS = ("none", "expected_average_only_in", "layer_norm", "constant_norm_rescale")


@dataclass(frozen=True)
class SAETrainingSpec:
    """One SAE to train; every field is a choice that changes the SAE."""

    hook: str
    """attn.hook_z, hook_mlp_out or hook_resid_post."""
    layer: int
    architecture: str = "topk"
    d_sae: int | None = None
    """Latents; None: expansion_factor * d_in."""
    expansion_factor: int = 8
    k: int = 32
    """Active latents (topk, batchtopk)."""
    sparsity_coefficient: float = 5.0
    """L1 coefficient (standard) or L0 coefficient (jumprelu)."""
    training_tokens: int = 400_000
    batch_size_tokens: int = 4096
    learning_rate: float = 3e-4
    context_size: int = 128
    normalize_activations: str = "none"
    prepend_bos: bool | None = None
    """Training windows start with BOS; None: as the model was trained (Gemma-2 yes, GPT-2 no)."""
    seed: int = 42
    n_checkpoints: int = 4
    """Checkpoints kept during training, so a killed run can continue."""

    def to_dict(self) -> dict:
        return asdict(self)


def resolved_d_sae(spec: SAETrainingSpec, d_in: int) -> int:
    return spec.d_sae or spec.expansion_factor * d_in


def check_spec(spec: SAETrainingSpec, dims, n_context_tokens: int | None = None) -> None:
    """Every value SAELens would crash on (or silently misuse), as one clear ValueError, before training.
    ``dims``: a `ModelDims` or a TransformerLens config (n_layers, d_model, n_heads, d_head, n_ctx)."""
    if spec.architecture not in SAE_ARCHITECTURES:
        raise ValueError(f"architecture={spec.architecture!r} is not valid; valid: {', '.join(SAE_ARCHITECTURES)}")
    if spec.hook not in HOOKS:
        raise ValueError(f"hook={spec.hook!r} is not valid; valid: {', '.join(HOOKS)}")
    check_hook(dims, spec.hook, spec.layer)
    d_in = hook_d_in(dims, spec.hook)
    d_sae = resolved_d_sae(spec, d_in)
    if spec.d_sae is not None and spec.d_sae < 1:
        raise ValueError(f"d_sae={spec.d_sae} is not valid; valid: a whole number of at least 1")
    if d_sae < 1:  # d_sae not given: it is expansion_factor * d_in
        raise ValueError(
            f"expansion_factor={spec.expansion_factor} is not valid; "
            f"valid: a whole number of at least 1 (d_sae = expansion_factor × d_in {d_in})"
        )
    if spec.architecture in ("topk", "batchtopk") and not 0 < spec.k <= d_sae:
        raise ValueError(f"k={spec.k} is not valid for d_sae={d_sae}; valid: 1..{d_sae}")
    if spec.normalize_activations not in NORMALIZATIONS:
        raise ValueError(f"normalize_activations={spec.normalize_activations!r} is not valid; valid: {', '.join(NORMALIZATIONS)}")
    if spec.context_size < 2 or spec.context_size > dims.n_ctx:
        raise ValueError(f"context_size={spec.context_size} is not valid; valid: 2..{dims.n_ctx} (the model's context)")
    if spec.batch_size_tokens < 1:
        raise ValueError(f"batch_size_tokens={spec.batch_size_tokens} is not valid; valid: a whole number of at least 1")
    if not spec.learning_rate > 0:  # also NaN
        raise ValueError(f"learning_rate={spec.learning_rate} is not valid; valid: a positive number, e.g. 4e-4")
    if spec.training_tokens < spec.batch_size_tokens:
        raise ValueError(f"training_tokens={spec.training_tokens} is fewer than one batch (batch_size_tokens={spec.batch_size_tokens})")
    if n_context_tokens is not None and n_context_tokens < spec.context_size:
        raise ValueError(f"the training text holds {n_context_tokens} tokens, fewer than one context of {spec.context_size}")


def pruned_variant(level: float) -> str:
    """A pruned SAE's variant name in tables, tags and metrics: ``pruned25`` for 0.25 (the paper's Pruned25), and, for
    a level that is no whole percent, its digits (``pruned99_4`` for 0.994), never a rounded name that another kept
    level already has (0.251 is not Pruned25)."""
    percent = f"{round(level * 100, 6):.6f}".rstrip("0").rstrip(".")  # fixed point: every digit a level has, no exponent
    return f"pruned{percent}".replace(".", "_")


# --- evaluation suites ---------------------------------------------------------------------------------

SUITES = ("core", "absorption", "scr", "tpp", "sparse_probing", "ravel")


def check_suites(suites: list[str]) -> None:
    """A ValueError naming the first suite that is unknown."""
    for suite in suites:
        if suite not in SUITES:
            raise ValueError(f"suite={suite!r} is not valid; valid: {', '.join(SUITES)}")


# --- SAE sources ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SAESource:
    """Where an SAE comes from; exactly one form is set."""

    release: str | None = None
    sae_id: str | None = None
    uri: str | None = None
    """`runs:/<run_id>/<path>` or `models:/<name>/<version>`."""
    path: str | None = None

    @classmethod
    def parse(cls, value) -> SAESource:
        """From an experiment/CLI value: a mapping {release, sae_id}, an MLflow URI, or a folder."""
        if isinstance(value, SAESource):
            return value
        if isinstance(value, dict):
            if set(value) != {"release", "sae_id"}:
                raise ValueError(f"SAE source {value!r} must have exactly the keys release and sae_id")
            return cls(release=str(value["release"]), sae_id=str(value["sae_id"]))
        text = str(value)
        if text.startswith(("runs:/", "models:/")):
            return cls(uri=text)
        if Path(text).is_dir():
            return cls(path=text)
        if ":" in text and not text.startswith("/"):
            release, sae_id = text.split(":", 1)
            return cls(release=release, sae_id=sae_id)
        if text.startswith(("/", ".", "~")) or "/" in text:  # a path: say that it is missing, not that its form is wrong
            raise ValueError(
                f"SAE source {text!r} is no folder here; valid: a SAELens folder (cfg.json, sae_weights.safetensors), "
                "release:sae_id, runs:/<run_id>/sae or models:/<name>/<version>"
            )
        raise ValueError(
            f"SAE source {text!r} is not valid; valid: release:sae_id, runs:/<run_id>/sae, models:/<name>/<version>, or a SAELens folder"
        )

    def describe(self) -> str:
        return f"{self.release}:{self.sae_id}" if self.release else (self.uri or self.path or "")

    def identity(self) -> str:
        """What the SAE is, for step keys: ``describe()`` where that names fixed contents (a run's artifact, a
        registered version, a release), and beside it what a name alone does not pin: a folder's file digest (an SAE
        trained again into the same folder is another SAE) and the version an alias or ``latest`` points to now."""
        if self.path:
            return f"{self.describe()}#{_folder_digest(str(Path(self.path).expanduser().resolve()))}"
        if self.uri and self.uri.startswith("models:/"):
            name, alias_sep, alias = self.uri.removeprefix("models:/").partition("@")
            if not alias_sep:
                name, _, version = name.rpartition("/")
                if version.isdigit():
                    return self.describe()
            import mlflow

            client = mlflow.MlflowClient()
            try:
                if alias_sep:
                    resolved = client.get_model_version_by_alias(name, alias).version
                elif version == "latest":
                    resolved = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
                else:  # a stage
                    resolved = client.get_latest_versions(name, [version])[0].version
            except Exception as error:  # noqa: BLE001 - no such model, alias or stage: the step says so when it loads it
                return f"{self.describe()}#unresolved ({type(error).__name__})"
            return f"{self.describe()}#version {resolved}"
        return self.describe()


SAE_FOLDER_FILES = ("*.json", "*.safetensors")
"""What SAELens reads of an SAE folder (cfg.json, sae_weights.safetensors; the sparsity beside them): its key's digest,
not a training's checkpoints/ or logs beside them."""


def _sae_files(folder: str) -> list[Path]:
    return sorted(p for pattern in SAE_FOLDER_FILES for p in Path(folder).glob(pattern) if p.is_file())


@functools.lru_cache(maxsize=64)
def _folder_digest_at(folder: str, stamp: tuple) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in _sae_files(folder):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _folder_digest(folder: str) -> str:
    """The digest of an SAE folder's files, computed once per state of them (names, sizes, modification times)."""
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in _sae_files(folder))
    return _folder_digest_at(folder, stamp)
