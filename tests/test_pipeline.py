"""The whole experiment file as one pipeline: every step once, then nothing but reuse."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner

from entrypoints import pipeline
from saecomp.config import load_experiment
from saecomp.tracking import PROCESS_TAG

ROOT = Path(__file__).resolve().parents[1]


def step_runs(step):
    client = mlflow.MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.`saecomp.step` = '{step}'")


def test_pipeline_runs_every_step_then_reuses_them(small_experiment):
    # Two cells at a time: the parallel path builds what the sequential one reuses below.
    first = CliRunner().invoke(pipeline.main, ["--experiment", str(small_experiment), "--jobs", "2"], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "SAEs on the pruned model (test tokens: " in first.output
    counts = {step: len(step_runs(step)) for step in ("build_world", "prune_llm", "train_sae", "prune_sae", "evaluate", "compare")}
    run = sorted(step_runs("pipeline"), key=lambda r: r.info.start_time)[-1]
    # compare's report, built from the store, is among the pipeline run's artifacts; its Table 1 is the evaluations'
    report = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="compare")
    exact = {"float_precision": "round_trip"}  # pandas' default float parser can miss the last digit of what it wrote
    cells = pd.read_csv(f"{report}/cells.csv", keep_default_na=False, **exact)
    assert os.path.exists(f"{report}/report.html") and set(cells.loc[cells["table"] == "table1", "status"]) == {"ok"}
    summary = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="summary.csv"))
    assert set(summary["hook"]) == {"blocks.1.attn.hook_z", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"}
    assert {"pretrained", "pruned25", "pruned50", "trained"} <= set(summary["variant"])
    assert summary[["mse", "explained_variance", "cossim", "ce_loss_with_sae"]].notna().all().all()
    # SAEBench core for the four variants at every hook, on the pruned model: the paper's Table 1.
    assert "SAEBench core on the pruned model" in first.output
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="evaluation.csv"), **exact)
    assert len(table) >= 12 and {"pretrained", "pruned25", "pruned50", "trained"} <= set(table["variant"])
    assert table[["core.ce_loss_score", "core.kl_div_score", "core.explained_variance_centred"]].notna().all().all()
    mse = cells[(cells["table"] == "table1") & (cells["metric"] == "mse")].set_index(["hook", "variant"])["value"].astype(float)
    for _, row in table.iterrows():
        assert mse[(row["hook"], row["variant"])] == row["core.mse"]

    # Browsable: the steps sit in the experiment named after the file, nested under the pipeline run that made them.
    client = mlflow.MlflowClient()
    used = json.loads(open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="runs.json")).read())
    assert set(used) == {"prune_llm", "prune_sae", "evaluate"} and len(used["prune_sae"]) == 3 and len(used["evaluate"]) >= 12
    # each cell's selected level says whether it met the selection rule (publish leaves out one that did not)
    met = {f"blocks.1.{r.data.params['hook']}": bool(r.data.metrics["selection_met"]) for r in map(client.get_run, used["prune_sae"])}
    assert all(met[row.hook] == row.selection_met for row in summary.itertuples()), summary[["hook", "selection_met"]]
    for child in [client.get_run(run_id) for run_id in used["prune_sae"] + used["evaluate"]]:
        assert client.get_experiment(child.info.experiment_id).name == "small"
        assert child.data.tags["mlflow.runName"].startswith(("prune_sae · blocks.1.", "evaluate · blocks.1."))
    reused_by_first = set(client.get_run(run.info.run_id).data.tags.get("saecomp.reused_runs", "").split(","))
    for run_id in {r for runs in table["runs"] for r in runs.split(",")}:
        assert client.get_run(run_id).data.tags.get("mlflow.parentRunId") == run.info.run_id or run_id in reused_by_first
    # The hooks' trainings on each model shared its forward passes (train_sae --shared_forward): where the layer's first
    # hook was trained by this pipeline (earlier tests may have trained some of these SAEs already), it computed them,
    # and the other hooks' trainings on that model, started once it was done, only read them.
    trainings = [r for r in step_runs("train_sae") if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
    pattern = r"(\d+) batches of activations read from .*, (\d+) computed"
    tags = {(r.data.params["base_model"], r.data.params["hook"]): r.data.tags["saecomp.shared_forward"] for r in trainings}
    shared = {cell: tuple(map(int, re.match(pattern, tag).groups())) for cell, tag in tags.items()}
    first_hook = load_experiment(small_experiment).sae.hooks[0]
    models = {model for model, hook in shared if hook == first_hook}
    assert models, shared  # (earlier tests train only hook_resid_post's SAEs of this experiment)
    for (model, hook), (read, computed) in shared.items():
        if model in models:
            assert (read == 0 and computed > 0) if hook == first_hook else (read > 0 and computed == 0), shared
    made_here = [r for r in step_runs("evaluate") if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
    # Started by MLflow as always, computed by children of the pipeline's warm step server (no imports per step).
    assert made_here and all(r.data.tags[PROCESS_TAG].startswith("forked by the step server") for r in made_here)

    # The rerun, as `mlflow run .` starts it (its own interpreter): all reused, and no model library imported to find
    # that out (torch and TransformerLens were most of a cached run's time: saecomp/names.py).
    checked = (
        "import sys\n"
        "from entrypoints import pipeline\n"
        "try:\n"
        f"    pipeline.main(['--experiment', {str(small_experiment)!r}])\n"
        "except SystemExit as stop:\n"
        "    heavy = sorted({name.split('.')[0] for name in sys.modules} & set(sys.argv[1:]))\n"
        "    print(f'exit {stop.code}; model libraries imported: {heavy}')\n"
    )
    heavy = ["torch", "transformer_lens", "transformers", "sae_lens", "sae_bench", "datasets"]
    second = subprocess.run([sys.executable, "-c", checked, *heavy], cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = second.stdout + second.stderr
    assert "exit 0; model libraries imported: []" in output, output
    assert {step: len(step_runs(step)) for step in counts} == counts, "a finished step ran again"
    assert "reusing finished prune_sae run" in output
    rerun = sorted(step_runs("pipeline"), key=lambda r: r.info.start_time)[-1]
    assert set(rerun.data.tags["saecomp.reused_runs"].split(",")) >= {r.info.run_id for r in made_here}


def test_adding_a_suite_runs_that_suite_alone(small_experiment, tmp_path):
    """Each suite is reused by its own key: with SCR added, the pipeline starts evaluate runs for SCR only, and its
    table joins them with the core results it already had. The variants share SCR's model side (computed once)."""
    import yaml

    config = yaml.safe_load(small_experiment.read_text())
    config["sae"]["hooks"] = ["hook_resid_post"]  # one cell (the first test's, reused if it ran)
    path = tmp_path / "one_hook.yaml"
    path.write_text(yaml.safe_dump(config))
    assert CliRunner().invoke(pipeline.main, ["--experiment", str(path)], catch_exceptions=False).exit_code == 0
    before = {r.info.run_id for r in step_runs("evaluate")}
    config["evaluation"]["suites"] = ["core", "scr"]
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(pipeline.main, ["--experiment", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    new = [r for r in step_runs("evaluate") if r.info.run_id not in before]
    assert len(new) >= 4 and {r.data.params["suites"] for r in new} == {"scr"}
    assert all(r.info.status == "FINISHED" for r in new)
    (folder,) = {r.data.params["shared_activations"] for r in new}  # one folder for the cell, gone once it is done
    assert not os.path.exists(folder)
    origins = sorted(r.data.tags["saecomp.scr.model_side"].split(" ")[0] for r in new)
    assert origins == ["computed"] + ["loaded"] * (len(new) - 1), origins
    run = sorted(step_runs("pipeline"), key=lambda r: r.info.start_time)[-1]
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="evaluation.csv"))
    assert table[["core.ce_loss_score", "scr.scr_dir1_threshold_2"]].notna().all().all()
    assert all(len(runs.split(",")) == 2 for runs in table["runs"])  # core from before, SCR from now
    # the printed table names the metrics as MLflow's search and evaluation.csv do
    assert "SAEBench's other suites on the pruned model" in result.output
    assert "scr.scr_metric_threshold_2 " in result.output and "scr.scr_metric_threshold_20" in result.output  # the file's k list


