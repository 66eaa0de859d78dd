"""publish: pruned SAEs to the Hub and back, through the real huggingface_hub client and SAELens, against a local Hub
server on loopback (tests/hub_server.py). The store is synthetic (runs with real SAELens SAEs, no compute)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from click.testing import CliRunner
from hub_server import HubServer, pointed_at
from sae_lens import SAE
from safetensors.torch import save_file

from entrypoints import publish as publish_step
from saecomp.tracking import experiment_id_for

EXPERIMENT = "publish-synthetic"
TOKEN = "hf_saecompTestToken0123456789abcdef"


def small_sae(hook_name: str, seed: int) -> SAE:
    sae = SAE.from_dict({"architecture": "topk", "d_in": 16, "d_sae": 64, "k": 4,
                         "metadata": {"hook_name": hook_name, "model_name": "tiny-gpt2+prune_llm:abc"}})  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return sae


def pruned_model_key(experiment_file: Path) -> str:
    """The key of the prune_llm run the file declares, as the pipeline (and publish's default choice) finds it."""
    from entrypoints import prune_llm
    from entrypoints.common import load

    return prune_llm.key_for(load(str(experiment_file), {}, check_device=False, reads_the_hub=False), str(experiment_file))


@pytest.fixture(scope="module")
def module_experiment(small_experiment, tmp_path_factory) -> Path:
    """The small experiment under this module's name, with a calibration seed of its own: the pruned model it declares
    (its prune_llm key) is this module's synthetic run alone, never a real run another test of the session made."""
    config = yaml.safe_load(small_experiment.read_text())
    config["name"] = EXPERIMENT
    config["calibration"] = {**config.get("calibration", {}), "seed": 4242}
    path = tmp_path_factory.mktemp("publish-file") / "publish.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory, module_experiment):
    """A prune_llm run with its checkpoint (the pruned model the module's experiment declares), and two prune_sae runs:
    hook_resid_post met its selection, hook_mlp_out did not."""
    tmp = tmp_path_factory.mktemp("publish")
    client = mlflow.MlflowClient()
    experiment_id = experiment_id_for(EXPERIMENT)
    key = pruned_model_key(module_experiment)
    tags = {"saecomp.step": "prune_llm", "saecomp.key": key, "mlflow.runName": "prune_llm · tiny-gpt2 wanda 50%"}
    llm = client.create_run(experiment_id, tags=tags)
    params = {"model": "tiny-gpt2", "method": "wanda", "sparsity": "0.5", "nm": "unstructured", "calibration.n_sequences": "128",
              "calibration.seq_len": "None", "calibration.seed": "0", "data.dataset": "tiny"}  # fmt: skip
    for key, value in params.items():
        client.log_param(llm.info.run_id, key, value)
    checkpoint = tmp / "pruned_model"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    save_file({"w": torch.zeros(4, 4)}, checkpoint / "model.safetensors")
    client.log_artifacts(llm.info.run_id, str(checkpoint), "pruned_model")
    client.set_terminated(llm.info.run_id, "FINISHED")
    saes = {}
    for seed, (hook, met) in enumerate((("hook_resid_post", True), ("hook_mlp_out", False))):
        run = client.create_run(experiment_id, tags={"saecomp.step": "prune_sae", "hook": hook, "layer": "1",
                                                     "pruned_model_run": llm.info.run_id})  # fmt: skip
        client.log_param(run.info.run_id, "method", "wanda")
        client.log_param(run.info.run_id, "pruned_model_run", llm.info.run_id)
        sae = small_sae(f"blocks.1.{hook}", seed)
        sae.save_model(str(tmp / hook / "pruned-0.25"))
        client.log_artifacts(run.info.run_id, str(tmp / hook), "saes")
        selection = {"selected": 0.25, "met": met, "metric": "mse", "rule": "tolerance", "tolerance": 0.25}
        (tmp / f"{hook}-selection").mkdir()
        (tmp / f"{hook}-selection" / "selection.json").write_text(json.dumps(selection))
        client.log_artifact(run.info.run_id, str(tmp / f"{hook}-selection" / "selection.json"))
        client.set_terminated(run.info.run_id, "FINISHED")
        saes[hook] = (run.info.run_id, sae)
    # two evaluations of the published resid SAE on the pruned model: the card shows the newest value of each metric,
    # with the standard error of the run that value comes from
    source = f"runs:/{saes['hook_resid_post'][0]}/saes/pruned-0.25"
    for metrics in ({"core.ce_loss_score": 0.5, "core.ce_loss_score.bootstrap_se": 0.01, "core.mse": 0.3},
                    {"core.ce_loss_score": 0.6, "core.mse": 0.2, "core.mse.bootstrap_se": 0.003}):  # fmt: skip
        tags = {"saecomp.step": "evaluate", "sae_source": source, "pruned_model_run": llm.info.run_id}
        evaluated = client.create_run(experiment_id, tags=tags)
        for key, value in metrics.items():
            client.log_metric(evaluated.info.run_id, key, value)
        client.set_terminated(evaluated.info.run_id, "FINISHED")
        time.sleep(0.01)  # distinct start times: the newest wins
    # prune_sae registers each level's folder in the Model Registry: publish takes such a version too
    client.create_registered_model("publish-synthetic.resid")
    run_id = saes["hook_resid_post"][0]
    client.create_model_version("publish-synthetic.resid", f"runs:/{run_id}/saes/pruned-0.25", run_id=run_id,
                                tags={"variant": "pruned", "sparsity": "0.25"})  # fmt: skip
    return {"experiment_id": experiment_id, "saes": saes, "prune_llm": llm.info.run_id}


@pytest.fixture
def experiment_file(module_experiment):
    return module_experiment


def publish(experiment_file, *args):
    return CliRunner().invoke(publish_step.main, ["--experiment", str(experiment_file), *args])


def newest_publish_run():
    client = mlflow.MlflowClient()
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs([experiment_id], "tags.`saecomp.step` = 'publish'", order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def test_dry_run_writes_the_folder_saelens_loads_and_uploads_nothing(store, experiment_file, tmp_path):
    result = publish(experiment_file, "--repo", "someone/tiny-saes", "--dry_run", "true")
    assert result.exit_code == 0, result.output
    assert "blocks.1.hook_mlp_out: the selection (mse within 0.25 of the trained SAE's) was not met" in result.output
    run = newest_publish_run()
    assert run.info.status == "FINISHED" and run.data.params["dry_run"] == "True"
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="publish", dst_path=str(tmp_path)))
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "README.md",
        "blocks.1.hook_resid_post/wanda-0.25/cfg.json",
        "blocks.1.hook_resid_post/wanda-0.25/sae_weights.safetensors",
        "saecomp.json",
    ]  # the unmet hook_mlp_out is not published unless named
    index = json.loads((folder / "saecomp.json").read_text())
    assert list(index["saes"]) == ["blocks.1.hook_resid_post/wanda-0.25"] and index["prune_llm_run"] == store["prune_llm"]
    loaded = SAE.load_from_disk(str(folder / "blocks.1.hook_resid_post/wanda-0.25"))
    original = store["saes"]["hook_resid_post"][1]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original.state_dict().items())
    assert loaded.cfg.metadata.model_name == "tiny-gpt2"  # not `tiny-gpt2+prune_llm:<run id>`
    rebuild = loaded.cfg.metadata.pruned_model["rebuild_command"]
    assert "-e prune_llm" in rebuild and "-P method=wanda" in rebuild and "-P sparsity=0.5" in rebuild
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: saelens")
    assert 'SAE.from_pretrained("someone/tiny-saes", "blocks.1.hook_resid_post/wanda-0.25")' in card
    assert store["saes"]["hook_resid_post"][0] in card and rebuild in card  # provenance and how to rebuild the model
    evaluation = card.split("## Evaluation")[1].split("\n## ")[0]
    row = next(line for line in evaluation.splitlines() if line.startswith("| `blocks.1.hook_resid_post/wanda-0.25` |"))
    assert [c.strip() for c in row.split("|")[2:4]] == ["0.6000", "0.2000 ± 0.003"]  # ce_loss_score, mse: no stale ± from the older run
    assert "± is one standard error, a bootstrap over core's test text" in card


