"""Resume: a step killed with SIGKILL never looks finished, is marked KILLED with its reason on the next start, and
is redone; a live run, also another machine's on a shared server, is never touched."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
from click.testing import CliRunner
from infrastructure import freeze, without_session_step_server

from entrypoints import prune_llm
from saecomp.tracking import HEARTBEAT_TAG, HOST_TAG, KILLED_REASON_TAG, PID_TAG, STEP_TAG, experiment_id_for, reap_dead_runs, step_run

ROOT = Path(__file__).resolve().parents[1]


def runs_of(step: str):
    client = mlflow.MlflowClient()
    return [
        r
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
        if r.data.tags.get(STEP_TAG) == step
    ]


def start_and_kill_mid_run(small_experiment, sparsity: str):
    """Start prune_llm in its own process, freeze it (SIGSTOP) the moment it reports its calibration data (a line it
    writes inside its open run, before pruning), and SIGKILL it if its run is RUNNING then; None if it was not caught.

    Waiting on the step's own log line instead of polling the store: a poll of the store takes longer on a busy CI
    machine than the tiny step takes to finish after its run opens."""
    args = ["--experiment", str(small_experiment), "--sparsity", sparsity]
    before = {r.info.run_id for r in runs_of("prune_llm")}
    process = subprocess.Popen(
        [sys.executable, "-m", "entrypoints.prune_llm", *args],
        cwd=ROOT, env=without_session_step_server(), stderr=subprocess.PIPE, text=True, bufsize=1,
    )  # fmt: skip
    for line in process.stderr:
        if line.startswith("[prune_llm] ") and "calibration tokens" in line:
            freeze(process.pid)  # frozen: it cannot finish between this line and the kill
            break
    started = [r for r in runs_of("prune_llm") if r.info.run_id not in before and r.data.tags.get(PID_TAG) == str(process.pid)]
    victim = started[0] if started else None
    caught = victim is not None and HEARTBEAT_TAG in victim.data.tags and victim.info.status == "RUNNING"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    return (args, victim, process) if caught else None


def test_sigkilled_step_is_marked_killed_and_redone(small_experiment, tracked_world):
    attempt = None
    for sparsity in ("0.375", "0.3125", "0.4375"):  # a fresh key each try
        attempt = start_and_kill_mid_run(small_experiment, sparsity)
        if attempt:
            break
    assert attempt is not None, "the step finished three times before it could be killed"
    args, victim, process = attempt
    client = mlflow.MlflowClient()
    assert client.get_run(victim.info.run_id).info.status == "RUNNING"  # what SIGKILL leaves behind

    result = CliRunner().invoke(prune_llm.main, args)
    assert result.exit_code == 0, result.output
    killed = client.get_run(victim.info.run_id)
    assert killed.info.status == "KILLED"
    assert f"process {process.pid} on {socket.gethostname()} is gone" in killed.data.tags[KILLED_REASON_TAG]
    key = victim.data.tags["saecomp.key"]
    same_key = [r for r in runs_of("prune_llm") if r.data.tags.get("saecomp.key") == key]
    assert [r.info.status for r in same_key if r.info.run_id != victim.info.run_id] == ["FINISHED"]  # redone once
    assert not [r for r in runs_of("prune_llm") if r.info.status == "RUNNING"]
    # What a pipeline (or a step needing this one) reuses from now on is the redone run, never the killed one.
    from saecomp.tracking import find_finished_run

    assert find_finished_run("prune_llm", key) not in (None, victim.info.run_id)


def test_live_runs_are_never_reaped():
    """This process's own run, and another host's run with a fresh heartbeat (a colleague on a shared server), stay
    RUNNING; another host's run silent for longer than the staleness limit is KILLED."""
    import saecomp.tracking as tracking

    client = mlflow.MlflowClient()
    experiment = tracking.experiment_id_for("reaper")
    colleague = client.create_run(
        experiment, tags={STEP_TAG: "train_sae", HOST_TAG: "gpu-node-7", PID_TAG: "1", HEARTBEAT_TAG: f"{time.time():.0f}"}
    )
    silent = client.create_run(
        experiment, tags={STEP_TAG: "train_sae", HOST_TAG: "gpu-node-8", PID_TAG: "1", HEARTBEAT_TAG: f"{time.time() - 3600:.0f}"}
    )
    with step_run("prune_llm", "k-live", {}, "reaper") as own:
        reaped = reap_dead_runs([experiment])
        assert own.info.run_id not in reaped and client.get_run(own.info.run_id).info.status == "RUNNING"
    assert client.get_run(colleague.info.run_id).info.status == "RUNNING"
    assert client.get_run(silent.info.run_id).info.status == "KILLED"
    assert "no heartbeat from gpu-node-8" in client.get_run(silent.info.run_id).data.tags[KILLED_REASON_TAG]
    client.set_terminated(colleague.info.run_id, "FINISHED")