def test_a_local_ray_started_by_the_pipeline_runs_the_steps_it_is_missing(small_experiment, tracked_world, tmp_path):
    """`--executor ray` with no address (and no RAY_ADDRESS): the pipeline starts a one-node Ray of its own, as a user
    with Ray installed and no cluster gets it, never joining one already running on the machine (another test's), and
    runs the steps it is missing as Ray tasks on the session's SQLite store (one node may share it), each run naming
    its Ray node: here the other tests' cell under a test-set size of its own, so four core evaluations no other test
    runs, and whichever of the cell's trainings and sweep no test before it on this worker ran; the world is reused."""
    pytest.importorskip("ray")  # a test extra
    import yaml
    from infrastructure import without_session_step_server

    from saecomp.tracking import RAY_NODE_TAG

    config = yaml.safe_load(small_experiment.read_text())
    config["sae"]["hooks"] = ["hook_resid_post"]  # the other tests' cell, reused where they ran
    config["evaluation"]["n_sequences"] = 40  # core's key holds its test pool: four evaluations of this test's own
    path = tmp_path / "local_ray.yaml"
    path.write_text(yaml.safe_dump(config))
    before = {r.info.run_id for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}
    env = {k: v for k, v in without_session_step_server().items() if k != "RAY_ADDRESS"}
    on_ray = subprocess.run(
        [sys.executable, "-m", "entrypoints.pipeline", "--experiment", str(path), "--executor", "ray"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert on_ray.returncode == 0, on_ray.stderr[-4000:]
    assert "executor: ray, 1 node(s)" in on_ray.stderr, on_ray.stderr[-4000:]
    new = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list") if r.info.run_id not in before]
    by_step = {}
    for run in new:
        by_step.setdefault(run.data.tags.get("saecomp.step"), []).append(run)
    counts = {step: len(runs) for step, runs in by_step.items()}
    assert counts["pipeline"] == counts["compare"] == 1 and counts["evaluate"] == 4, counts
    assert set(counts) <= {"pipeline", "prune_llm", "train_sae", "prune_sae", "evaluate", "compare"}, counts  # the world reused
    steps = [r for r in new if r.data.tags.get("saecomp.step") != "pipeline"]
    assert all(r.info.status == "FINISHED" and r.data.tags.get(RAY_NODE_TAG) for r in steps), counts
    assert {r.data.params["evaluation.n_sequences"] for r in by_step["evaluate"]} == {"40"}


def test_replicates_evaluate_the_seeded_suites_under_more_seeds(small_experiment, tmp_path):
    """evaluation.replicates: 2 adds, per variant, one evaluate run of the suites that read a seed (SCR here, not
    core) under the next seed, reusing everything else; compare's SCR cells become the mean over the two seeds with
    its standard error, core's stay single runs with their bootstrap. A rerun adds nothing."""
    import yaml

    config = yaml.safe_load(small_experiment.read_text())
    config["sae"]["hooks"] = ["hook_resid_post"]  # the previous test's cell, reused if it ran
    config["evaluation"]["suites"] = ["core", "scr"]
    path = tmp_path / "replicated.yaml"
    path.write_text(yaml.safe_dump(config))
    assert CliRunner().invoke(pipeline.main, ["--experiment", str(path)], catch_exceptions=False).exit_code == 0
    before = {r.info.run_id for r in step_runs("evaluate")}
    # one seed: each SAE's SCR error is its own, and against the pretrained SAE's the difference pairs over the clean
    # accuracies' draws, which the SAEs on one model share (the same sample id in their uncertainty/scr.json)
    run = sorted(step_runs("pipeline"), key=lambda r: r.info.start_time)[-1]
    report = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="compare")
    cells = pd.read_csv(f"{report}/cells.csv", keep_default_na=False, float_precision="round_trip")
    compared = cells[(cells["table"] == "scr") & (cells["difference_se"] != "")]
    assert len(compared) and set(compared["paired"].astype(str)) == {"True"}, compared[["metric", "variant", "paired"]].to_string()
    config["evaluation"]["replicates"] = 2
    path.write_text(yaml.safe_dump(config))
    plan = CliRunner().invoke(pipeline.main, ["--experiment", str(path), "--dry-run"], catch_exceptions=False)
    assert "scr under seeds 42, 43" in plan.output
    # what the dry run knows from the store: the sweep is done, and of each variant's core + SCR (seed 42) + SCR (seed
    # 43) only the new seed's SCR will run
    assert re.search(r"prune_sae .*: reuses finished run \w+", plan.output), plan.output
    counts = re.search(r"evaluate core, scr .*: (\d+) of (\d+) suite results will run", plan.output)
    assert counts and int(counts[1]) >= 4 and int(counts[2]) == 3 * int(counts[1]), plan.output
    result = CliRunner().invoke(pipeline.main, ["--experiment", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    new = [r for r in step_runs("evaluate") if r.info.run_id not in before]
    assert len(new) == 4 and {(r.data.params["suites"], r.data.params["evaluation.seed"]) for r in new} == {("scr", "43")}
    run = sorted(step_runs("pipeline"), key=lambda r: r.info.start_time)[-1]
    report = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="compare")
    exact = {"float_precision": "round_trip"}
    cells = pd.read_csv(f"{report}/cells.csv", keep_default_na=False, **exact)
    scr = cells[(cells["table"] == "scr") & (cells["status"] == "ok")]
    replicated = scr["note"].str.startswith("mean over 2 seeds (42, 43)")
    assert replicated.sum() >= len(scr) / 2 and (scr.loc[replicated, "run_id"].str.count(",") == 1).all()
    assert (scr.loc[replicated, "se"] != "").all()
    # SAEBench gives scr_metric_threshold_n only where the two clean probes' accuracies differ: a seed can lack it,
    # and the cell then says it holds one seed's number.
    single = scr[~replicated]
    assert single["note"].str.contains("only: the runs with seed").all(), single[["metric", "variant", "note"]].to_string()
    assert single["metric"].str.startswith("scr_metric_threshold").all()
    core = cells[(cells["table"] == "table1") & (cells["status"] == "ok")]
    assert len(core) and not core["note"].str.contains("seeds").any() and (core["run_id"].str.count(",") == 0).all()
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="evaluation.csv"), **exact)
    assert (table["seeds"] == 2).all() and all(len(runs.split(",")) >= 2 for runs in table["runs"])
    client, name = mlflow.MlflowClient(), "scr.scr_dir1_threshold_2"  # a number every seed's run has
    for _, row in table.iterrows():  # the pipeline's table shows the mean over the seeds, as compare does
        values = [m[name] for m in (client.get_run(r).data.metrics for r in row["runs"].split(",")) if name in m]
        assert len(values) == 2 and row[name] == sum(values) / 2
    again = {r.info.run_id for r in step_runs("evaluate")}
    plan = CliRunner().invoke(pipeline.main, ["--experiment", str(path), "--dry-run"], catch_exceptions=False)
    assert re.search(rf"evaluate core, scr .*: reuses finished runs for all {counts[2]} suite results", plan.output), plan.output
    assert CliRunner().invoke(pipeline.main, ["--experiment", str(path)], catch_exceptions=False).exit_code == 0
    assert {r.info.run_id for r in step_runs("evaluate")} == again  # every seed's runs reused, as the dry run said
    config["evaluation"]["suites"] = ["core"]  # no suite reads a seed: replicates add nothing
    path.write_text(yaml.safe_dump(config))
    assert CliRunner().invoke(pipeline.main, ["--experiment", str(path)], catch_exceptions=False).exit_code == 0
    assert {r.info.run_id for r in step_runs("evaluate")} == again


