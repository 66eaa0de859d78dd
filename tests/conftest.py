"""Shared fixtures: a private MLflow store per session, and tiny models built in seconds."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Tests never touch the user's store or cache.
# A fresh folder per session: a session killed before its end leaves its folder, and a later one with the same pid
# must not read that session's runs.
_ROOT_DIR = Path(os.environ.get("PYTEST_SAECOMP_DIR", "/tmp"))
_ROOT_DIR.mkdir(parents=True, exist_ok=True)
_SESSION_DIR = Path(tempfile.mkdtemp(prefix=f"saecomp-tests-{os.getpid()}-", dir=_ROOT_DIR))
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_DIR / 'mlflow.db'}"
os.environ["SAECOMP_CACHE"] = str(_SESSION_DIR / "cache")
os.environ["HF_HUB_OFFLINE"] = "1"
# Where `datasets` imports a dataset's loading script from (tests serve one from the local Hub). It is read once, at
# import, and the package it builds there stays in sys.modules: a test cannot move it later in the same process.
os.environ["HF_MODULES_CACHE"] = str(_SESSION_DIR / "hf_modules")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`-n 2`, what the README's test command runs) two workers share the 2 cores: one thread each, in
# this process and in every step it starts, so that neither oversubscribes the cores and numbers compared across
# processes are summed in the same order.
_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
if _THREADS == 1:
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_name] = "1"

import torch  # noqa: E402

from saecomp.tracking import open_local_store  # noqa: E402

torch.set_num_threads(_THREADS)
# The session's store created now, its Default experiment's artifacts beside it: MLflow's client would otherwise file
# them, and any experiment it creates, under ./mlruns of the process that first opens the store (the repository, for
# a step), where every test session would leave its gigabytes (saecomp's own experiments go beside it too:
# tracking.open_local_store).
open_local_store()

SMALL_EXPERIMENT = """\
name: small
model: tiny-gpt2
world:
  vocab_size: 1024
  corpus: {n_documents: 300}
  models:
    tiny-gpt2: {architecture: gpt2, n_layers: 2, d_model: 32, n_heads: 4, d_mlp: 64, n_ctx: 64,
                train_steps: 30, batch_size: 8}
    tiny-gemma2: {architecture: gemma2, n_layers: 2, d_model: 32, n_heads: 4, n_kv_heads: 2, d_mlp: 64, n_ctx: 64,
                  train_steps: 30, batch_size: 8}
calibration: {n_sequences: 16, batch_size: 8, documents: 40}
held_out: {n_sequences: 8}
sae:
  layers: [1]
  k: 8
  expansion_factor: 4
  training_tokens: 30000
  batch_size_tokens: 512
  context_size: 64
sae_pruning:
  sparsities: [0.25, 0.5, 0.9]
evaluation:
  suites: [core]
  n_sequences: 32
  batch_size_prompts: 8
  n_reconstruction_batches: 4
  n_sparsity_variance_batches: 4
  probe_context_length: 48
  sparse_probing_train_size: 64
  sparse_probing_test_size: 32
  scr_tpp_train_size: 64
  scr_tpp_test_size: 32
  scr_tpp_n_values: [2, 5, 20]
  # fewer datasets than SAEBench's defaults keep the tests fast; the tiny file runs them all
  sparse_probing_datasets: [LabHC/bias_in_bios_class_set1, canrager/amazon_reviews_mcauley_1and5_sentiment]
  scr_tpp_datasets: [LabHC/bias_in_bios_class_set1]
"""


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session", autouse=True)
def session_step_server():
    """One warm step server for every pipeline and step this test process starts (saecomp/step_server.py): a pipeline
    would start its own, and its first steps would each pay the imports (~6 s) while it starts. A step whose
    environment differs from this process's (HF_HUB_CACHE, say) starts the usual way, as it would under a pipeline's.
    A test that kills or freezes a step process by pid, or that needs a pipeline's own server, starts it with
    `infrastructure.without_session_step_server()`."""
    from saecomp.step_server import SERVER_ENV, serving

    if os.environ.get(SERVER_ENV):  # the person running the tests chose ("0": none)
        yield
        return
    with serving():
        yield


@pytest.fixture(scope="session")
def small_experiment(session_dir) -> Path:
    path = session_dir / "small.yaml"
    path.write_text(SMALL_EXPERIMENT)
    return path


@pytest.fixture(scope="session")
def small_world(session_dir, small_experiment):
    """A tiny world built in-process (seconds), not through MLflow."""
    from saecomp.config import load_experiment
    from saecomp.world.build import build_world

    exp = load_experiment(small_experiment)
    out = session_dir / "world"
    if not (out / "world.json").exists():
        build_world(exp.world_config(), out, log=lambda line: None)
    return out


def random_hf_model(architecture: str, dtype=torch.float32, seed: int = 0, vocab_size: int = 300):
    """A randomly initialised GPT-2 or Gemma-2 HF model with uneven input norms (some residual
    directions scaled up), small enough for exact float64 reference checks."""
    from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config

    torch.manual_seed(seed)
    if architecture == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=32,
            n_ctx=32,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_inner=64,
            architectures=["GPT2LMHeadModel"],
        )
    else:
        config = Gemma2Config(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=32,
            sliding_window=8,
            query_pre_attn_scalar=8,
            architectures=["Gemma2ForCausalLM"],
            attn_implementation="eager",
        )
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():
        # Uneven input norms: WANDA and magnitude must then disagree.
        gain = torch.ones(32, dtype=dtype)
        gain[:8] = 8.0
        for p in model.parameters():
            if p.ndim == 2 and p.shape[0] != vocab_size:
                p.normal_(0, 0.2)
        if architecture == "gpt2":
            for block in model.transformer.h:
                block.ln_1.weight.mul_(gain)
                block.ln_2.weight.mul_(gain)
        else:
            for block in model.model.layers:
                block.input_layernorm.weight.copy_(gain - 1)  # Gemma's RMSNorm scales by (1 + w)
                block.pre_feedforward_layernorm.weight.copy_(gain - 1)
    model.eval()
    return model


def tokenizer_for(vocab_size: int = 300):
    """A byte-level tokenizer with ``vocab_size`` entries, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def pytest_sessionfinish(session, exitstatus):
    # The session's private store, cache and worlds go with it.
    import shutil

    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def tracked_world(small_experiment):
    """The small world built once through MLflow (its own build_world run)."""
    from entrypoints.common import load, resolve_world

    return resolve_world(load(str(small_experiment), {}), str(small_experiment))
