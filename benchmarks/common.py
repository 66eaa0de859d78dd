"""What every benchmark shares: the model shapes (random weights, no download), the machine record written
beside every figure, and a peak-memory meter (torch's allocator on a GPU, RSS growth on CPU)."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

GPT2_LIKE = dict(act_fn="gelu_new", normalization_type="LN")
SHAPES = {
    "tiny": dict(n_layers=4, d_model=128, n_heads=4, d_head=32, d_mlp=512, n_ctx=128, d_vocab=4096, **GPT2_LIKE),
    "gpt2-small": dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024, d_vocab=50257, **GPT2_LIKE),
    "gemma-2-2b": "gemma-2-2b",  # built through saecomp's own Gemma-2 config path, below
}
# google/gemma-2-2b's config.json, the fields saecomp's converter reads.
GEMMA_2_2B = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    query_pre_attn_scalar=256,
    sliding_window=4096,
    final_logit_softcapping=30.0,
    attn_logit_softcapping=50.0,
    rope_theta=10000.0,
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(shape: str, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> HookedTransformer:
    """A TransformerLens model of the named shape with random weights, on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    if shape == "gemma-2-2b":
        from transformers import Gemma2Config

        from saecomp.models import _gemma2_tl_config

        cfg = _gemma2_tl_config(Gemma2Config(**GEMMA_2_2B), DTYPES[dtype])
    else:
        cfg = HookedTransformerConfig(**SHAPES[shape], dtype=DTYPES[dtype])
    cfg.device = device
    return HookedTransformer(cfg, move_to_device=True).eval()


LIBRARIES = ("torch", "transformers", "transformer-lens", "sae-lens", "sae-bench", "mlflow", "mlflow-skinny")


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine() -> dict:
    """Where a figure was measured: absolute times count only from a GPU named here."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "versions": {n: package_version(n) for n in LIBRARIES},
        "python": platform.python_version(),
    }


def write_json(path: str | Path | None, record: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=2, default=str) + "\n")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory over a block of code: torch's allocator peak on CUDA (absolute: weights included), or the
    growth of the resident set on CPU, sampled every millisecond by a thread."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self._start = rss_bytes()
        self._running = True
        self._highest = self._start

        def sample():
            while self._running:
                self._highest = max(self._highest, rss_bytes())
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._running = False
            self._thread.join()
            self.peak = max(self._highest, rss_bytes()) - self._start  # growth only
        return False


def timed(fn, device: str) -> float:
    """Wall seconds of ``fn()``, synchronising the GPU around it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started