def test_a_registered_version_publishes_its_run_folder(store, experiment_file, tmp_path):
    result = publish(experiment_file, "--repo", "someone/registered", "--dry_run", "true", "--sae", "models:/publish-synthetic.resid/1")
    assert result.exit_code == 0, result.output
    run = newest_publish_run()
    assert run.data.params["saes"] == f"runs:/{store['saes']['hook_resid_post'][0]}/saes/pruned-0.25"
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="publish", dst_path=str(tmp_path)))
    loaded = SAE.load_from_disk(str(folder / "blocks.1.hook_resid_post/wanda-0.25"))
    assert torch.equal(loaded.W_enc, store["saes"]["hook_resid_post"][1].W_enc)
    missing = publish(experiment_file, "--repo", "someone/registered", "--dry_run", "true", "--sae", "models:/publish-synthetic.resid/9")
    assert missing.exit_code == 2 and "no such registered version" in missing.output


def test_round_trip_through_the_hub_client_and_refusals(store, experiment_file, tmp_path, monkeypatch):
    named = f"runs:/{store['saes']['hook_mlp_out'][0]}/saes/pruned-0.25"
    with HubServer(token=TOKEN) as hub, pointed_at(hub, tmp_path / "hf_cache"):
        monkeypatch.delenv("HF_TOKEN", raising=False)
        refused = publish(experiment_file, "--repo", "someone/tiny-saes")
        assert refused.exit_code == 2 and "no Hugging Face token" in refused.output
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        first = publish(experiment_file, "--repo", "someone/tiny-saes", "--sae", named, "--with_model", "true")
        assert first.exit_code == 0, first.output
        assert hub.is_private("someone/tiny-saes") and hub.is_private("someone/tiny-saes-pruned-model")
        assert "model.safetensors" in hub.files("someone/tiny-saes-pruned-model")
        assert "blocks.1.hook_mlp_out/wanda-0.25/sae_weights.safetensors" in hub.commits("someone/tiny-saes")[-1].lfs_paths  # as LFS
        run = newest_publish_run()
        assert run.data.tags["saecomp.hub.repo"] == "someone/tiny-saes" and len(run.data.tags["saecomp.hub.commit"]) == 40

        # back through the real client: SAELens's own from_pretrained, and saecomp's <repo>:<sae_id> source
        from saecomp.saes import load_sae

        sae_id = "blocks.1.hook_mlp_out/wanda-0.25"
        loaded = SAE.from_pretrained("someone/tiny-saes", sae_id)
        original = store["saes"]["hook_mlp_out"][1]
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original.state_dict().items())
        assert loaded.cfg.metadata.pruned_model["repo"] == "someone/tiny-saes-pruned-model"
        assert torch.equal(load_sae(f"someone/tiny-saes:{sae_id}").W_dec, original.W_dec)
        assert "named explicitly" in hub.files("someone/tiny-saes")["README.md"].decode()

        # a second publish that would replace an SAE's files is refused before anything is uploaded
        resid = f"runs:/{store['saes']['hook_resid_post'][0]}/saes/pruned-0.25"
        both = f"{named},{resid}"
        commits = len(hub.commits("someone/tiny-saes"))
        again = publish(experiment_file, "--repo", "someone/tiny-saes", "--sae", both)
        assert again.exit_code == 2 and "already has blocks.1.hook_mlp_out/wanda-0.25/cfg.json" in again.output
        assert "overwrite=true" in again.output and len(hub.commits("someone/tiny-saes")) == commits
        assert "blocks.1.hook_resid_post/wanda-0.25/cfg.json" not in hub.files("someone/tiny-saes")

        # another SAE of the same pruned model joins the repository: the card and index list both, the first stays
        added = publish(experiment_file, "--repo", "someone/tiny-saes", "--sae", resid)
        assert added.exit_code == 0, added.output
        files = hub.files("someone/tiny-saes")
        index = json.loads(files["saecomp.json"])
        assert sorted(index["saes"]) == ["blocks.1.hook_mlp_out/wanda-0.25", "blocks.1.hook_resid_post/wanda-0.25"]
        card = files["README.md"].decode()
        assert "`blocks.1.hook_mlp_out/wanda-0.25`" in card and "`blocks.1.hook_resid_post/wanda-0.25`" in card
        assert "named explicitly" in card  # what the first publish said of hook_mlp_out is kept
        assert torch.equal(SAE.from_pretrained("someone/tiny-saes", sae_id).W_dec, original.W_dec)
        # a card someone edited is theirs: the next publish would need overwrite=true to rewrite it
        from huggingface_hub import HfApi

        from saecomp.publish import published_index

        assert published_index("someone/tiny-saes")["card_edited"] is False
        HfApi().upload_file(path_or_fileobj=card.encode() + b"\nOur own note.\n", path_in_repo="README.md", repo_id="someone/tiny-saes")
        assert published_index("someone/tiny-saes")["card_edited"] is True
        commits = len(hub.commits("someone/tiny-saes"))

        # overwrite=true replaces an SAE's files (and the edited card)
        replaced = publish(experiment_file, "--repo", "someone/tiny-saes", "--sae", both, "--overwrite", "true")
        assert replaced.exit_code == 0, replaced.output
        assert "README.md was edited since saecomp wrote it" in replaced.output and "replacing README.md" in replaced.output
        assert len(hub.commits("someone/tiny-saes")) == commits + 1
        assert "blocks.1.hook_resid_post/wanda-0.25/sae_weights.safetensors" in hub.files("someone/tiny-saes")

        assert "Our own note." not in hub.files("someone/tiny-saes")["README.md"].decode()
        assert published_index("someone/tiny-saes")["card_edited"] is False

        # without the token the private repo does not exist for the client
        monkeypatch.delenv("HF_TOKEN")
        from huggingface_hub.errors import RepositoryNotFoundError

        with pytest.raises(RepositoryNotFoundError):
            HfApi().model_info("someone/tiny-saes")

    # the token is in no param, tag, artifact or output of any run
    client = mlflow.MlflowClient()
    for run in client.search_runs([store["experiment_id"]]):
        assert TOKEN not in json.dumps({**run.data.params, **run.data.tags})
        folder = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / run.info.run_id)))
        for path in folder.rglob("*"):
            assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path
    assert all(TOKEN not in result.output for result in (first, again, added, replaced))


