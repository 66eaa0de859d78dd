"""The SAE path as the real experiment files meet it: layer-norm SAEs over many chunks, rescaled TopK SAEs,
BOS and special tokens, disjoint text pools, streamed training, and the paper's code reproduced faithfully."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import random_hf_model, tokenizer_for
from sae_lens import SAE, TopKSAEConfig

from saecomp.data import DocumentPool, TokenStream, document_plan, iter_documents, load_documents, sae_tokens, special_token_mask
from saecomp.models import load_model, save_checkpoint
from saecomp.prune_llm import PruneSpec, prune_model
from saecomp.prune_sae import cache_activations, evaluate_cached, prune_sae, sae_statistics
from saecomp.saes import evaluate_sae, reconstruction_metrics


def topk_sae(d_in=32, d_sae=64, k=4, hook="blocks.1.hook_resid_post", seed=0, **extra) -> SAE:
    sae = SAE.from_dict(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, **extra).to_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.1 if name.startswith("b") else 1.0))
    sae.cfg.metadata.hook_name = hook
    return sae


# --- 1. a layer-norm SAE decodes what it just encoded, whatever the batching ----------------------------


def test_layer_norm_sae_over_many_chunks_measures_what_the_whole_model_would(small_world):
    model = load_model("tiny-gpt2", small_world / "tiny-gpt2").tl
    sae = topk_sae(normalize_activations="layer_norm")
    tokens = torch.randint(0, 1000, (6, 64), generator=torch.Generator().manual_seed(3))
    cache = cache_activations(model, "blocks.1.hook_resid_post", tokens, batch_size=4)
    cached = evaluate_cached(model, sae, cache, batch_size=2)  # 384 tokens in three spliced batches
    full = evaluate_sae(model, sae, tokens, batch_size=4)  # in two
    for key, value in full.items():
        assert cached[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    stats = sae_statistics(sae, cache.ordinary_activations(), batch_size=100)
    assert torch.isfinite(stats.recon_norm).all()


# --- 2. one plain form for statistics, masks and saving ---------------------------------------------------


def test_rescaled_topk_sae_gets_the_masks_of_wanda_on_its_plain_form():
    sae = topk_sae(d_sae=128, k=8, rescale_acts_by_decoder_norm=True)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.2, 5.0, 128)[:, None])  # uneven decoder norms
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.2, 5.0, 32)
    source = {name: value.clone() for name, value in sae.state_dict().items()}
    pruned = prune_sae(sae, sae_statistics(sae, x), 0.5, "wanda")
    # the source keeps its weights and its rescaling: the plain form is folded into copies only
    assert sae.cfg.rescale_acts_by_decoder_norm and all(torch.equal(sae.state_dict()[n], v) for n, v in source.items())
    # Independent reference: fold the decoder norms by hand, then WANDA by its definition.
    with torch.no_grad():
        norms = sae.W_dec.norm(dim=1)  # [d_sae]
        W_enc, b_enc, W_dec = sae.W_enc * norms, sae.b_enc * norms, sae.W_dec / norms[:, None]
        sae_in = x - sae.b_dec
        pre = sae_in @ W_enc + b_enc
        top = pre.topk(8, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        expected = {}
        for name, weight, input_norm in (("W_enc", W_enc, sae_in.double().norm(dim=0)), ("W_dec", W_dec, acts.double().norm(dim=0))):
            score = weight.abs().double() * input_norm[:, None]
            k = score.shape[0] // 2
            expected[name] = torch.zeros_like(score, dtype=torch.bool).scatter_(0, score.argsort(dim=0, stable=True)[:k], True)
    assert torch.equal(pruned.W_enc == 0, expected["W_enc"])
    assert torch.equal(pruned.W_dec == 0, expected["W_dec"])
    # ...and the saved form computes what the masked plain form computes.
    assert not pruned.cfg.rescale_acts_by_decoder_norm


# --- 3. BOS and special tokens ------------------------------------------------------------------------------


def test_special_tokens_are_never_spliced_or_measured(small_world):
    loaded = load_model("tiny-gemma2", small_world / "tiny-gemma2")
    model, bos, eos = loaded.tl, loaded.tokenizer.bos_token_id, loaded.tokenizer.eos_token_id
    tokens = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(4))
    tokens[:, 0] = bos
    tokens[2, 10] = eos
    sae = topk_sae(hook="blocks.1.hook_resid_post")
    metrics = evaluate_sae(model, sae, tokens, special_ids={bos, eos})
    # Reference: the reconstruction metrics of ordinary positions only.
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
    x = cache["blocks.1.hook_resid_post"][special_token_mask(tokens, {bos, eos})]
    with torch.no_grad():
        expected = reconstruction_metrics(x, sae.decode(sae.encode(x)))
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6), key
    assert metrics["mse"] != pytest.approx(evaluate_sae(model, sae, tokens)["mse"], rel=1e-3)
    # The splice keeps the model's own activations at BOS and EOS, and replaces them everywhere else.
    from saecomp.saes import ordinary_positions, splice

    spliced = splice(sae, cache["blocks.1.hook_resid_post"], ordinary_positions(tokens, {bos, eos}))
    assert torch.equal(spliced[:, 0], cache["blocks.1.hook_resid_post"][:, 0])
    assert torch.equal(spliced[2, 10], cache["blocks.1.hook_resid_post"][2, 10])
    assert not torch.equal(spliced[:, 1], cache["blocks.1.hook_resid_post"][:, 1])


def test_windows_start_with_bos_where_the_model_was_trained_with_it(small_experiment, small_world):
    from saecomp.config import load_experiment

    exp = load_experiment(small_experiment)
    tokenizer = load_model("tiny-gemma2", small_world / "tiny-gemma2").tokenizer
    with_bos = sae_tokens(exp, tokenizer, 32, True, small_world)
    without = sae_tokens(exp, tokenizer, 32, False, small_world)
    for tokens in (with_bos.calibration, with_bos.validation, with_bos.test):
        assert (tokens[:, 0] == tokenizer.bos_token_id).all() and tokens.shape[1] == 32
    # Without BOS the windows are the plain stream: the text of the BOS windows, one token shorter each.
    assert not (without.validation[:, 0] == tokenizer.bos_token_id).all()
    assert torch.equal(with_bos.validation[0, 1:], without.validation[0, :-1])


# --- 4. disjoint documents ------------------------------------------------------------------------------------


def one_split_dataset(folder, n_documents=400, words=60):
    """A local dataset with a single `train` split (as OpenWebText has), read by the real `load_dataset`;
    every word of document i says i, so any window tells where it came from."""
    import datasets

    texts = [" ".join(f"d{i}x{j}" for j in range(words)) for i in range(n_documents)]
    (folder / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


def doc_ids(tokenizer, windows) -> set[int]:
    text = lambda window: "".join(tokenizer.convert_ids_to_tokens(list(window))).replace("\u0120", " ")  # noqa: E731  (byte-level)
    return {int(m) for window in windows for m in re.findall(r"d(\d+)x", text(window))}


def one_split_experiment(folder, documents=50):
    from saecomp.config import load_experiment

    path = folder / "one-split.yaml"
    path.write_text(
        f"name: one-split\nmodel: gpt2\ndata: {{dataset: {folder}, split: train, heldout_split: train, test_split: train}}\n"
        f"calibration: {{documents: {documents}, n_sequences: 8}}\nheld_out: {{documents: {documents}, n_sequences: 4}}\n"
    )
    return load_experiment(path)


def test_calibration_validation_test_and_training_text_never_overlap_on_one_split(tmp_path):
    folder = one_split_dataset(tmp_path / "owt")
    exp = one_split_experiment(folder)
    plan = document_plan(exp)
    tokenizer = tokenizer_for()
    tokens = sae_tokens(exp, tokenizer, 24, True, seed_documents=8)
    seen = {
        "calibration": doc_ids(tokenizer, tokens.calibration.tolist()) | doc_ids(tokenizer, [d.tolist() for d in tokens.seed_documents]),
        "validation": doc_ids(tokenizer, tokens.validation.tolist()),
        "test": doc_ids(tokenizer, tokens.test.tolist()),
    }
    stream = TokenStream(plan["sae_train"], tokenizer, 24, True)
    seen["sae_train"] = doc_ids(tokenizer, [row["input_ids"] for _, row in zip(range(200), stream, strict=False)])
    roles = list(seen)
    for i, a in enumerate(roles):
        assert seen[a], a
        for b in roles[i + 1 :]:
            assert not seen[a] & seen[b], (a, b, sorted(seen[a] & seen[b])[:5])
    assert max(seen["calibration"]) < 50 <= min(seen["validation"]) and max(seen["test"]) < 150 <= min(seen["sae_train"])


@pytest.mark.parametrize("name", ["tiny", "gpt2-small", "gemma-2-2b"])
def test_the_experiment_files_pools_are_disjoint(name):
    from conftest import ROOT

    from saecomp.config import load_experiment

    plan = document_plan(load_experiment(ROOT / "experiments" / f"{name}.yaml"))
    pools = list(plan.values())
    assert not any(a.overlaps(b) for i, a in enumerate(pools) for b in pools[i + 1 :])
    assert plan["sae_train"].stop is None  # the training stream is everything after the held-out pools


def test_pools_overlap_only_on_the_same_split():
    a = DocumentPool("x", "train", "text", 0, 10)
    assert a.overlaps(DocumentPool("x", "train", "text", 9, None)) and not a.overlaps(DocumentPool("x", "train", "text", 10, None))
    assert not a.overlaps(DocumentPool("x", "test", "text", 0, 10))


# --- 5. streamed SAE training repeats nothing -------------------------------------------------------------


def test_the_training_stream_reads_past_the_pools_and_repeats_nothing(tmp_path):
    folder = one_split_dataset(tmp_path / "owt", n_documents=300)
    exp = one_split_experiment(folder, documents=20)  # 60 documents in pools, 240 in the stream
    tokenizer = tokenizer_for()
    stream = TokenStream(document_plan(exp)["sae_train"], tokenizer, 32, False)
    windows = [tuple(row["input_ids"]) for row in stream]
    assert len(windows) == len(set(windows))
    assert doc_ids(tokenizer, windows) == set(range(60, 300))
    assert stream.passes == 1 and stream.tokens == 32 * len(windows)
    with pytest.raises(ValueError, match="ran out after 1 pass"):
        next(iter(stream))  # a second pass is an error unless sae.max_passes allows it
    assert list(iter_documents(DocumentPool(str(folder), "train", "text", 298, None)))[0].startswith("d298x0")


def test_streamed_training_consumes_fresh_text_once(small_experiment, small_world):
    from saecomp.config import load_experiment
    from saecomp.models import NO_PROCESSING_KWARGS
    from saecomp.train_sae import SAETrainingSpec, train_sae

    exp = load_experiment(small_experiment)
    loaded = load_model("tiny-gpt2", small_world / "tiny-gpt2")
    delivered = []

    class Recording(TokenStream):
        def __iter__(self):
            for row in super().__iter__():
                delivered.append(tuple(row["input_ids"]))
                yield row

    plan = document_plan(exp)
    stream = Recording(plan["sae_train"], loaded.tokenizer, 64, False, small_world)
    spec = SAETrainingSpec(
        hook="hook_resid_post", layer=1, k=4, expansion_factor=2, training_tokens=4096, batch_size_tokens=512, context_size=64
    )
    work = small_world.parent / "stream-training"
    train_sae(spec, loaded.tl, stream, "tiny", NO_PROCESSING_KWARGS, work / "checkpoints", work / "sae")
    assert stream.passes == 1 and stream.tokens >= spec.training_tokens
    # SAELens peeks at the first row through an iterator it drops, then reads on: nothing else repeats.
    assert delivered[0] == delivered[1] and len(set(delivered[1:])) == len(delivered) - 1
    calibration_text = {tuple(w) for w in sae_tokens(exp, loaded.tokenizer, 64, False, small_world).calibration.tolist()}
    first_stream_doc = load_documents(
        DocumentPool("tiny", "train", "text", plan["sae_train"].start, plan["sae_train"].start + 1), small_world
    )[0]
    assert loaded.tokenizer.decode(list(delivered[1][:5])) in first_stream_doc
    assert not calibration_text & set(delivered)


# --- 6. wanda-seed, deviation by deviation ------------------------------------------------------------------


def seed_wanda(W, X_norm, sparse_ratio):
    # Transcribed from osu-srml/sae-compression @ 2e94071, gpt2-small/prune.py lines 56-63.
    W_metric = W.abs() * X_norm
    _, sorted_idx = W_metric.sort(dim=1)
    pruned_idx = sorted_idx[:, : int(W.shape[1] * sparse_ratio)]
    W_clone = W.detach().clone()
    W_clone.scatter_(dim=1, index=pruned_idx, src=torch.zeros_like(pruned_idx, dtype=W.dtype))
    return W_clone


# The seed's weight -> hook maps: gpt2-small/prune.py lines 66-73; gemma2b/prune.py lines 40-49 (grouped K/V).
SEED_MAP_GPT2 = {
    "attn.W_Q": "attn.hook_q",
    "attn.W_K": "attn.hook_k",
    "attn.W_V": "attn.hook_v",
    "attn.W_O": "hook_attn_out",
    "mlp.W_in": "mlp.hook_pre",
    "mlp.W_out": "hook_mlp_out",
}
SEED_MAP_GEMMA = {**SEED_MAP_GPT2, "attn._W_K": "attn.hook_k", "attn._W_V": "attn.hook_v"}
del SEED_MAP_GEMMA["attn.W_K"], SEED_MAP_GEMMA["attn.W_V"]


@torch.no_grad()
def seed_prune(model, tokens, wts_act, sparse_ratio=0.5):
    # Transcribed from osu-srml/sae-compression @ 2e94071, gpt2-small/prune.py lines 74-92 (the loop per layer).
    for layer in range(model.cfg.n_layers):
        logits, cache = model.run_with_cache(tokens, remove_batch_dim=True)
        for wt, act in wts_act.items():
            W = model.get_parameter(f"blocks.{layer}.{wt}")
            X = cache[f"blocks.{layer}.{act}"]
            if W.dim() == 3:
                if "W_O" in wt:
                    X_norm = X.norm(p=2, dim=0)
                    for head in range(W.shape[0]):
                        W[head] = seed_wanda(W[head], X_norm, sparse_ratio=sparse_ratio)
                else:
                    for head in range(W.shape[0]):
                        X_norm = X[:, head, :].norm(p=2, dim=0)
                        W[head] = seed_wanda(W[head], X_norm, sparse_ratio=sparse_ratio)
            else:
                X_norm = X.norm(p=2, dim=0)
                W = seed_wanda(W, X_norm, sparse_ratio=sparse_ratio)  # noqa: F841  (the seed's rebinding bug, kept)


def test_wanda_seed_equals_a_transcription_of_the_seed_loop_on_processed_gpt2(tmp_path):
    from saecomp.prune_llm import pruning_processing

    hf = random_hf_model("gpt2", dtype=torch.float64)
    hf.save_pretrained(tmp_path / "gpt2")
    tokenizer_for().save_pretrained(tmp_path / "gpt2")
    processing = pruning_processing("wanda-seed", "GPT2LMHeadModel")
    assert processing and processing["fold_ln"] and processing["center_writing_weights"]
    tokens = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(5))
    reference = load_model("gpt2", tmp_path / "gpt2", dtype=torch.float64, processing=processing).tl
    seed_prune(reference, tokens, SEED_MAP_GPT2)
    ours = load_model("gpt2", tmp_path / "gpt2", dtype=torch.float64, processing=processing)
    prune_model(ours.tl, tokens, PruneSpec("wanda-seed", 0.5))
    for layer in range(2):
        for name in ("attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "mlp.W_in", "mlp.W_out"):
            expected = reference.get_parameter(f"blocks.{layer}.{name}")
            got = ours.tl.get_parameter(f"blocks.{layer}.{name}")
            assert torch.equal(got == 0, expected == 0), (layer, name)
    # Per head: every (head, input row) of W_Q holds int(d_head * 0.5) zeros, not just every input row.
    assert torch.all((ours.tl.blocks[0].attn.W_Q == 0).sum(-1) == 4)
    # Saved with its processing recorded: reloading neither re-processes nor refills the zeros.
    save_checkpoint(ours, tmp_path / "pruned", processing)
    again = load_model("gpt2", tmp_path / "pruned", dtype=torch.float64, processing=processing)
    assert torch.equal(again.tl.blocks[1].attn.W_O == 0, ours.tl.blocks[1].attn.W_O == 0)
    check = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(6))
    log_probs = lambda logits: logits.log_softmax(-1)  # noqa: E731  (centring the unembedding shifts logits only)
    assert torch.allclose(log_probs(again.tl(check)), log_probs(ours.tl(check)), atol=1e-8)
    assert torch.allclose(log_probs(again.hf(input_ids=check).logits), log_probs(ours.tl(check)), atol=1e-8)


def test_wanda_seed_scores_gemma_w_o_by_hook_attn_out_after_ln1_post(tmp_path):
    hf = random_hf_model("gemma2", dtype=torch.float64)
    with torch.no_grad():
        for block in hf.model.layers:  # make ln1_post matter: uneven post-attention gains
            block.post_attention_layernorm.weight.copy_(torch.linspace(-0.9, 3.0, 32))
    hf.save_pretrained(tmp_path / "g")
    tokenizer_for().save_pretrained(tmp_path / "g")
    tokens = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(5))
    reference = load_model("google/gemma-2-2b", tmp_path / "g", dtype=torch.float64).tl
    ours = load_model("google/gemma-2-2b", tmp_path / "g", dtype=torch.float64)
    seed_prune(reference, tokens, SEED_MAP_GEMMA)
    prune_model(ours.tl, tokens, PruneSpec("wanda-seed", 0.5))
    for layer in range(2):
        for name in ("attn.W_Q", "attn._W_K", "attn._W_V", "attn.W_O", "mlp.W_in", "mlp.W_gate", "mlp.W_out"):
            expected = reference.get_parameter(f"blocks.{layer}.{name}")
            assert torch.equal(ours.tl.get_parameter(f"blocks.{layer}.{name}") == 0, expected == 0), (layer, name)


# --- 7. the GPT-2 experiment's path, end to end, offline ---------------------------------------------------


@pytest.mark.parametrize(
    "file,architecture,hook,normalize",
    [("gpt2-small.yaml", "gpt2", "hook_resid_post", "layer_norm"), ("gemma-2-2b.yaml", "gemma2", "attn.hook_z", "none")],
)
def test_prune_sae_runs_the_experiment_files_own_releases_on_their_hub_models(tmp_path, file, architecture, hook, normalize):
    """The experiment file itself, with only its sizes, data, device and layer changed: its Hub model read from a
    Hugging Face cache layout (HF_HUB_OFFLINE=1) at the real model's widths, a one-split local dataset read by
    `load_dataset` (the Hub's OpenWebText and Pile cannot be cached for `datasets` offline here), and the pretrained
    SAE the file names at that hook, built at its real shape by `tests/releases.py` and loaded through SAELens's
    registry: GPT-2's `gpt2-small-resid-post-v5-32k` (TopK, 32,768 latents, layer-norm inputs) and Gemma-2-2B's
    `gemma-scope-2b-pt-att-canonical` (JumpReLU over 8 heads x 256, every sequence opening with BOS; the model in the
    file's bfloat16). prune_llm runs first, then the sweep, all through the entry point; the pruned SAEs keep their
    normalisation and reshaping."""
    import json
    import os
    import subprocess
    import sys

    import mlflow
    import yaml
    from conftest import ROOT
    from releases import RELEASES, wide_hf_model, write_release
    from test_models import place_in_hf_cache

    config = yaml.safe_load((ROOT / "experiments" / file).read_text())
    model, release = config["model"], config["sae"]["pretrained"][hook]
    place_in_hf_cache(tmp_path / "hub", model, wide_hf_model(architecture), tokenizer_for())
    write_release(tmp_path / "hub", release["release"], release["sae_id"].format(layer=1), layer=1)
    shape = RELEASES[release["release"]]
    assert shape.normalize_activations == normalize
    data = str(one_split_dataset(tmp_path / "text", n_documents=200, words=30))
    trained = topk_sae(d_in=shape.d_in, d_sae=1536, k=32, hook=f"blocks.1.{hook}", seed=1, normalize_activations=normalize,
                       reshape_activations="hook_z" if hook == "attn.hook_z" else "none")  # fmt: skip
    trained.cfg.metadata.context_size = 32
    trained.save_model(str(tmp_path / "trained"))
    config.update(name=f"hub-{architecture}", device="cpu", sae_pruning={**config["sae_pruning"], "sparsities": [0.25, 0.5, 0.9]})
    config["data"]["dataset"] = data
    config["calibration"] = {**config["calibration"], "dataset": data, "documents": 30, "n_sequences": 8, "seq_len": 32}
    config["held_out"] = {"documents": 30, "n_sequences": 4, "seq_len": 32}
    config["sae"] = {**config["sae"], "hooks": [hook], "layers": [1], "context_size": 32}
    (tmp_path / file).write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "SAECOMP_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "entrypoints.prune_sae", "--experiment", str(tmp_path / file), "--trained", str(tmp_path / "trained")]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(f"hub-{architecture}")  # the experiment file's name
    runs = {r.data.tags["saecomp.step"]: r for r in client.search_runs([experiment.experiment_id]) if "saecomp.step" in r.data.tags}
    assert {"prune_llm", "prune_sae"} <= set(runs) and all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["prune_llm"].data.params["dtype"] == config.get("dtype", "float32")  # Gemma: the file's bfloat16
    metrics = runs["prune_sae"].data.metrics
    assert all(torch.isfinite(torch.tensor(metrics[f"test.{v}.mse"])) for v in ("pretrained", "pruned25", "pruned50", "trained"))
    assert metrics["test.pruned50.mse"] != metrics["test.pretrained.mse"]
    folder = client.download_artifacts(runs["prune_sae"].info.run_id, "saes/pruned-0.5", str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "pruned-0.5" / "cfg.json").read_text())
    assert cfg["normalize_activations"] == normalize and cfg["reshape_activations"] == ("hook_z" if hook == "attn.hook_z" else "none")
    pruned = SAE.load_from_disk(folder)
    assert pruned.cfg.metadata.model_name.startswith(f"{model}+prune_llm:")
    assert (pruned.cfg.architecture(), pruned.cfg.d_in, pruned.cfg.d_sae) == (shape.architecture, shape.d_in, shape.d_sae)
    assert float((pruned.W_enc == 0).float().mean()) >= 0.5  # the release's encoder, pruned to half


def seed_compute_norms(model, sae, hook_name, loader):
    # Transcribed from osu-srml/sae-compression @ 2e94071, gpt2-small/prune_sae.py lines 61-72, with the SAE's
    # own hooks standing in for `run_with_cache_with_saes` (the SAE is spliced at the hook; its cache is the same).
    norms = {"enc": [], "dec": []}
    for batch in loader:
        _, cache = model.run_with_cache(batch, names_filter=hook_name)
        _, sae_cache = sae.run_with_cache(cache[hook_name])
        for kind in ("enc", "dec"):
            key = "hook_sae_acts_pre" if kind == "enc" else "hook_sae_recons"
            X = sae_cache[key].reshape(-1, sae_cache[key].shape[-1])  # einops "b h d -> (b h) d"
            norms[kind].append(X.norm(p=2, dim=0))
    return {kind: torch.stack(n).mean(dim=0) for kind, n in norms.items()}


def test_seed_sae_statistics_are_the_seed_codes(small_world):
    from saecomp.prune_sae import seed_sae_statistics

    model = load_model("tiny-gpt2", small_world / "tiny-gpt2").tl
    sae = topk_sae(normalize_activations="layer_norm")
    generator = torch.Generator().manual_seed(7)
    documents = [torch.randint(1, 1000, (int(n),), generator=generator) for n in torch.randint(5, 64, (20,), generator=generator)]
    # The seed's loader: batches of 8, right-padded with token 0 (its collate_fn, lines 77-79), no attention mask.
    loader = [torch.nn.utils.rnn.pad_sequence(documents[i : i + 8], batch_first=True, padding_value=0) for i in range(0, 20, 8)]
    expected = seed_compute_norms(model, sae, "blocks.1.hook_resid_post", loader)
    stats = seed_sae_statistics(model, sae, "blocks.1.hook_resid_post", documents)
    assert torch.allclose(stats.preact_norm.float(), expected["enc"], rtol=1e-5)
    assert torch.allclose(stats.recon_norm.float(), expected["dec"], rtol=1e-5)


def test_pretrained_sources_fill_in_the_layer():
    from saecomp.config import Experiment

    exp = Experiment()
    exp.sae.pretrained = {
        "hook_resid_post": {"release": "r", "sae_id": "layer_{layer}/width_16k/canonical"},
        "attn.hook_z": "runs:/x/{layer}",
    }
    assert exp.pretrained_source("hook_resid_post", 7) == {"release": "r", "sae_id": "layer_7/width_16k/canonical"}
    assert exp.pretrained_source("attn.hook_z", 3) == "runs:/x/3" and exp.pretrained_source("hook_mlp_out", 3) is None
