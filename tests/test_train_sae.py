"""train_sae: SAELens training on the pruned or dense model, streamed to MLflow; SAE sources; bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import mlflow
import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT
from infrastructure import without_session_step_server
from sae_lens import SAE, StandardSAEConfig

from entrypoints import train_sae as train_sae_step
from saecomp.models import ModelDims, load_model
from saecomp.saes import evaluate_sae, load_sae, processing_kwargs
from saecomp.train_sae import CHECKPOINT_COMPLETE, SAETrainingSpec, buffer_batches, check_spec, latest_checkpoint, runner_config

SMALL_TRAINING = ["--training_tokens", "30000", "--batch_size_tokens", "512", "--context_size", "64", "--expansion_factor", "4"]


def runs_of(step):
    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.`saecomp.step` = '{step}'")
    return sorted(runs, key=lambda r: r.info.start_time)


@pytest.fixture(scope="module")
def trained_runs(small_experiment):
    """A dense-model ('pretrained') resid SAE and a pruned-model ('trained') hook_z SAE, via the CLI."""
    ids = {}
    for hook, base in (("hook_resid_post", "dense"), ("attn.hook_z", "pruned")):
        args = ["--experiment", str(small_experiment), "--hook", hook, "--layer", "1", "--base", base, *SMALL_TRAINING]
        result = CliRunner().invoke(train_sae_step.main, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        ids[hook] = runs_of("train_sae")[-1].info.run_id
    return ids


def local_sae(run_id) -> SAE:
    return SAE.load_from_disk(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="sae"))


def test_run_logs_params_stream_and_final_metrics(trained_runs):
    client = mlflow.MlflowClient()
    run = client.get_run(trained_runs["hook_resid_post"])
    assert run.info.status == "FINISHED"
    assert {"hook": "hook_resid_post", "layer": "1", "architecture": "topk", "variant": "pretrained"}.items() <= run.data.params.items()
    assert {"explained_variance", "l0", "dead_fraction", "ce_loss_with_sae", "tokens_per_second"} <= set(run.data.metrics)
    history = client.get_metric_history(run.info.run_id, "losses/overall_loss")
    assert len(history) >= 8 and len({m.step for m in history}) == len(history)
    assert history[-1].value < history[0].value


def test_trained_sae_loads_splices_and_beats_an_untrained_one(trained_runs, small_world):
    sae = local_sae(trained_runs["hook_resid_post"])
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert sae.cfg.metadata.model_name == "tiny-gpt2"
    model = load_model("tiny-gpt2", small_world / "tiny-gpt2", processing=processing_kwargs(sae))
    tokens = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(3))
    trained = evaluate_sae(model.tl, sae, tokens)
    untrained = SAE.from_dict({**sae.cfg.to_dict()})
    untrained_metrics = evaluate_sae(model.tl, untrained, tokens)
    assert trained["mse"] < 0.5 * untrained_metrics["mse"]
    assert trained["cossim"] > untrained_metrics["cossim"] + 0.1
    assert 0 < trained["l0"] <= sae.cfg.k


def test_hook_z_sae_attaches_to_attn_hook_z_of_the_pruned_model(trained_runs):
    run = mlflow.MlflowClient().get_run(trained_runs["attn.hook_z"])
    assert run.data.params["variant"] == "trained"
    prune_run = run.data.params["pruned_model_run"]
    sae = local_sae(run.info.run_id)
    assert sae.cfg.metadata.hook_name == "blocks.1.attn.hook_z"
    assert sae.cfg.reshape_activations == "hook_z"
    assert sae.cfg.metadata.model_name == f"tiny-gpt2+prune_llm:{prune_run}"
    assert sae.cfg.metadata.model_from_pretrained_kwargs == {
        "fold_ln": False,
        "center_writing_weights": False,
        "center_unembed": False,
        "fold_value_biases": False,
    }
    pruned_dir = mlflow.artifacts.download_artifacts(run_id=prune_run, artifact_path="pruned_model")
    model = load_model("tiny-gpt2", pruned_dir)
    assert (model.tl.blocks[0].mlp.W_in == 0).float().mean() == 0.5
    assert sae.cfg.d_in == model.tl.cfg.n_heads * model.tl.cfg.d_head
    metrics = evaluate_sae(model.tl, sae, torch.randint(0, 1000, (2, 64)))
    assert metrics["ce_loss_with_sae"] != metrics["ce_loss_without_sae"]  # it really was spliced in


def test_registered_with_tags(trained_runs):
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name = 'small.tiny-gpt2.blocks.1.attn.hook_z'")
    assert versions
    tags = versions[0].tags
    assert tags["variant"] == "trained" and tags["hook"] == "attn.hook_z" and tags["layer"] == "1"
    assert tags["pruned_model_run"] and tags["base_model"] == "tiny-gpt2"
    sae = load_sae(f"models:/small.tiny-gpt2.blocks.1.attn.hook_z/{versions[0].version}")
    assert sae.cfg.metadata.hook_name == "blocks.1.attn.hook_z"
    # Stored once: the registered version is the run's own `sae/` folder, not a copy.
    run = client.get_run(versions[0].run_id)
    assert versions[0].source == f"{run.info.artifact_uri}/sae"
    assert not client.search_logged_models([run.info.experiment_id])


def test_key_tells_dense_and_pruned_bases_and_settings_apart(small_experiment):
    from entrypoints.common import load
    from entrypoints.train_sae import build_spec, key_for

    exp = load(str(small_experiment), {"sae.training_tokens": 30000})
    spec = build_spec(exp, "hook_resid_post", 1, None)
    dense = key_for(exp, str(small_experiment), spec, "tiny-gpt2", None)
    assert dense == key_for(exp, str(small_experiment), spec, "tiny-gpt2", None)
    assert dense != key_for(exp, str(small_experiment), spec, "tiny-gpt2+prune_llm:x", None)
    other = build_spec(load(str(small_experiment), {"sae.training_tokens": 40000}), "hook_resid_post", 1, None)
    assert dense != key_for(exp, str(small_experiment), other, "tiny-gpt2", None)
    # WANDA's calibration windows do not reach a dense SAE; the pools do, where they move its training or validation text
    for field, value, same in (("calibration.seed", 7, True), ("calibration.n_sequences", 12, True), ("calibration.batch_size", 2, True),
                               ("calibration.documents", 900, False), ("held_out.documents", 500, False),
                               ("held_out.n_sequences", 6, False), ("data.heldout_split", "train", False)):  # fmt: skip
        changed = load(str(small_experiment), {"sae.training_tokens": 30000, field: value})
        assert (key_for(changed, str(small_experiment), spec, "tiny-gpt2", None) == dense) is same, field


def test_like_copies_a_pretrained_configuration(trained_runs, small_experiment):
    from entrypoints.common import load
    from entrypoints.train_sae import build_spec

    pretrained = local_sae(trained_runs["attn.hook_z"])
    exp = load(str(small_experiment), {"sae.architecture": "standard", "sae.context_size": 32})
    spec = build_spec(exp, "hook_resid_post", 0, pretrained)
    assert (spec.architecture, spec.hook, spec.layer, spec.d_sae, spec.context_size) == (
        "topk",
        "attn.hook_z",
        1,
        pretrained.cfg.d_sae,
        64,
    )


BAD = [
    (["--architecture", "gated2"], "architecture='gated2' is not valid; valid: standard, topk, batchtopk, jumprelu"),
    (["--k", "999"], "k=999 is not valid for d_sae=256; valid: 1..256"),
    (["--training_tokens", "100", "--batch_size_tokens", "512"], "training_tokens=100 is fewer than one batch"),
    (["--layer", "5"], "layer=5 is outside the model; valid: 0..1"),
    (["--hook", "hook_resid_pre"], "hook='hook_resid_pre' is not valid"),
    (["--context_size", "4096"], "context_size=4096 is not valid; valid: 2..64"),
    (["--base", "0123456789abcdef"], "base='0123456789abcdef' is not valid"),
    # each names the field given, not its neighbours (d_sae=0 once fell through to expansion_factor * d_in)
    (["--expansion_factor", "0"], "expansion_factor=0 is not valid; valid: a whole number of at least 1 (d_sae = expansion_factor × d_in"),
    (["--d_sae", "0"], "d_sae=0 is not valid; valid: a whole number of at least 1"),
    (["--learning_rate", "-1"], "learning_rate=-1.0 is not valid; valid: a positive number"),
    (["--batch_size_tokens", "0"], "batch_size_tokens=0 is not valid; valid: a whole number of at least 1"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_rejected_before_training(small_experiment, args, message):
    before = len(runs_of("train_sae"))
    result = CliRunner().invoke(
        train_sae_step.main, ["--experiment", str(small_experiment), "--expansion_factor", "8", "--context_size", "64", *args]
    )
    assert result.exit_code == 2, result.output
    assert f"saecomp: error: {message}" in result.output
    assert len(runs_of("train_sae")) == before


def test_like_rejects_an_sae_whose_width_does_not_match_the_hook(small_experiment, tmp_path):
    wrong = SAE.from_dict(StandardSAEConfig(d_in=48, d_sae=96).to_dict())
    wrong.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    wrong.save_model(str(tmp_path / "wrong"))
    result = CliRunner().invoke(train_sae_step.main, ["--experiment", str(small_experiment), "--like", str(tmp_path / "wrong")])
    assert result.exit_code == 2
    assert "saecomp: error: the SAE's d_in=48 does not match blocks.1.hook_resid_post, whose width is 32" in result.output


def test_buffer_always_holds_a_batch():
    dims = ModelDims(n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=1024, d_mlp=64, architecture="GPT2LMHeadModel")
    for context_size, batch in ((8, 4096), (128, 4096), (1024, 8192), (16, 100_000)):
        spec = SAETrainingSpec("hook_resid_post", 0, context_size=context_size, batch_size_tokens=batch, training_tokens=10 * batch)
        check_spec(spec, dims)
        assert buffer_batches(spec) * context_size >= batch


def test_runner_config_is_what_was_asked(small_world):
    model = load_model("tiny-gpt2", small_world / "tiny-gpt2").tl
    spec = SAETrainingSpec("attn.hook_z", 1, architecture="jumprelu", d_sae=64, sparsity_coefficient=2.0, context_size=32)
    cfg = runner_config(spec, model, "m", {"fold_ln": False}, "/tmp/x", "d")
    assert cfg.hook_name == "blocks.1.attn.hook_z" and cfg.sae.d_in == 32 and cfg.sae.d_sae == 64
    assert cfg.sae.reshape_activations == "hook_z" and cfg.sae.l0_coefficient == 2.0
    assert cfg.model_from_pretrained_kwargs == {"fold_ln": False}
    assert cfg.logger.log_to_wandb is False


def test_release_loads_offline_from_the_hf_cache(tmp_path):
    """`SAE.from_pretrained(release, sae_id)` through SAELens's registry and `hf_hub_download`, offline."""
    sae = SAE.from_dict(StandardSAEConfig(d_in=32, d_sae=64).to_dict())
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_pre"
    repo = tmp_path / "hub" / "models--jbloom--GPT2-Small-SAEs-Reformatted"
    snapshot = repo / "snapshots" / ("a" * 40)
    sae.save_model(str(snapshot / "blocks.0.hook_resid_pre"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    torch.save(sae.W_enc.detach().clone(), tmp_path / "W_enc.pt")
    script = f"""
import torch
from saecomp.saes import load_sae, processing_kwargs
sae = load_sae({{"release": "gpt2-small-res-jb", "sae_id": "blocks.0.hook_resid_pre"}})
assert type(sae).__name__ == "StandardSAE", type(sae)
assert torch.equal(sae.W_enc, torch.load({str(tmp_path / "W_enc.pt")!r}))
assert processing_kwargs(sae)["center_writing_weights"] is True   # the release's config override
print("ok", sae.cfg.d_sae)
"""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["ok", "64"]


def test_sae_sources_parse():
    from saecomp.saes import SAESource

    assert SAESource.parse({"release": "r", "sae_id": "a/b"}).release == "r"
    assert SAESource.parse("runs:/abc/sae").uri == "runs:/abc/sae"
    assert SAESource.parse("gemma-scope-2b-pt-res-canonical:layer_12/width_16k/canonical").sae_id == "layer_12/width_16k/canonical"
    with pytest.raises(ValueError, match="is not valid"):
        SAESource.parse("no-such-thing")
    with pytest.raises(ValueError, match="'/nonexistent/sae' is no folder here; valid: a SAELens folder"):
        SAESource.parse("/nonexistent/sae")  # missing, not malformed


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-gemma2"])
def test_a_killed_training_continues_from_its_last_checkpoint(small_experiment, trained_runs, session_dir, model):
    """SIGTERM after the first complete checkpoint, then the same command: it continues from that checkpoint, never
    from a torn one, and leaves no checkpoint behind. Also on Gemma-2, whose windows start with BOS, which the
    training leaves out of its activations."""
    import signal
    import time

    import yaml

    experiment = small_experiment
    if model != "tiny-gpt2":  # the same world and sizes, another of its models
        experiment = session_dir / f"small-{model}.yaml"
        experiment.write_text(yaml.safe_dump({**yaml.safe_load(small_experiment.read_text()), "model": model}))
    args = [
        sys.executable,
        "-m",
        "entrypoints.train_sae",
        "--experiment",
        str(experiment),
        "--hook",
        "hook_mlp_out",
        "--layer",
        "0",
        "--base",
        "dense",
        "--training_tokens",
        "400000",
        "--batch_size_tokens",
        "512",
        "--context_size",
        "64",
        "--max_passes",  # the small world holds ~60k training tokens: go round it (a named choice, never silent)
        "10",
    ]
    env = without_session_step_server(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")  # killed by pid
    checkpoints = session_dir / "checkpoints" / "train_sae"
    # The session's checkpoint folder is shared with other tests' steps (a step of a killed pipeline can leave its own
    # behind, and one still closing can write another): this test watches only the checkpoints its own training writes,
    # under a key folder (<key>/<SAELens run>/<samples>) that was not there before.
    before, keys_before = set(checkpoints.glob("*/*/[0-9]*")), set(checkpoints.glob("*"))
    runs_before = {r.info.run_id for r in runs_of("train_sae")}

    def complete_checkpoints():
        marked = checkpoints.glob(f"*/*/[0-9]*/{CHECKPOINT_COMPLETE}")
        return {p.parent for p in marked if p.parents[2] not in keys_before} - before

    log = session_dir / f"killed-training-{model}.log"
    with open(log, "w") as stderr:  # a file, not a pipe: a full pipe would stall the child
        process = subprocess.Popen(args, cwd=ROOT, env=env, stderr=stderr)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not complete_checkpoints():
        time.sleep(0.2)
    assert process.poll() is None, log.read_text()[-3000:]
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    assert process.returncode != 0
    (killed,) = [r for r in runs_of("train_sae") if r.info.run_id not in runs_before]
    assert killed.info.status == "FAILED", (process.returncode, log.read_text()[-3000:])
    saved = sorted(complete_checkpoints(), key=lambda p: int(p.name))
    assert saved and int(saved[-1].name) < 400000
    for folder in saved:  # nothing (SAELens's interruption save included) wrote into a checkpoint after its marker
        marked = (folder / CHECKPOINT_COMPLETE).stat().st_mtime_ns
        assert all(f.stat().st_mtime_ns <= marked for f in folder.iterdir()), folder
    # A checkpoint whose writing was cut short (SAELens writes file by file; a step can die between two), further on
    # than the complete ones: never resumed from.
    torn = saved[-1].parent / str(int(saved[-1].name) + 512)
    shutil.copytree(saved[-1], torn)
    (torn / "activation_scaler.json").unlink()
    (torn / CHECKPOINT_COMPLETE).unlink()
    assert latest_checkpoint(checkpoints / saved[-1].parent.parent.name) == saved[-1]

    finished = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    resumed = runs_of("train_sae")[-1]
    assert resumed.info.status == "FINISHED"
    assert int(resumed.data.tags["saecomp.resumed_from_samples"]) == int(saved[-1].name)
    assert resumed.data.params["model"] == model
    assert not list(checkpoints.glob(f"{saved[-1].parent.parent.name}/*/[0-9]*")), "checkpoints of a finished run are left behind"


@pytest.mark.parametrize(
    "architecture, normalization",
    [("topk", "none"), ("jumprelu", "layer_norm"), ("standard", "expected_average_only_in")],
)
def test_a_layers_hooks_sharing_one_forward_train_bit_identical_saes(small_world, tmp_path, architecture, normalization):
    """`SharedForward`: the first training of a layer records every hook's activations per batch of tokens, the others
    read them instead of running the model, and each SAE is bit for bit the one its own forward passes give. On what
    gemma-2-2b.yaml meets: BOS first in every window and left out of the training activations, hook_z reshaped; with
    the architectures and input normalisations of the real experiment files (gemma-2-2b.yaml's JumpReLU, gpt2-small's
    layer norm) and SAELens's norm estimate, which draws its own batches from the store before training."""
    from datasets import Dataset

    from saecomp.data import DocumentPool, held_out_tokens, iter_documents, special_token_ids
    from saecomp.models import NO_PROCESSING_KWARGS
    from saecomp.train_sae import SharedForward, store_tokens, train_sae

    loaded = load_model("tiny-gemma2", small_world / "tiny-gemma2")
    tokens = held_out_tokens(iter_documents(DocumentPool("tiny", "train", "text", 0, None), small_world), loaded.tokenizer, 400, 64, True)
    assert (tokens[:, 0] == loaded.tokenizer.bos_token_id).all()
    rows = Dataset.from_dict({"input_ids": tokens.tolist()})
    special = sorted(special_token_ids(loaded.tokenizer))
    # Where the norm estimate reads 1,000 batches before training: batches of 128 tokens (2 windows, not 8), two hooks.
    estimated = normalization == "expected_average_only_in"
    batch_size_tokens = 128 if estimated else 512
    hooks = ("attn.hook_z", "hook_resid_post") if estimated else ("attn.hook_z", "hook_mlp_out", "hook_resid_post")
    spec_of = lambda hook: SAETrainingSpec(
        hook, 1, architecture=architecture, normalize_activations=normalization, training_tokens=6000,
        batch_size_tokens=batch_size_tokens, context_size=64, expansion_factor=2, n_checkpoints=0,
    )  # fmt: skip

    def trained(hook: str, shared: SharedForward | None, name: str) -> dict:
        spec = spec_of(hook)
        sae, _ = train_sae(spec, loaded.tl, rows, "tiny-gemma2", NO_PROCESSING_KWARGS, tmp_path / name / "checkpoints",
                           tmp_path / name / "sae", prepend_bos=True, special_ids=special, shared_forward=shared)  # fmt: skip
        return sae.state_dict()

    alone = {hook: trained(hook, None, f"alone-{hook}") for hook in hooks}
    through_store = store_tokens(spec_of("attn.hook_z"))  # what the disk must hold: the norm estimate's batches too
    assert through_store == 6000 + (1000 * batch_size_tokens if estimated else 0)
    shared, why_not = SharedForward.open(tmp_path / "shared", loaded.tl, "tiny-gemma2 dense", 1, hooks, through_store)
    assert why_not is None
    first = trained("attn.hook_z", shared, "shared-hook_z")
    computed = shared.computed
    assert computed > 0
    if not estimated:
        assert shared.read == 0  # (the norm estimate's 1,000 batches cycle through the 400 windows, and meet some again)
    later = {hook: trained(hook, shared, f"shared-{hook}") for hook in hooks[1:]}
    assert shared.computed == computed and shared.read > 0  # the later hooks ran the model for no batch
    assert len(list(shared.folder.glob("*.pt"))) == computed and not list(shared.folder.glob("*.partial"))
    for hook, state in (("attn.hook_z", first), *later.items()):
        assert state.keys() == alone[hook].keys()
        assert all(torch.equal(state[name], alone[hook][name]) for name in state), hook
    assert not torch.equal(later["hook_resid_post"]["W_dec"], first["W_dec"])  # each read its own hook

    # Activations that cannot fit the disk are not shared (and nothing is written).
    refused, why_not = SharedForward.open(tmp_path / "other", loaded.tl, "tiny-gemma2 dense", 1, hooks, 10**15)
    assert refused is None and "GB free" in why_not


def test_a_checkpoint_saved_after_the_run_was_closed_is_never_resumed_from(tmp_path):
    """A step whose run was closed under it (its launcher died) trains on for a few seconds: a checkpoint it saves then
    must stay unfinished, or it outlives the rerun that deleted the folder and a later run resumes from it (seen in CI)."""
    from saecomp.train_sae import save_checkpoint_marked

    saved = []

    def runner_save(checkpoint_path):  # SAELens's runner-side part: the last file of a checkpoint
        saved.append(checkpoint_path)
        (checkpoint_path / "activations_store_state.safetensors").write_text("")

    open_run = {"open": True}
    save = save_checkpoint_marked(runner_save, still_wanted=lambda: open_run["open"])
    root = tmp_path / "ckpts" / "abc"
    first, later = root / "512", root / "1024"
    first.mkdir(parents=True)
    later.mkdir()
    save(first)
    open_run["open"] = False  # the run is closed as KILLED
    save(later)
    assert saved == [first]
    assert (first / CHECKPOINT_COMPLETE).exists() and not (later / CHECKPOINT_COMPLETE).exists()
    assert latest_checkpoint(tmp_path / "ckpts") == first


class _Stopped(BaseException):
    """What the test's own SIGTERM handler raises (a step's is `tracking._Terminated`, also no `Exception`)."""


def test_a_training_leaves_the_steps_signal_handlers_in_place_and_a_sigterm_reaches_them(small_world, tmp_path):
    """SAELens's runner installs its own SIGINT/SIGTERM handlers for good, which raise an `Exception` any `except
    Exception` swallows, in place of the step's (Ctrl-C's KeyboardInterrupt, `kill`'s counted exit): `train_sae` must
    leave the handlers it found in place during the fit and after it, so a SIGTERM mid-training reaches the step's."""
    import os
    import signal

    from datasets import Dataset

    from saecomp.data import DocumentPool, held_out_tokens, iter_documents
    from saecomp.models import NO_PROCESSING_KWARGS
    from saecomp.train_sae import train_sae

    loaded = load_model("tiny-gpt2", small_world / "tiny-gpt2")
    tokens = held_out_tokens(iter_documents(DocumentPool("tiny", "train", "text", 0, None), small_world), loaded.tokenizer, 100, 32, False)
    rows = Dataset.from_dict({"input_ids": tokens.tolist()})
    spec = SAETrainingSpec(
        "hook_resid_post", 1, training_tokens=2048, batch_size_tokens=256, context_size=32, expansion_factor=2, n_checkpoints=0
    )
    steps = []

    def stop(signum, frame):
        raise _Stopped(signum)

    def on_metrics(step, metrics):
        steps.append(step)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    # uninterrupted: the handlers it found are the ones it leaves
    train_sae(spec, loaded.tl, rows, "tiny-gpt2", NO_PROCESSING_KWARGS, tmp_path / "a" / "ckpt", tmp_path / "a" / "sae", log_every=1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(_Stopped):  # SAELens's handler would raise its InterruptedException (an Exception) instead
            train_sae(spec, loaded.tl, rows, "tiny-gpt2", NO_PROCESSING_KWARGS, tmp_path / "b" / "ckpt", tmp_path / "b" / "sae",
                      on_metrics=on_metrics, log_every=1)  # fmt: skip
        assert signal.getsignal(signal.SIGTERM) is stop and signal.getsignal(signal.SIGINT) == before[0]
        assert len(steps) == 2 and not (tmp_path / "b" / "sae").exists()  # stopped at the step it was told to stop at
    finally:
        signal.signal(signal.SIGTERM, previous)