def test_bad_input_is_refused_before_any_run(store, experiment_file):
    before = newest_publish_run()
    unmet = store["saes"]["hook_mlp_out"][0]
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # the test session runs offline (conftest): a real publish is refused up front
    offline = publish(experiment_file, "--repo", "a/b")
    assert offline.exit_code == 2 and "HF_HUB_OFFLINE=1 forbids the Hub; valid: unset HF_HUB_OFFLINE" in offline.output
    for args, message in (
        (["--repo", "no-slash"], "repo='no-slash' is not valid; valid: <user or org>/<name>"),
        ([], "repo is required; valid: --repo <user or org>/<name> (-P repo=... under mlflow run)"),
        (["--repo", "a/b", "--dry_run", "maybe"], "dry_run='maybe' is not valid; valid: true or false"),
        (["--repo", "a/b", "--dry_run", "true", "--sae", "runs:/abc/sae"], "valid: runs:/<prune_sae run id>/saes/pruned-<level>"),
        (["--repo", "a/b", "--dry_run", "true", "--sae", f"runs:/{store['prune_llm']}/saes/pruned-0.25"], "not a finished prune_sae run"),
        (["--repo", "a/b", "--dry_run", "true", "--sae", f"runs:/{unmet}/saes/pruned-0.9"], "has no such SAE"),
        (["--repo", "a/b", "--dry_run", "true", "--sae", f"runs:/{unmet}/saes/pruned-0.25," * 2], "name one sae_id twice"),
    ):
        result = publish(experiment_file, *args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    after = newest_publish_run()
    assert (before.info.run_id if before else None) == (after.info.run_id if after else None)


def test_the_default_choice_takes_the_pruned_model_the_file_declares(store, experiment_file, tmp_path):
    """One card describes one pruned model. With sweeps of several pruned models in the store (the file's pruning changed
    since, say), the default takes the cells of the model the file declares, even where another model's sweep of the same
    cell is newer. The file's key holds the code too: where it finds no model with sweeps, a model whose logged settings
    are the file's is taken (made by other code), and said; with several others and none alike, it names them and how
    to choose; with one, it takes that one, and says so."""
    from entrypoints import prune_llm
    from entrypoints.common import load

    client = mlflow.MlflowClient()
    experiment_id = store["experiment_id"]
    added = []

    def pruned_model(key: str, params: dict) -> str:
        run = client.create_run(experiment_id, tags={"saecomp.step": "prune_llm", "saecomp.key": key})
        for name, value in params.items():
            client.log_param(run.info.run_id, name, value)
        client.set_terminated(run.info.run_id, "FINISHED")
        added.append(run.info.run_id)
        return run.info.run_id

    def sweep_on(model: str, seed: int) -> str:  # a newer sweep of the store's hook_resid_post cell, on ``model``
        run = client.create_run(experiment_id, tags={"saecomp.step": "prune_sae", "hook": "hook_resid_post", "layer": "1",
                                                     "pruned_model_run": model})  # fmt: skip
        added.append(run.info.run_id)
        client.log_param(run.info.run_id, "pruned_model_run", model)
        small_sae("blocks.1.hook_resid_post", seed).save_model(str(tmp_path / str(seed) / "pruned-0.25"))
        client.log_artifacts(run.info.run_id, str(tmp_path / str(seed)), "saes")
        (tmp_path / "selection.json").write_text(json.dumps({"selected": 0.25, "met": True, "metric": "mse", "tolerance": 0.25}))
        client.log_artifact(run.info.run_id, str(tmp_path / "selection.json"))
        client.set_terminated(run.info.run_id, "FINISHED")
        time.sleep(0.01)  # distinct start times
        return run.info.run_id

    try:
        other = pruned_model("another pruning", {"model": "tiny-gpt2"})
        newer = sweep_on(other, 99)
        result = publish(experiment_file, "--repo", "someone/declared", "--dry_run", "true")
        assert result.exit_code == 0, result.output
        run = newest_publish_run()
        assert run.data.params["saes"] == f"runs:/{store['saes']['hook_resid_post'][0]}/saes/pruned-0.25"
        folder = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="publish", dst_path=str(tmp_path)))
        assert json.loads((folder / "saecomp.json").read_text())["prune_llm_run"] == store["prune_llm"]

        config = yaml.safe_load(experiment_file.read_text())
        config["llm_pruning"] = {**config.get("llm_pruning", {}), "sparsity": 0.3}  # a pruned model no run has made
        changed = tmp_path / "changed.yaml"
        changed.write_text(yaml.safe_dump(config))
        refused = publish(changed, "--repo", "someone/declared", "--dry_run", "true")
        assert refused.exit_code == 2, refused.output
        assert f"no pruned model with the settings {changed} declares has a finished prune_sae run" in refused.output
        assert f"2 other pruned models (prune_llm runs {', '.join(sorted([store['prune_llm'], other]))})" in refused.output
        assert "name the SAEs with sae=runs:/<prune_sae run>/saes/pruned-<level>" in refused.output
        assert newest_publish_run().info.run_id == run.info.run_id  # refused before any run

        # that model, made by other code (another key): recognised by the settings it logged
        settings = prune_llm.logged_settings(load(str(changed), {}, check_device=False, reads_the_hub=False))
        recoded = pruned_model("the same settings, older code", settings)
        by_settings = sweep_on(recoded, 7)
        taken = publish(changed, "--repo", "someone/declared", "--dry_run", "true")
        assert taken.exit_code == 0, taken.output
        assert f"taking the sweeps on prune_llm run {recoded}: it has the pruning settings {changed} declares" in taken.output
        assert newest_publish_run().data.params["saes"] == f"runs:/{by_settings}/saes/pruned-0.25"

        for run_id in (newer, by_settings):  # the store's sweeps are all on one model again, not the file's: taken, and said
            client.delete_run(run_id)
        taken = publish(changed, "--repo", "someone/declared", "--dry_run", "true")
        assert taken.exit_code == 0, taken.output
        assert f"taking the store's sweeps, all on one pruned model (prune_llm run {store['prune_llm']})" in taken.output
        assert newest_publish_run().data.params["saes"] == run.data.params["saes"]
    finally:
        for run_id in added:
            if client.get_run(run_id).info.lifecycle_stage != "deleted":
                client.delete_run(run_id)


