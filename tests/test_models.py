"""Base models load through the real Hub code path, offline, from a Hugging Face cache layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import ROOT, random_hf_model, tokenizer_for

from saecomp.models import load_model
from saecomp.names import ModelDims, hf_model_dims

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def place_in_hf_cache(cache: Path, repo_id: str, hf_model, tokenizer) -> Path:
    """Write a checkpoint where `hf_hub_download` looks for ``repo_id`` (models--org--name/snapshots/<sha>)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / SNAPSHOT
    hf_model.save_pretrained(snapshot, safe_serialization=True)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return snapshot


def test_a_step_reads_the_cache_at_once_when_the_hub_cannot_be_reached(tmp_path):
    """Without HF_HUB_OFFLINE, huggingface_hub retries a file the cache lacks five times (about 26 s) when the Hub
    cannot be reached, then fails: a step checks once, says so, and reads the cache only, as do the steps it starts.
    Here the Hub's name resolves nowhere (``.invalid`` never does, RFC 2606: what a node without name service meets)."""
    from transformers import GPT2Config

    endpoint = "https://saecomp-test-hub.invalid"
    cache = tmp_path / "hub"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") and "PROXY" not in k.upper()}
    env.update(HF_HUB_CACHE=str(cache), HF_ENDPOINT=endpoint, PYTHONPATH=str(ROOT))
    plan = [sys.executable, "-m", "entrypoints.pipeline", "--experiment", "experiments/gpt2-small.yaml", "--dry-run", "--device", "cpu"]
    unreachable = f"saecomp: warning: the Hugging Face Hub at {endpoint} cannot be reached from here (gaierror"

    missing = subprocess.run(plan, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and unreachable in missing.stderr, missing.stderr[-3000:]
    assert "saecomp: error: model='gpt2': its config.json could not be read" in missing.stderr
    assert "Retry" not in missing.stderr, missing.stderr[-3000:]  # not one request was tried

    repo = cache / "models--gpt2"
    GPT2Config().save_pretrained(repo / "snapshots" / SNAPSHOT)  # GPT-2 small's shape: the file's layers fit
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    cached = subprocess.run(plan, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert cached.returncode == 0 and unreachable in cached.stderr, cached.stderr[-3000:]
    assert "blocks.8.hook_resid_post: prune_sae" in cached.stdout  # the plan, from the cached config.json


@pytest.mark.parametrize("repo_id,architecture", [("gpt2", "gpt2"), ("google/gemma-2-2b", "gemma2")])
def test_hub_names_load_offline_from_the_hf_cache(tmp_path, repo_id, architecture):
    hf_model = random_hf_model(architecture)
    snapshot = place_in_hf_cache(tmp_path / "hub", repo_id, hf_model, tokenizer_for())
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = hf_model(input_ids=tokens).logits
    torch.save({"tokens": tokens, "expected": expected}, tmp_path / "io.pt")
    # huggingface_hub reads its cache location and offline flag at import: a fresh interpreter.
    script = f"""
import torch
from saecomp.models import load_model
io = torch.load({str(tmp_path / "io.pt")!r})
loaded = load_model({repo_id!r})
print(type(loaded.hf).__name__, float((loaded.tl(io['tokens']) - io['expected']).abs().max()))
"""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    arch_name, max_diff = out.stdout.split()[-2:]
    assert arch_name == {"gpt2": "GPT2LMHeadModel", "gemma2": "Gemma2ForCausalLM"}[architecture]
    assert float(max_diff) < 1e-4
    # The shape a pipeline validates with comes from the same cache's config.json, without importing torch.
    dims_script = f"""
import json, sys
from dataclasses import asdict
from saecomp.names import hf_model_dims
print(json.dumps(asdict(hf_model_dims({repo_id!r}))), "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", dims_script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    dims, torch_imported = out.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert json.loads(dims) == asdict(ModelDims.from_hf_config(hf_model.config)) and torch_imported == "False"
    # And the cache really was the source: without it, offline loading fails.
    env["HF_HUB_CACHE"] = str(tmp_path / "empty")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert snapshot.exists()


# config.json as the Hub serves it: GPT-2's without n_inner (transformers' default: 4 x n_embd); Gemma-2-2B's in full
GPT2_CONFIG_JSON = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_ctx": 1024,
                    "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024, "vocab_size": 50257}  # fmt: skip
GEMMA2_CONFIG_JSON = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "head_dim": 256, "hidden_size": 2304,
                      "intermediate_size": 9216, "max_position_embeddings": 8192, "num_attention_heads": 8,
                      "num_hidden_layers": 26, "num_key_value_heads": 4, "vocab_size": 256000}  # fmt: skip


@pytest.mark.parametrize("config_json", [GPT2_CONFIG_JSON, GEMMA2_CONFIG_JSON, {**GEMMA2_CONFIG_JSON, "head_dim": None}])
def test_a_models_shape_read_from_its_config_json_is_what_transformers_reads(tmp_path, config_json):
    """`hf_model_dims` reads config.json as JSON (no torch) and gets what `AutoConfig` gets, defaults included; where
    the file leaves a field to transformers' defaults (a Gemma-2 config without head_dim) it asks transformers."""
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config_json.items() if v is not None}))
    assert hf_model_dims(str(tmp_path)) == ModelDims.from_hf_config(AutoConfig.from_pretrained(tmp_path))
    if config_json is GPT2_CONFIG_JSON:
        assert hf_model_dims(str(tmp_path)).d_mlp == 3072
    with pytest.raises(ValueError, match="config.json could not be read"):
        hf_model_dims(str(tmp_path / "missing"))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gemma2"])
