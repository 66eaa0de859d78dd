"""The declared step graph: what an edit costs, and the README saying so."""

from __future__ import annotations

import shutil
from pathlib import Path

from saecomp import graph, tracking

ROOT = Path(__file__).resolve().parents[1]


def test_every_declared_file_exists_and_every_step_has_an_entry_point():
    mlproject = (ROOT / "MLproject").read_text()
    for step in graph.STEPS.values():
        for code in step.code:
            assert (tracking.PACKAGE_DIR / code).exists(), f"{step.name} names {code}, which does not exist"
        assert f"  {step.name}:" in mlproject
        assert all(need in graph.STEPS for need in step.needs)


def test_an_edit_invalidates_its_step_and_only_what_depends_on_it(tmp_path, monkeypatch):
    copy = tmp_path / "saecomp"
    shutil.copytree(tracking.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(tracking, "PACKAGE_DIR", copy)
    before = {name: tracking.step_key(name, {"x": 1}) for name in graph.STEPS}
    with open(copy / "prune_sae.py", "a") as source:
        source.write("\n# an edit\n")
    after = {name: tracking.step_key(name, {"x": 1}) for name in graph.STEPS}
    changed = {name for name in graph.STEPS if before[name] != after[name]}
    assert changed == {"prune_sae"}  # evaluate reruns too, through the new prune_sae run id in its key
    assert graph.downstream("prune_sae") == ["prune_sae", "evaluate", "compare", "publish"]
    assert graph.downstream("build_world") == list(graph.STEPS)


def test_readme_shows_the_declared_graph():
    assert graph.markdown_table() in (ROOT / "README.md").read_text(), "run `python -m saecomp.graph` and paste it into the README"


def test_executor_choices_fail_cleanly_before_any_run(small_experiment):
    import mlflow
    from click.testing import CliRunner

    from entrypoints import pipeline

    client = mlflow.MlflowClient()
    before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    cases = {
        ("--executor", "ray", "--jobs", "2"): "--jobs is for --executor local",
        ("--executor", "ray", "--address", "127.0.0.1:1"): "--address 127.0.0.1:1: nothing answers there",
        ("--executor", "ray", "--address", "no-port"): "--address 'no-port' is not valid",
    }
    for args, message in cases.items():
        result = CliRunner().invoke(pipeline.main, ["--experiment", str(small_experiment), *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == before


def test_several_ray_nodes_need_a_tracking_server():
    import pytest

    from saecomp.executors import RayCluster, check_store

    cluster = RayCluster.__new__(RayCluster)  # a cluster of three nodes, without starting one
    cluster.nodes, cluster.remote = (lambda: 3), True
    for store, artifacts in (("sqlite:///mlflow.db", "/work/mlruns/1"), ("http://mlflow:5000", "/shared/mlruns/1")):
        with pytest.raises(ValueError, match="needs a tracking server that every node reaches"):
            check_store(cluster, store, artifacts)
    check_store(cluster, "http://mlflow:5000", "mlflow-artifacts:/1")  # a server proxying its artifacts: fine
    cluster.nodes = lambda: 1  # one node, on another machine: its steps cannot reach this machine's files either
    with pytest.raises(ValueError, match="needs a tracking server"):
        check_store(cluster, "sqlite:///mlflow.db", "/work/mlruns/1")
    cluster.remote = False
    check_store(cluster, "sqlite:///mlflow.db", "/work/mlruns/1")  # one node, this machine: its own files are fine
