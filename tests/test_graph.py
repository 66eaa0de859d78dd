"""The declared step graph: what an edit costs, and the README saying so."""

from __future__ import annotations

import os
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
    # Data files a step reads are its code too: a corrected number of the paper's makes a new report (the digest once
    # hashed *.py alone, and paper/ holds only CSVs)
    before = after
    with open(copy / "paper" / "gemma-2-2b_table1.csv", "a") as table:
        table.write("\n")
    after = {name: tracking.step_key(name, {"x": 1}) for name in graph.STEPS}
    assert {name for name in graph.STEPS if before[name] != after[name]} == {"compare"}
    # saes.py decides the processing wanda-seed prunes under: prune_llm's code too
    before = after
    with open(copy / "saes.py", "a") as source:
        source.write("\n# an edit\n")
    after = {name: tracking.step_key(name, {"x": 1}) for name in graph.STEPS}
    assert {"prune_llm", "train_sae", "prune_sae", "evaluate"} <= {name for name in graph.STEPS if before[name] != after[name]}


def test_an_sae_is_keyed_by_what_it_is_not_by_its_name(tmp_path):
    """A folder's key holds its files' digest (an SAE trained again into the same folder is another SAE), and an
    alias or `latest` the version it points to now; a run's artifact and a numbered version are fixed by their name."""
    import mlflow

    from saecomp.names import SAESource

    folder = tmp_path / "sae"
    folder.mkdir()
    (folder / "cfg.json").write_text("{}")
    (folder / "sae_weights.safetensors").write_bytes(b"first")
    first = SAESource.parse(str(folder)).identity()
    (folder / "checkpoints").mkdir()  # what SAELens does not read of the folder: not what the SAE is
    (folder / "checkpoints" / "step-100.safetensors").write_bytes(b"a training's checkpoint")
    (folder / "train.log").write_text("a log")
    assert SAESource.parse(str(folder)).identity() == first
    (folder / "sae_weights.safetensors").write_bytes(b"again")
    assert SAESource.parse(str(folder)).identity() != first and first.startswith(str(folder))
    assert SAESource.parse("runs:/0123/saes/pruned-0.25").identity() == "runs:/0123/saes/pruned-0.25"

    client = mlflow.MlflowClient()
    name = f"keyed-{os.getpid()}"
    client.create_registered_model(name)
    for _ in range(2):
        client.create_model_version(name, source=str(folder))
    client.set_registered_model_alias(name, "best", "1")
    assert SAESource.parse(f"models:/{name}/1").identity() == f"models:/{name}/1"
    assert SAESource.parse(f"models:/{name}@best").identity() == f"models:/{name}@best#version 1"
    assert SAESource.parse(f"models:/{name}/latest").identity() == f"models:/{name}/latest#version 2"
    client.set_registered_model_alias(name, "best", "2")  # the alias moved: another SAE, another key
    assert SAESource.parse(f"models:/{name}@best").identity() == f"models:/{name}@best#version 2"
    # nothing to resolve: a key still (the step, loading it, says what is wrong), never a traceback in the pipeline
    assert SAESource.parse(f"models:/{name}@nosuch").identity().startswith(f"models:/{name}@nosuch#unresolved (")
    assert SAESource.parse("models:/no-such-model/latest").identity().startswith("models:/no-such-model/latest#unresolved (")


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
        ("--jobs", "0"): "--jobs '0' is not valid; valid: a whole number of at least 1, or auto",
        ("--jobs", "two"): "--jobs 'two' is not valid",
        ("--executor", "ray", "--address", "127.0.0.1:1"): "--address 127.0.0.1:1: nothing answers there",
        ("--executor", "ray", "--address", "no-port"): "--address 'no-port' is not valid",
        # without --executor ray an address was ignored: the whole experiment ran here, not on the cluster named
        ("--address", "head:6379"): "--address head:6379 is for --executor ray; valid: add --executor ray, or leave --address out",
        # what click itself refuses is one saecomp line too, not its usage block
        ("--executor", "slurm"): "saecomp: error: Invalid value for '--executor': 'slurm' is not one of 'local', 'ray'.",
        ("--bogus", "1"): "saecomp: error: No such option '--bogus'.",
    }
    for args, message in cases.items():
        result = CliRunner().invoke(pipeline.main, ["--experiment", str(small_experiment), *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Usage:" not in result.output, (args, result.output)
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


def test_local_pool_runs_at_most_jobs_steps_and_shares_the_cores_out(monkeypatch):
    """Every cell (and every variant inside one) starts at once; the slots decide which step runs. A step inside the
    cells gets cores // jobs torch threads, one the pipeline runs on its own (the world, compare) every core."""
    import threading
    import time

    from saecomp import executors

    running, peak, seen, lock = [0], [0], [], threading.Lock()

    def fake_step(self, entry_point, parameters, experiment_id, parent, key):  # the process a step would be
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            seen.append((entry_point, executors.launch_thread_count()))
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return key

    monkeypatch.setattr(executors.InProcess, "launch", fake_step)
    monkeypatch.setattr(executors, "available_cores", lambda: 4)
    pool = executors.LocalPool(2)
    assert pool.launch("build_world", {}, None, None, "w") == "w"

    def cell(name):
        trained = pool.map(lambda which: pool.launch("train_sae", {}, None, None, f"{name}-{which}"), ["dense", "pruned"])
        variants = pool.map(lambda variant: pool.launch("evaluate", {}, None, None, f"{name}-{variant}"), ["a", "b", "c", "d"])
        return trained + variants

    done = pool.map(cell, ["x", "y", "z"])
    assert done[1] == ["y-dense", "y-pruned", "y-a", "y-b", "y-c", "y-d"]  # results keep the items' order
    assert peak[0] == 2  # 18 steps wanted to run at once
    assert seen[0] == ("build_world", 4) and all(threads == 2 for _, threads in seen[1:]) and len(seen) == 19
    assert executors.launch_thread_count() is None  # only the launching thread, and only while it launches


def test_automatic_jobs_is_one_per_core_only_for_the_tiny_world_on_cpu(monkeypatch):
    from saecomp import executors

    monkeypatch.setattr(executors, "available_cores", lambda: 8)
    monkeypatch.setattr(executors, "available_memory_gb", lambda: 64.0)
    assert executors.automatic_jobs("tiny-gpt2", "cpu") == 8
    assert executors.automatic_jobs("tiny-gpt2", "cuda") == 1  # a model step takes the whole card
    assert executors.automatic_jobs("gpt2", "cpu") == 1  # a real model's steps hold the model each
    monkeypatch.setattr(executors, "available_memory_gb", lambda: 9.0)
    assert executors.automatic_jobs("tiny-gemma2", "cpu") == 2  # as many 4 GB steps as the memory holds
    monkeypatch.setattr(executors, "available_memory_gb", lambda: 1.0)
    assert executors.automatic_jobs("tiny-gemma2", "cpu") == 1


def test_a_thread_count_the_user_set_is_the_budget(monkeypatch):
    from saecomp import executors

    monkeypatch.setattr(executors.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert executors.available_cores() == 1 and executors.automatic_jobs("tiny-gpt2", "cpu") == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert executors.available_cores() == 3 and executors.LocalPool(3).cores == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert executors.available_cores() == 4


def test_a_step_waiting_for_its_slot_never_starts_once_the_pipeline_stops(monkeypatch):
    import threading

    from saecomp import executors, tracking

    started, release = [], threading.Event()

    def fake_step(self, entry_point, parameters, experiment_id, parent, key):
        started.append(key)
        release.wait(5)
        return key

    monkeypatch.setattr(executors.InProcess, "launch", fake_step)
    pool = executors.LocalPool(1)
    first = threading.Thread(target=pool.launch, args=("evaluate", {}, None, None, "running"))
    first.start()
    while not started:
        threading.Event().wait(0.01)
    errors = []

    def waiting():
        try:
            pool.launch("evaluate", {}, None, None, "waiting")
        except RuntimeError as error:
            errors.append(str(error))

    second = threading.Thread(target=waiting)
    second.start()
    try:
        tracking.STOPPING.set()  # what a failed step or Ctrl-C does (stop_running_steps)
        release.set()
        first.join(5)
        second.join(5)
    finally:
        tracking.STOPPING.clear()
    assert started == ["running"] and errors == ["not starting evaluate: the pipeline is stopping"]


def test_a_launch_hands_its_thread_count_to_its_step_alone(monkeypatch):
    """`launch_local` puts the pool's share into the environment the step is started with, and only for it."""
    from saecomp import executors, tracking

    seen = {}

    class Started:  # what MLflow's project backend returns
        run_id = "r"

        def wait(self):
            return True

        def get_status(self):
            return "FINISHED"

        def cancel(self):
            pass

    def start(entry_point, parameters, experiment_id, own_session=False):
        seen.update({name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", tracking.LAUNCHER_ENV)})
        return Started()

    class Client:
        def get_run(self, run_id):
            from types import SimpleNamespace

            return SimpleNamespace(info=SimpleNamespace(status="FINISHED"), data=SimpleNamespace(tags={tracking.STEP_TAG: "evaluate"}))

    monkeypatch.setattr(tracking, "_start_project_run", start)
    monkeypatch.setattr(tracking, "MlflowClient", Client)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    with executors.thread_count(3):
        assert tracking.launch_local("evaluate", {}, None, None) == "r"
    assert seen["OMP_NUM_THREADS"] == seen["MKL_NUM_THREADS"] == "3" and seen[tracking.LAUNCHER_ENV]
    assert os.environ["OMP_NUM_THREADS"] == "7" and "MKL_NUM_THREADS" not in os.environ  # as they were
    assert tracking.LAUNCHER_ENV not in os.environ
    tracking.launch_local("evaluate", {}, None, None)  # no pool share: the process's own settings go through
    assert seen["OMP_NUM_THREADS"] == "7" and seen["MKL_NUM_THREADS"] is None


def test_a_pool_slot_goes_to_the_lowest_priority_number_then_to_the_earliest():
    """The pipeline starts a hook's first evaluation (it computes what three more wait for) before the waiting sweeps
    and later evaluations: waiters take a freed slot by priority, then by arrival, whatever order the OS wakes them in."""
    import threading

    from saecomp.executors import PrioritySlots

    slots, started, lock = PrioritySlots(1), [], threading.Lock()
    hold = slots.taken(0)
    hold.__enter__()  # the one slot is busy while the others queue

    def waiter(name: str, priority: int):
        with slots.taken(priority):
            with lock:
                started.append(name)

    threads = []
    for name, priority in (("later evaluation", 2), ("first evaluation a", 0), ("sweep", 1), ("first evaluation b", 0)):
        threads.append(threading.Thread(target=waiter, args=(name, priority)))
        threads[-1].start()
        while len(slots._waiting) < len(threads):  # queued in this order
            threading.Event().wait(0.005)
    hold.__exit__(None, None, None)
    for thread in threads:
        thread.join(5)
    assert started == ["first evaluation a", "first evaluation b", "sweep", "later evaluation"]
    assert slots.free == 1 and not slots._waiting