def real_files_sae(kind: str) -> SAE:
    """Small SAEs of the kinds the real experiment files publish: GPT-2's v5 TopK with layer-norm inputs (here at
    hook_z, reshaping heads, as a TopK SAE trained there would), GPT-2's kk standard SAE at hook_z, and Gemma Scope's
    JumpReLU (thresholds, no b_dec subtraction at the input), with a BOS-first metadata."""
    from sae_lens import JumpReLUSAEConfig, StandardSAEConfig, TopKSAEConfig

    hook_z = {"hook_name": "blocks.1.attn.hook_z", "model_name": "gpt2+prune_llm:abc", "prepend_bos": True, "context_size": 128}
    configs = {
        "topk-layer-norm-hook-z": TopKSAEConfig(d_in=16, d_sae=64, k=4, normalize_activations="layer_norm", reshape_activations="hook_z"),
        "standard-hook-z": StandardSAEConfig(d_in=16, d_sae=64, reshape_activations="hook_z"),
        "jumprelu-gemma-scope": JumpReLUSAEConfig(d_in=16, d_sae=64, apply_b_dec_to_input=False),
    }
    metadata = hook_z if kind != "jumprelu-gemma-scope" else {**hook_z, "hook_name": "blocks.1.hook_resid_post"}
    sae = SAE.from_dict({**configs[kind].to_dict(), "metadata": metadata})
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * (0.01 if name == "threshold" else 0.3))
        sae.W_dec[: sae.cfg.d_sae // 4] = 0  # pruned latents
    return sae


@pytest.mark.parametrize("kind", ["topk-layer-norm-hook-z", "standard-hook-z", "jumprelu-gemma-scope"])
def test_the_real_files_sae_kinds_come_back_from_the_hub_as_they_were(tmp_path, kind):
    """What `publish` stages for the real files' SAEs (layer-norm inputs, hook_z's head reshaping, JumpReLU thresholds,
    BOS-first windows) is what `SAE.from_pretrained` gives back from the Hub: the same class, configuration and outputs."""
    from huggingface_hub import HfApi

    from saecomp.publish import PublishedSAE, stage

    sae = real_files_sae(kind)
    sae.save_model(str(tmp_path / "sae"))
    sae_id = f"{sae.cfg.metadata.hook_name}/wanda-0.25"
    pruned_model = {"base_model": "gpt2", "method": "wanda", "sparsity": 0.5, "rebuild_command": "mlflow run . -e prune_llm ..."}
    stage([PublishedSAE(tmp_path / "sae", sae_id, pruned_model, {"git_commit": "0" * 40})], "someone/kinds", tmp_path / "staged", "gpt2")
    with HubServer(token=TOKEN) as hub, pointed_at(hub, tmp_path / "hf_cache", token=TOKEN):
        api = HfApi()
        api.create_repo("someone/kinds", private=True)
        api.upload_folder(repo_id="someone/kinds", folder_path=str(tmp_path / "staged"))
        loaded = SAE.from_pretrained("someone/kinds", sae_id)
    assert type(loaded) is type(sae)
    for field in ("normalize_activations", "reshape_activations", "apply_b_dec_to_input", "d_in", "d_sae"):
        assert getattr(loaded.cfg, field) == getattr(sae.cfg, field), field
    assert getattr(loaded.cfg, "k", None) == getattr(sae.cfg, "k", None)
    assert (loaded.cfg.metadata.hook_name, loaded.cfg.metadata.prepend_bos, loaded.cfg.metadata.context_size) == (
        sae.cfg.metadata.hook_name, True, 128)  # fmt: skip
    assert loaded.cfg.metadata.model_name == "gpt2"  # the base model's Hub id, not the run-local name
    assert set(loaded.state_dict()) == set(sae.state_dict())
    assert all(torch.equal(loaded.state_dict()[name], value) for name, value in sae.state_dict().items())
    shape = (3, 5, 4, 4) if sae.cfg.reshape_activations == "hook_z" else (3, 5, 16)  # [batch, pos, heads, d_head]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    assert torch.equal(loaded(x), sae(x))


def test_the_card_says_which_level_was_selected_and_rebuilds_a_model_pruned_on_some_layers():
    """A level named explicitly that is not the sweep's selection is never called "selection met"; a model pruned on
    some blocks only is rebuilt with prune_llm's own `--layers` syntax (MLflow logged the list as `[0, 1]`, which
    the shell splits and prune_llm refuses) and the card says which blocks."""
    from saecomp.publish import PublishedSAE, model_card, rebuild_command

    logged = {"model": "gpt2", "method": "wanda", "sparsity": "0.5", "nm": "unstructured", "llm_pruning.layers": "[0, 1]",
              "calibration.n_sequences": "128", "calibration.seq_len": "None", "dtype": "float32"}  # fmt: skip
    command = rebuild_command("experiments/gpt2-small.yaml", logged)
    assert "-P layers=0,1 " in command and "[" not in command
    assert "-P layers" not in rebuild_command("experiments/gpt2-small.yaml", {**logged, "llm_pruning.layers": "None"})
    # a run from before `layers: []` was refused pruned no block: never published as a pruned model of "every block"
    with pytest.raises(ValueError, match="pruned no block"):
        rebuild_command("experiments/gpt2-small.yaml", {**logged, "llm_pruning.layers": "[]"})
    pruned_model = {"base_model": "gpt2", "method": "wanda", "sparsity": "0.5", "nm": "unstructured", "calibration": "128 sequences",
                    "rebuild_command": command, "layers": [0, 1]}  # fmt: skip
    selection = {"selected": 0.25, "met": True}
    saes = [PublishedSAE(None, f"blocks.1.hook_resid_post/wanda-{level}", pruned_model, {"git_commit": "0" * 40}, selection)
            for level in ("0.25", "0.5")]  # fmt: skip
    card = model_card(saes, "someone/saes", "gpt2")
    rows = {line.split("|")[1].strip(): line for line in card.splitlines() if line.startswith("| `blocks.1")}
    assert "| yes |" in rows["`blocks.1.hook_resid_post/wanda-0.25`"]
    assert "not the selected level (0.25; published because named explicitly)" in rows["`blocks.1.hook_resid_post/wanda-0.5`"]
    assert "on the attention and MLP weights of blocks 0, 1 only" in card
