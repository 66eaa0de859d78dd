"""The experiment files' own pretrained SAEs, loaded as their real runs load them: every `sae.pretrained` release of
experiments/gpt2-small.yaml and experiments/gemma-2-2b.yaml (the OpenAI v5 TopK SAEs with layer-norm inputs, the
attention SAEs in their own format, Gemma Scope's JumpReLU SAEs), through SAELens's registry, the release's loader
and `hf_hub_download`, offline from a Hugging Face cache (HF_HUB_OFFLINE=1), then fitted to and spliced into a model
under the file's Hub name. The checkpoints have the real releases' shapes with random weights (`tests/releases.py`);
the models have GPT-2 small's and Gemma-2-2B's widths (d_model, heads, head size) with two blocks, so the files'
layer is set to 1 (the releases have every layer; the sae_id templates are the files' own)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, tokenizer_for
from releases import RELEASES, wide_hf_model, write_release
from test_models import place_in_hf_cache

LAYER = 1


SCRIPT = """
import hashlib, json, math, sys
import torch
from saecomp.config import load_experiment
from saecomp.data import sae_prepends_bos, special_token_ids
from entrypoints.train_sae import build_spec
from saecomp.models import load_model
from saecomp.saes import check_sae_fits, evaluate_sae, load_sae, processing_kwargs

exp = load_experiment(sys.argv[1])
found = {}
for hook in exp.sae.hooks:
    source = exp.pretrained_source(hook, %(layer)d)
    sae = load_sae(source)
    loaded = load_model(exp.model, dtype=exp.dtype, processing=processing_kwargs(sae))
    special = special_token_ids(loaded.tokenizer)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, loaded.tl.cfg.d_vocab, (4, 16), generator=generator)
    tokens = tokens.masked_fill(torch.isin(tokens, torch.tensor(sorted(special))), 5)
    tokens[:, 0] = loaded.tokenizer.bos_token_id  # every sequence starts with BOS, left out of the metrics
    metrics = evaluate_sae(loaded.tl, sae, tokens, special_ids=special)
    found[hook] = {
        "source": source,
        "class": type(sae).__name__,
        "architecture": sae.cfg.architecture(),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "k": getattr(sae.cfg, "k", None),
        "normalize_activations": sae.cfg.normalize_activations,
        "hook_name": check_sae_fits(sae, loaded.tl),
        "reshape_activations": sae.cfg.reshape_activations,
        "digests": {name: hashlib.sha256(p.detach().float().contiguous().numpy().tobytes()).hexdigest() + str(tuple(p.shape))
                    for name, p in sae.state_dict().items()},
        "finite": all(math.isfinite(v) for v in metrics.values()),
        "prepend_bos": sae.cfg.metadata.prepend_bos,
        # what train_sae gives the SAE it trains at this hook, from the file alone
        "trained_prepend_bos": sae_prepends_bos(build_spec(exp, hook, %(layer)d, None).prepend_bos, loaded.architecture, loaded.tokenizer),
        "metrics": metrics,
    }
print("RESULT " + json.dumps(found))
"""


def digest(tensor) -> str:
    return hashlib.sha256(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest() + str(tuple(tensor.shape))


@pytest.mark.parametrize("file,architecture", [("gpt2-small.yaml", "gpt2"), ("gemma-2-2b.yaml", "gemma2")])
def test_the_experiment_files_pretrained_saes_load_offline_at_their_real_shapes_and_splice_in(tmp_path, file, architecture):
    from saecomp.config import load_experiment

    config = yaml.safe_load((ROOT / "experiments" / file).read_text())
    config.update(device="cpu", dtype="float32")
    config["sae"]["layers"] = [LAYER]
    path = tmp_path / file
    path.write_text(yaml.safe_dump(config))
    exp = load_experiment(path)
    cache = tmp_path / "hub"
    place_in_hf_cache(cache, exp.model, wide_hf_model(architecture), tokenizer_for())
    written = {}
    for seed, hook in enumerate(exp.sae.hooks):
        source = exp.pretrained_source(hook, LAYER)
        assert source["release"] in RELEASES, source  # the file names a release this test builds
        weights = write_release(cache, source["release"], source["sae_id"], LAYER, seed)
        written[hook] = {name: digest(value) for name, value in weights.items()}
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "SAECOMP_CACHE": str(tmp_path / "c")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT % {"layer": LAYER}, str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-5000:]
    found = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])
    assert set(found) == set(exp.sae.hooks) == {"attn.hook_z", "hook_mlp_out", "hook_resid_post"}
    for hook, sae in found.items():
        release = RELEASES[sae["source"]["release"]]
        assert sae["architecture"] == release.architecture, (hook, sae["class"])
        assert (sae["d_in"], sae["d_sae"], sae["k"]) == (release.d_in, release.d_sae, release.k), hook
        assert sae["normalize_activations"] == release.normalize_activations, hook  # GPT-2's v5 SAEs: layer_norm
        assert sae["hook_name"] == release.hook.format(layer=LAYER) == f"blocks.{LAYER}.{hook}"
        assert sae["reshape_activations"] == ("hook_z" if hook == "attn.hook_z" else "none"), hook
        assert sae["digests"] == written[hook], hook  # the weights written, loaded unchanged: every value in its place
        assert sae["finite"] and sae["metrics"]["l0"] > 0, (hook, sae["metrics"])
        # Core reads each SAE's windows as its metadata says (BOS first or not): the file's trained SAEs must say what
        # the pretrained ones do (SAELens: BOS first for every release here, GPT-2's included), or the trained row of a
        # hook reads other windows than the pretrained and pruned rows it is compared with.
        assert sae["prepend_bos"] is True and sae["trained_prepend_bos"] is True, (hook, sae["prepend_bos"], sae["trained_prepend_bos"])
        if release.k is not None:  # TopK: k latents fire at every ordinary token
            assert sae["metrics"]["l0"] == pytest.approx(release.k), hook