def test_tiny_checkpoints_load_like_real_ones(small_world, name):
    loaded = load_model(name, small_world / name)
    tokens = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    assert (loaded.tl(tokens) - loaded.hf(input_ids=tokens).logits).abs().max() < 1e-4
    summary = json.loads((small_world / "world.json").read_text())
    assert name in summary["models"]


def test_tl_weights_are_hf_weights_unprocessed(small_world):
    loaded = load_model("tiny-gpt2", small_world / "tiny-gpt2")
    # No LayerNorm folding: ln1 keeps its HF weight, and W_in equals c_fc exactly.
    assert torch.equal(loaded.tl.blocks[0].ln1.w, loaded.hf.transformer.h[0].ln_1.weight)
    assert torch.equal(loaded.tl.blocks[0].mlp.W_in, loaded.hf.transformer.h[0].mlp.c_fc.weight)


@pytest.mark.parametrize("architecture", ["gpt2", "gemma2"])
def test_a_model_processed_as_an_sae_asks_keeps_the_models_outputs(tmp_path, architecture):
    """An SAE whose metadata names no processing (Gemma Scope's) gets TransformerLens's defaults, centred unembedding
    included; under Gemma-2's logit soft cap that centring is not function-preserving, and TransformerLens's
    `from_pretrained` drops it there. Loaded that way, the model must still be the model: the same log-probabilities
    as Hugging Face's, with logits large enough that the soft cap bends them (as real Gemma-2's do)."""
    from saecomp.saes import TL_DEFAULT_PROCESSING

    hf_model = random_hf_model(architecture)
    with torch.no_grad():  # logits of real Gemma-2's size (std about 5, near the cap of 30), rows sharing a component
        embedding = hf_model.get_output_embeddings().weight
        embedding.normal_(0, 0.6, generator=torch.Generator().manual_seed(1))
        embedding.add_(0.12 * torch.randn(embedding.shape[1], generator=torch.Generator().manual_seed(2)))
    hf_model.save_pretrained(tmp_path / "model", safe_serialization=True)
    tokenizer_for().save_pretrained(tmp_path / "model")
    tokens = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    expected = hf_model(input_ids=tokens).logits.log_softmax(-1)
    if architecture == "gemma2":
        capped = hf_model.config.final_logit_softcapping
        assert capped and hf_model(input_ids=tokens).logits.abs().max() > capped / 3  # the cap is not linear there
    loaded = load_model(architecture, tmp_path / "model", processing=dict(TL_DEFAULT_PROCESSING))
    # float32 rounding of the folded weights on log-probs near -10 (without the soft-cap rule Gemma-2 is 0.56 off)
    assert (loaded.tl(tokens).log_softmax(-1) - expected).abs().max() < 1e-3
    if architecture == "gemma2":  # folded all the same, as asked (the rest of the processing is kept)
        assert loaded.tl.cfg.normalization_type == "RMSPre"


def test_the_hub_check_says_only_what_it_can_tell(monkeypatch):
    """Refused, or unresolvable: said. Offline asked for, behind a proxy (for the endpoint's scheme, unless NO_PROXY
    names its host), or an endpoint it cannot read (no scheme, a bad port): nothing said, huggingface_hub's own error
    stands, never a traceback of ours. The same one-try check as a tracking server's (`names.unreachable_now`)."""
    import socket

    from saecomp.names import hub_unreachable

    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *proxies):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: refused
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
        assert "cannot be reached from here (ConnectionRefusedError" in hub_unreachable()
        monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")  # the endpoint's scheme goes through a proxy
        assert hub_unreachable() is None
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # ... except for this host: checked again
        assert "cannot be reached from here" in hub_unreachable()
        monkeypatch.delenv("HTTP_PROXY")
        monkeypatch.delenv("NO_PROXY")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert hub_unreachable() is None
        monkeypatch.delenv("HF_HUB_OFFLINE")
    for endpoint in ("hf-mirror.com", "https://host:abc", "http://[::1"):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        assert hub_unreachable() is None, endpoint