def test_dry_run_prints_the_plan_and_computes_nothing(small_experiment, tracked_world, tmp_path):
    import yaml

    from entrypoints.prune_llm import key_for
    from saecomp.config import load_experiment
    from saecomp.tracking import find_finished_run

    steps = ("build_world", "prune_llm", "train_sae", "prune_sae", "evaluate", "compare", "pipeline")
    everything = {step: len(step_runs(step)) for step in steps}
    config = yaml.safe_load(small_experiment.read_text())
    config.setdefault("llm_pruning", {})["sparsity"] = 0.4  # a model nobody pruned yet: it and what builds on it will run
    path = tmp_path / "planned.yaml"
    path.write_text(yaml.safe_dump(config))
    assert find_finished_run("prune_llm", key_for(load_experiment(path), str(path))) is None
    plan = CliRunner().invoke(pipeline.main, ["--experiment", str(path), "--dry-run"], catch_exceptions=False)
    assert plan.exit_code == 0, plan.output
    lines = plan.output.splitlines()
    assert "build_world" in lines[1] and "reuses finished run" in lines[1]  # the world is the same
    assert any("prune_llm" in line and "0.4" in line and line.endswith("will run") for line in lines)
    assert sum("train_sae on the pruned model" in line and "after its upstream" in line for line in lines) == 3
    assert sum("evaluate core for pretrained, pruned25, pruned50, trained" in line for line in lines) == 3
    assert "32 test windows" in plan.output and "16 x 64 calibration tokens" in plan.output
    assert {step: len(step_runs(step)) for step in everything} == everything, "a dry run started a run"