def test_a_reused_pid_is_not_taken_for_the_live_run():
    """Same host and pid namespace, a process with the recorded pid exists: alive only if it is the same process."""
    from types import SimpleNamespace

    from saecomp.tracking import PID_NAMESPACE_TAG, PID_START_TAG, _pid_namespace, _process_start, why_dead

    tags = {
        STEP_TAG: "prune_llm",
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
        PID_NAMESPACE_TAG: _pid_namespace(),
        HEARTBEAT_TAG: f"{time.time():.0f}",
    }

    def run(started: str):
        return SimpleNamespace(
            data=SimpleNamespace(tags={**tags, PID_START_TAG: started}), info=SimpleNamespace(start_time=time.time() * 1000)
        )

    assert why_dead(run(_process_start(os.getpid()))) is None
    assert "belongs to a newer process" in why_dead(run("1"))


# How far a training continued from a checkpoint may land from an uninterrupted one (final metrics, relative, or
# absolute below 1): the data after the checkpoint is a different draw of the same stream.
RESUMED_TOLERANCE = 0.01  # seen: 1.5e-5 (explained variance -13.6381 against -13.6383)


def kill_pipeline_during(step: str, experiment: Path, log: Path):
    """Start the pipeline in its own process and SIGKILL it while a new ``step`` run computes (the step frozen with
    SIGSTOP meanwhile, so that it cannot finish first). Returns the step's run as it was caught."""
    before = {r.info.run_id for r in runs_of(step)}
    process = subprocess.Popen(
        [sys.executable, "-m", "entrypoints.pipeline", "--experiment", str(experiment)],
        cwd=ROOT, env=without_session_step_server(), stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    client = mlflow.MlflowClient()
    deadline = time.time() + 600
    try:
        while time.time() < deadline and process.poll() is None:
            for run in runs_of(step):
                if run.info.run_id in before or run.info.status != "RUNNING" or HEARTBEAT_TAG not in run.data.tags:
                    continue
                step_pid = int(run.data.tags[PID_TAG])
                try:
                    freeze(step_pid)
                except ProcessLookupError:
                    continue  # it finished meanwhile
                try:
                    if client.get_run(run.info.run_id).info.status == "RUNNING":
                        os.kill(process.pid, signal.SIGKILL)
                        process.wait()
                        return run
                finally:
                    os.kill(step_pid, signal.SIGCONT)
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    raise AssertionError(f"the pipeline never ran {step} long enough to be killed during it")


def closed(run_id: str, seconds: float = 60):
    """The run once it is no longer RUNNING (a step notices its dead launcher within a second)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        run = mlflow.MlflowClient().get_run(run_id)
        if run.info.status != "RUNNING":
            return run
        time.sleep(0.2)
    return run


def test_pipeline_sigkilled_during_train_sae_then_prune_sae_resumes(small_experiment, tracked_world, tmp_path):
    """SIGKILL the whole pipeline while a step computes: that step closes its own run as KILLED at once (its launcher is
    gone), the rerun reuses every finished step and redoes the killed one, and nothing is left RUNNING."""
    import yaml

    from entrypoints import pipeline

    config = yaml.safe_load(small_experiment.read_text())
    # One cell with new SAE keys (k = 6) and no evaluation: the world and the pruned model are reused.
    config["sae"] = {**config["sae"], "hooks": ["hook_mlp_out"], "k": 6}
    config["evaluation"] = {**config["evaluation"], "suites": []}
    first = tmp_path / "kill-train.yaml"
    first.write_text(yaml.safe_dump(config))
    victim = kill_pipeline_during("train_sae", first, tmp_path / "first.log")
    victim = closed(victim.info.run_id)
    assert victim.info.status == "KILLED"
    assert "its launcher" in victim.data.tags[KILLED_REASON_TAG]
    finished_before = {r.info.run_id for r in runs_of("build_world") + runs_of("prune_llm")}  # by the killed pipeline too
    result = CliRunner().invoke(pipeline.main, ["--experiment", str(first)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert {r.info.run_id for r in runs_of("build_world") + runs_of("prune_llm")} == finished_before  # reused
    same_key = [r for r in runs_of("train_sae") if r.data.tags.get("saecomp.key") == victim.data.tags["saecomp.key"]]
    assert sorted(r.info.status for r in same_key) == ["FINISHED", "KILLED"]  # redone once
    assert [r.info.status for r in runs_of("pipeline") if r.info.status not in ("FINISHED", "KILLED")] == []
    redone = next(r for r in same_key if r.info.status == "FINISHED")
    # Against an uninterrupted training with the same inputs (the redone run hidden from key lookups, so it is trained
    # again; its checkpoints were deleted when it finished). A redone training that continued from a checkpoint
    # matches only within a tolerance: SAELens's activation store refills its shuffle buffer on resuming, so the
    # batches after the checkpoint are not those of an uninterrupted run.
    client = mlflow.MlflowClient()
    client.set_tag(redone.info.run_id, "saecomp.key", f"{redone.data.tags['saecomp.key']}.redone")
    result = CliRunner().invoke(pipeline.main, ["--experiment", str(first)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    key = victim.data.tags["saecomp.key"]
    fresh = [r for r in runs_of("train_sae") if r.data.tags.get("saecomp.key") == key and r.info.status == "FINISHED"]
    assert len(fresh) == 1 and "saecomp.resumed_from_samples" not in fresh[0].data.tags
    resumed = "saecomp.resumed_from_samples" in redone.data.tags
    tolerance = RESUMED_TOLERANCE if resumed else 1e-6
    for metric in ("mse", "explained_variance", "cossim", "l0", "dead_fraction", "ce_loss_with_sae"):
        mine, theirs = redone.data.metrics[metric], fresh[0].data.metrics[metric]
        print(f"[resume] {metric}: redone {mine:.6g} uninterrupted {theirs:.6g} (resumed: {resumed})")
        assert abs(mine - theirs) <= tolerance * max(abs(theirs), 1.0), (metric, mine, theirs, resumed)

    # Now during the sweep: the SAE trainings finished above are reused, the sweep is redone.
    config["sae_pruning"] = {**config["sae_pruning"], "sparsities": [0.25, 0.5, 0.8]}
    second = tmp_path / "kill-prune.yaml"
    second.write_text(yaml.safe_dump(config))
    trainings = {r.info.run_id for r in runs_of("train_sae")}
    victim = closed(kill_pipeline_during("prune_sae", second, tmp_path / "second.log").info.run_id)
    assert victim.info.status == "KILLED", (tmp_path / "second.log").read_text()[-3000:]
    result = CliRunner().invoke(pipeline.main, ["--experiment", str(second)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert {r.info.run_id for r in runs_of("train_sae")} == trainings  # nothing trained again
    same_key = [r for r in runs_of("prune_sae") if r.data.tags.get("saecomp.key") == victim.data.tags["saecomp.key"]]
    assert sorted(r.info.status for r in same_key) == ["FINISHED", "KILLED"]
    client = mlflow.MlflowClient()
    running = client.search_runs([e.experiment_id for e in client.search_experiments()], "attributes.status = 'RUNNING'")
    assert not running, [(r.data.tags.get(STEP_TAG), r.info.run_id) for r in running]


def test_a_step_killed_while_it_waits_on_its_upstream_is_marked_killed_on_the_next_start(small_experiment, tracked_world, tmp_path):
    """`timeout`, Slurm and `kill -TERM -<pgid>` signal the whole process group. A step caught waiting on its upstream
    step has not opened its run yet (no step tag, no heartbeat): SIGTERM ended it there and its run stayed RUNNING,
    unnamed, for good (a new user's trial: `timeout 40 python -m entrypoints.evaluate`). Now the run says which process
    was started for it (`saecomp.launched`), and the next start marks it KILLED once that process is gone."""
    import yaml

    from saecomp.tracking import LAUNCHED_TAG

    config = yaml.safe_load(small_experiment.read_text())
    config["world"]["corpus"] = {**config["world"]["corpus"], "seed": 11}  # a world not built yet: prune_llm waits on it
    path = tmp_path / "waiting.yaml"
    path.write_text(yaml.safe_dump(config))
    client = mlflow.MlflowClient()
    everything = lambda: client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)  # noqa: E731
    before = {r.info.run_id for r in everything()}
    # train_sae run by hand launches prune_llm (a run MLflow makes), which launches build_world and waits on it
    process = subprocess.Popen(
        [sys.executable, "-m", "entrypoints.train_sae", "--experiment", str(path), "--hook", "hook_resid_post"],
        cwd=ROOT, env=without_session_step_server(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    waiting = building = None
    deadline = time.time() + 300
    try:
        while time.time() < deadline and process.poll() is None and building is None:
            new = [r for r in everything() if r.info.run_id not in before]
            worlds = [r for r in new if r.data.tags.get(STEP_TAG) == "build_world" and HEARTBEAT_TAG in r.data.tags]
            waiting = next((r for r in new if r.data.tags.get("mlflow.project.entryPoint") == "prune_llm"), None)
            if worlds and worlds[0].info.status == "RUNNING" and waiting is not None:
                building = worlds[0]
                freeze(int(building.data.tags[PID_TAG]))  # it cannot finish before the signal lands
                os.killpg(process.pid, signal.SIGTERM)  # what `timeout` sends: to the whole group
                os.kill(int(building.data.tags[PID_TAG]), signal.SIGCONT)
            time.sleep(0.05)
    finally:
        if process.poll() is None and building is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert building is not None, "the world build was never caught computing"
    assert closed(building.info.run_id).info.status in ("FAILED", "KILLED")  # its own step closed it
    orphan = client.get_run(waiting.info.run_id)
    assert orphan.info.status == "RUNNING" and STEP_TAG not in orphan.data.tags  # what the signal leaves behind
    assert LAUNCHED_TAG in orphan.data.tags
    deadline = time.time() + 30
    while waiting.info.run_id not in reap_dead_runs() and time.time() < deadline:  # its process may take a moment to go
        time.sleep(0.2)
    orphan = client.get_run(waiting.info.run_id)
    assert orphan.info.status == "KILLED"
    assert "before the step opened its run" in orphan.data.tags[KILLED_REASON_TAG], orphan.data.tags
    assert orphan.data.tags["mlflow.runName"] == "prune_llm · killed before its run opened"
    assert not [r for r in everything() if r.info.run_id not in before and r.info.status == "RUNNING"]


def test_a_run_made_for_a_step_is_reaped_only_when_its_process_is_gone_here():
    """The launched record of a step that has not opened its run: its process dead on this machine (this boot, not
    this host name) -> KILLED; alive here, exited but not yet collected by its live launcher (a bad input's exit, which
    the launcher closes FAILED), on another machine that cannot be checked (it may wait hours on its upstream steps) or
    on one whose waiting heartbeat is fresh -> left RUNNING; another machine's whose heartbeat went silent -> KILLED."""
    import json

    from saecomp.tracking import LAUNCHED_TAG, PID_SPACE_KEY, mark_launched

    client = mlflow.MlflowClient()
    experiment = experiment_id_for("reaper-launched")
    gone, exited = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["true"])
    dead_run, live_run, zombie_run, elsewhere, namesake, beating, silent = (client.create_run(experiment).info.run_id for _ in range(7))
    mark_launched(dead_run, gone.pid)
    mark_launched(live_run, os.getpid())
    mark_launched(zombie_run, exited.pid)
    other = {HOST_TAG: "gpu-node-9", PID_TAG: "1", "saecomp.pid_namespace": "1", PID_SPACE_KEY: "another-boot/1"}
    client.set_tag(elsewhere, LAUNCHED_TAG, json.dumps(other))
    # the same host name and pid, another machine (a container image's `localhost`): its pid cannot be checked from here
    client.set_tag(namesake, LAUNCHED_TAG, json.dumps({**other, HOST_TAG: socket.gethostname(), PID_TAG: str(gone.pid)}))
    for run, beat in ((beating, time.time()), (silent, time.time() - 3600)):
        client.set_tag(run, LAUNCHED_TAG, json.dumps(other))
        client.set_tag(run, HEARTBEAT_TAG, f"{beat:.0f}")
    gone.kill()
    gone.wait()
    while Path(f"/proc/{exited.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":  # exited, not yet waited for
        time.sleep(0.01)
    reaped = reap_dead_runs([experiment])
    exited.wait()
    assert sorted(reaped) == sorted([dead_run, silent])
    assert "no heartbeat from gpu-node-9" in client.get_run(silent).data.tags[KILLED_REASON_TAG]
    assert client.get_run(dead_run).info.status == "KILLED"
    assert (
        f"process {gone.pid} on {socket.gethostname()} is gone before the step opened its run"
        in client.get_run(dead_run).data.tags[KILLED_REASON_TAG]
    )
    left = (live_run, zombie_run, elsewhere, namesake, beating)
    assert {client.get_run(r).info.status for r in left} == {"RUNNING"}
    for run in left:
        client.set_terminated(run, "FINISHED")


def test_the_launcher_watch_arms_only_for_a_real_ancestor():
    """A leaked or copied SAECOMP_LAUNCHER (another process, another machine's pid, garbage) never arms the watch, so
    a healthy step is never killed for a process that did not start it."""
    from saecomp.tracking import _LauncherWatch, _process_start

    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for value in (f"{unrelated.pid}:{_process_start(unrelated.pid)}", "not-a-pid", "", None, "999999999:1"):
            assert _LauncherWatch.of("run", value) is None, value
        # The real ancestor, seen from a child of this process: the test's own parent may be init (pytest started
        # detached, under nohup), which is never a launcher.
        check = (
            "import os, sys; from saecomp.tracking import _LauncherWatch, _process_start; parent = os.getppid(); "
            "assert _LauncherWatch.of('run', f'{parent}:not-its-start-time') is None, 'a reused pid armed the watch'; "
            "watch = _LauncherWatch.of('run', f'{parent}:{_process_start(parent)}'); "
            "assert watch is not None and not watch.gone(), 'the real parent armed no watch'; watch.stop()"
        )
        root = Path(__file__).resolve().parents[1]
        child = subprocess.run([sys.executable, "-c", check], cwd=root, capture_output=True, text=True, timeout=120)
        assert child.returncode == 0, child.stderr[-2000:]
    finally:
        unrelated.kill()
        unrelated.wait()


def test_a_step_whose_launcher_died_as_it_started_closes_its_run_as_killed():
    """CI met it with two steps at a time: a pipeline SIGKILLed while a step was starting left the step with a launcher
    that no longer headed its chain, so it armed no watch and finished a twin of the run the rerun made. A launcher of
    this machine that is gone when the step looks closes the step's run as KILLED; one from elsewhere arms nothing."""
    from saecomp.tracking import LAUNCHER_ENV, _pid_space, _process_start

    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    started = _process_start(launcher.pid)
    launcher.kill()
    launcher.wait()  # dead and reaped: its pid names no process now
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    zombie_started = _process_start(zombie.pid)
    zombie.kill()  # dead, not yet reaped by its parent (this test): /proc still shows it, with its start time
    while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.05)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment(experiment_id_for("launcher-watch"))
    step = (
        "import sys, time\n"
        "from saecomp.tracking import alive\n"
        "with alive(sys.argv[1], watch_launcher=True) as watch:\n"
        "    time.sleep(3)\n"
        "    if watch:\n"
        "        watch.finish_or_exit()\n"
        "print('finished')\n"
    )
    started_steps = {}
    for name, value in (("gone here", f"{launcher.pid}:{started}:{_pid_space()}"),
                        ("dead, not reaped", f"{zombie.pid}:{zombie_started}:{_pid_space()}"),
                        ("another machine's", f"{launcher.pid}:{started}:another-boot/4026531836"),
                        ("without a pid space", f"{launcher.pid}:{started}")):  # fmt: skip
        run = client.create_run(experiment.experiment_id)
        env = {**os.environ, LAUNCHER_ENV: value, "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-c", step, run.info.run_id]
        started_steps[name] = (run, subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outcomes = {}
    for name, (run, process) in started_steps.items():  # the four side by side: each mostly imports MLflow
        out, _ = process.communicate(timeout=120)
        outcomes[name] = (process.returncode, "finished" in out, client.get_run(run.info.run_id))
        if outcomes[name][2].info.status == "RUNNING":  # as a step's own end would (the store is the session's)
            client.set_terminated(run.info.run_id, "FINISHED")
    zombie.wait()
    for name, pid in (("gone here", launcher.pid), ("dead, not reaped", zombie.pid)):
        code, finished, run = outcomes[name]
        assert (code, finished, run.info.status) == (137, False, "KILLED"), name
        assert f"its launcher (process {pid} on {socket.gethostname()}) is gone" in run.data.tags[KILLED_REASON_TAG]
    for name in ("another machine's", "without a pid space"):  # not provably this machine's launcher: the step runs on
        code, finished, run = outcomes[name]
        assert (code, finished, run.info.status) == (0, True, "RUNNING"), name


def run_with_a_dead_launcher():
    """(client, a new run, the environment of a step whose launcher died as it started). A step watches only a launcher
    heading its own chain, so a dead one is how a test process can give it a launcher to lose
    (test_a_step_whose_launcher_died_as_it_started_closes_its_run_as_killed)."""
    from saecomp.tracking import LAUNCHER_ENV, _pid_space, _process_start

    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    started = _process_start(launcher.pid)
    launcher.kill()
    launcher.wait()
    client = mlflow.MlflowClient()
    experiment = client.get_experiment(experiment_id_for("launcher-watch"))
    run = client.create_run(experiment.experiment_id)
    env = {**os.environ, LAUNCHER_ENV: f"{launcher.pid}:{started}:{_pid_space()}", "PYTHONPATH": str(ROOT)}
    return client, run, env


def test_a_step_closing_its_run_as_killed_tries_again_when_the_store_refuses():
    """A busy store (SQLite's write lock held by another step, a tracking server's hiccup) must not leave the run of a
    step whose launcher died RUNNING: the step tries again, and says so."""
    client, run, env = run_with_a_dead_launcher()
    step = (
        "import sys, time\n"
        "from mlflow import MlflowClient\n"
        "from saecomp.tracking import alive\n"
        "real, refused = MlflowClient.set_terminated, []\n"
        "def busy_once(self, *args, **kwargs):\n"
        "    if not refused:\n"
        "        refused.append(1)\n"
        "        raise RuntimeError('database is locked')\n"
        "    return real(self, *args, **kwargs)\n"
        "MlflowClient.set_terminated = busy_once\n"
        "with alive(sys.argv[1], watch_launcher=True) as watch:\n"
        "    time.sleep(10)\n"
        "print('finished')\n"
    )
    done = subprocess.run([sys.executable, "-c", step, run.info.run_id], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    closed = client.get_run(run.info.run_id)
    assert (done.returncode, "finished" in done.stdout, closed.info.status) == (137, False, "KILLED"), done.stderr[-2000:]
    assert "could not close it as KILLED (RuntimeError('database is locked')); try 1 of 10" in done.stderr


def test_a_step_whose_launcher_died_keeps_its_run_killed_against_a_late_failed():
    """What is left of a dead launcher's chain (a lost Ray worker's `mlflow run`, in a session of its own) can write
    FAILED after the step closed its run as KILLED (seen in CI): for a while the step writes KILLED back, with the
    reason it gave."""
    from saecomp.tracking import KILLED_REASON_TAG

    client, run, env = run_with_a_dead_launcher()
    step = "import sys, time\nfrom saecomp.tracking import alive\nwith alive(sys.argv[1], watch_launcher=True):\n    time.sleep(60)\n"
    process = subprocess.Popen([sys.executable, "-c", step, run.info.run_id], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while client.get_run(run.info.run_id).info.status != "KILLED" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    client.set_terminated(run.info.run_id, "FAILED")  # the launcher chain's late write
    assert process.wait(timeout=60) == 137
    closed = client.get_run(run.info.run_id)
    assert closed.info.status == "KILLED" and "is gone" in closed.data.tags[KILLED_REASON_TAG]
    assert "closed as KILLED again" in process.stderr.read()
    # A FAILED later than the step's grace: the next step or pipeline to start marks the run KILLED again.
    client.set_tag(run.info.run_id, STEP_TAG, "train_sae")  # what a step's run carries (this bare one did not need it)
    client.set_terminated(run.info.run_id, "FAILED")
    assert run.info.run_id in reap_dead_runs([run.info.experiment_id])
    assert client.get_run(run.info.run_id).info.status == "KILLED"


def reaping_in_one_pass(experiment: str) -> None:
    """One start's reaping in the store MLflow's tracking URI names (this session's SQLite here; test_scale runs it
    against a tracking server with PostgreSQL, whose filters it must read the same): a step run whose process is gone
    here, another host's silent one and a run made for a step killed before it opened it are marked KILLED, as is a
    launcher chain's late FAILED over a step's own KILLED; a colleague's beating run, a live one made for a step and a
    plain failure stay as they are."""
    from saecomp.tracking import LAUNCHER_GONE, MLFLOW_ENTRY_POINT_TAG, PID_NAMESPACE_TAG, _pid_namespace, mark_launched

    client = mlflow.MlflowClient()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # exited and collected: its pid names no process here
    now = f"{time.time():.0f}"
    here = {STEP_TAG: "prune_llm", HOST_TAG: socket.gethostname(), PID_TAG: str(ended.pid), PID_NAMESPACE_TAG: _pid_namespace()}
    gone = client.create_run(experiment, tags={**here, HEARTBEAT_TAG: now}).info.run_id
    colleague = client.create_run(experiment, tags={STEP_TAG: "train_sae", HOST_TAG: "gpu-node-7", PID_TAG: "1", HEARTBEAT_TAG: now})
    silent = client.create_run(
        experiment, tags={STEP_TAG: "train_sae", HOST_TAG: "gpu-node-8", PID_TAG: "1", HEARTBEAT_TAG: f"{time.time() - 3600:.0f}"}
    ).info.run_id
    unopened = client.create_run(experiment, tags={MLFLOW_ENTRY_POINT_TAG: "evaluate"}).info.run_id
    mark_launched(unopened, pid=ended.pid)
    waiting = client.create_run(experiment, tags={MLFLOW_ENTRY_POINT_TAG: "evaluate"}).info.run_id
    mark_launched(waiting, pid=os.getpid())  # this process: alive

    def failed(tags: dict) -> str:
        run = client.create_run(experiment, tags=tags)
        client.set_terminated(run.info.run_id, "FAILED", end_time=1_700_000_000_000)
        return run.info.run_id

    overwritten = failed({STEP_TAG: "train_sae", KILLED_REASON_TAG: f"{LAUNCHER_GONE} 4242 on node-3) is gone"})
    plain = failed({STEP_TAG: "prune_sae"})
    assert sorted(reap_dead_runs([experiment])) == sorted([gone, silent, unopened, overwritten])
    status = lambda run_id: client.get_run(run_id).info.status  # noqa: E731
    assert [status(r) for r in (gone, silent, unopened, overwritten)] == ["KILLED"] * 4
    assert f"process {ended.pid} on {socket.gethostname()} is gone" in client.get_run(gone).data.tags[KILLED_REASON_TAG]
    assert client.get_run(unopened).data.tags["mlflow.runName"] == "evaluate · killed before its run opened"
    assert client.get_run(overwritten).info.end_time == 1_700_000_000_000
    assert [status(r) for r in (colleague.info.run_id, waiting, plain)] == ["RUNNING", "RUNNING", "FAILED"]
    for run_id in (colleague.info.run_id, waiting):
        client.set_terminated(run_id, "FINISHED")  # as their own ends would


def test_the_next_start_reaps_the_dead_and_leaves_the_live_in_one_pass():
    reaping_in_one_pass(experiment_id_for("one-pass"))


def test_only_a_run_its_step_closed_for_a_dead_launcher_is_killed_again():
    """The next start undoes a late FAILED only where the step itself closed its run because its launcher died. A run
    the reaper found silent keeps a FAILED its process wrote after all (it was alive, and its end is the truth), as do
    a plain failure and a run that is not a step's."""
    from saecomp.tracking import LAUNCHER_GONE, experiment_id_for

    client = mlflow.MlflowClient()
    experiment = experiment_id_for("late-failed")

    def failed(tags: dict) -> str:
        run = client.create_run(experiment, tags=tags)
        client.set_terminated(run.info.run_id, "FAILED", end_time=1_700_000_000_000)
        return run.info.run_id

    overwritten = failed({STEP_TAG: "train_sae", KILLED_REASON_TAG: f"{LAUNCHER_GONE} 4242 on node-3) is gone"})
    alive_after_all = failed({STEP_TAG: "train_sae", KILLED_REASON_TAG: "no heartbeat from node-4 for 700 s (found by pid 1 on x)"})
    plain = failed({STEP_TAG: "prune_sae"})
    not_a_step = failed({KILLED_REASON_TAG: f"{LAUNCHER_GONE} 4243 on node-3) is gone"})
    assert reap_dead_runs([experiment]) == [overwritten]
    again = client.get_run(overwritten).info
    assert again.status == "KILLED" and again.end_time == 1_700_000_000_000  # when it ended, not when it was corrected
    assert [client.get_run(r).info.status for r in (alive_after_all, plain, not_a_step)] == ["FAILED"] * 3


def test_a_killed_pipelines_scratch_folders_go_with_the_next_pipeline(tmp_path, monkeypatch):
    """A pipeline's shared model sides and forward passes (GBs at real sizes) live in temporary folders it deletes at
    its end; one SIGKILLed leaves them, so the next pipeline deletes every such folder whose process is gone, and
    nothing of a live process, of another pid namespace or that is not a scratch folder."""
    import tempfile

    from saecomp.tracking import _pid_namespace, _process_start, remove_orphaned_scratch, scratch_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead_start = _process_start(dead.pid)
    dead.kill()
    dead.wait()
    namespace, me = _pid_namespace(), os.getpid()

    def folder(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "batch.pt").write_bytes(b"activations")
        return path

    live = scratch_folder("shared-forward")
    assert live.parent == tmp_path and live.name.startswith(f"saecomp-shared-forward.{namespace}.{me}.")
    orphans = {
        folder(f"saecomp-shared-activations.{namespace}.{dead.pid}.{dead_start}.a1b2c3"),  # its pipeline was killed
        folder(f"saecomp-shared-forward.{namespace}.{me}.{int(_process_start(me)) - 1}.d4e5f6"),  # a reused pid
    }
    kept = {
        live,
        folder(f"saecomp-shared-activations.{int(namespace) + 1}.{dead.pid}.{dead_start}.g7h8i9"),  # another namespace
        folder(f"saecomp-shared-forward.{namespace}.{dead.pid}.unknown.j0k1l2"),  # no start time known
        folder("saecomp-steps-m3n4o5"),  # not a scratch folder
    }
    assert set(remove_orphaned_scratch()) == orphans
    assert not any(path.exists() for path in orphans) and all(path.exists() for path in kept)