def test_per_layer_figure_draws_one_curve_per_layer(tmp_path):
    import matplotlib.image

    tables = {layer: pd.DataFrame({"sparsity": [0.25, 0.5, 0.9], "mse": [0.1 * (layer + 1), 0.2, 0.5]}) for layer in range(4)}
    labels = pipeline.per_layer_figure(tables, "test", tmp_path / "layers.png")
    assert labels == ["layer 0", "layer 1", "layer 2", "layer 3"]
    image = matplotlib.image.imread(tmp_path / "layers.png")
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_pipeline_over_several_layers_draws_the_per_layer_sweeps(small_experiment, tmp_path):
    """`sae.layers` with two layers: one cell per layer (in parallel here), and the appendix's per-layer figure."""
    import yaml

    config = yaml.safe_load(small_experiment.read_text())
    config["sae"].update({"layers": [0, 1], "hooks": ["hook_resid_post"]})
    config["evaluation"]["suites"] = []
    path = tmp_path / "layers.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(pipeline.main, ["--experiment", str(path), "--jobs", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = sorted(step_runs("pipeline"), key=lambda r: r.info.start_time)[-1]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert "sweep_by_layer_hook_resid_post.png" in artifacts
    summary = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="summary.csv"))
    assert list(dict.fromkeys(summary["hook"])) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def test_prune_sae_gets_the_sae_runs_the_pipelines_key_names(small_experiment, tmp_path, monkeypatch):
    """The pipeline hands prune_sae the SAE runs its key names, and the step does not look them up again. A second
    FINISHED train_sae run with the same key that counts as canonical by the time prune_sae starts (here: made just
    before, older than the one the pipeline found, as a straggler of a killed pipeline can be) would otherwise become
    its `trained` SAE, its key would differ from the pipeline's, and `run_step` would fail the pipeline."""
    import yaml

    from saecomp import tracking

    config = yaml.safe_load(small_experiment.read_text())
    config["sae"]["hooks"] = ["hook_resid_post"]
    config["evaluation"]["suites"] = []
    config["sae_pruning"]["tolerance"] = 0.37  # a prune_sae key of its own; the SAE trainings are reused
    path = tmp_path / "handover.yaml"
    path.write_text(yaml.safe_dump(config))
    client, original, made = mlflow.MlflowClient(), tracking.run_step, {}

    def older_twin(run_id: str) -> str:
        run = client.get_run(run_id)
        twin = client.create_run(run.info.experiment_id, start_time=run.info.start_time - 1,
                                 tags={k: v for k, v in run.data.tags.items() if k.startswith("saecomp.")})  # fmt: skip
        client.log_artifacts(twin.info.run_id, mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/sae"), "sae")
        client.set_terminated(twin.info.run_id, "FINISHED")
        return twin.info.run_id

    def run_step(step, parameters, key, *args, **kwargs):
        if step == "prune_sae" and not made:
            made["handed"] = parameters["trained"]  # runs:/<id>/sae
            trained_run = made["handed"].split("/")[1]
            made["twin"] = older_twin(trained_run)
            assert tracking.find_finished_run("train_sae", client.get_run(trained_run).data.tags[tracking.KEY_TAG]) == made["twin"]
            made["key"] = key
        return original(step, parameters, key, *args, **kwargs)

    monkeypatch.setattr(tracking, "run_step", run_step)
    try:
        result = CliRunner().invoke(pipeline.main, ["--experiment", str(path)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        (run,) = [r for r in step_runs("prune_sae") if r.data.tags.get(tracking.KEY_TAG) == made["key"]]
        assert run.info.status == "FINISHED"
        assert run.data.params["trained"] == made["handed"] != f"runs:/{made['twin']}/sae"
    finally:
        if "twin" in made:  # later tests find the canonical runs they expect
            client.delete_run(made["twin"])
