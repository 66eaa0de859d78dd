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

from entrypoints import prune_llm
from saecomp.tracking import HEARTBEAT_TAG, HOST_TAG, KILLED_REASON_TAG, PID_TAG, STEP_TAG, reap_dead_runs, step_run

ROOT = Path(__file__).resolve().parents[1]


def runs_of(step: str):
    client = mlflow.MlflowClient()
    return [
        r
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
        if r.data.tags.get(STEP_TAG) == step
    ]


def start_and_kill_mid_run(small_experiment, sparsity: str):
    """Start prune_llm in its own process, freeze it (SIGSTOP) as soon as its run is tagged, and SIGKILL it if the run
    is still RUNNING then; None if the step was too quick to catch."""
    args = ["--experiment", str(small_experiment), "--sparsity", sparsity]
    before = {r.info.run_id for r in runs_of("prune_llm")}
    process = subprocess.Popen([sys.executable, "-m", "entrypoints.prune_llm", *args], cwd=ROOT, env=dict(os.environ))
    victim = None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline and process.poll() is None:
        started = [r for r in runs_of("prune_llm") if r.info.run_id not in before and r.data.tags.get(PID_TAG) == str(process.pid)]
        if started and HEARTBEAT_TAG in started[0].data.tags:
            os.kill(process.pid, signal.SIGSTOP)  # frozen: it cannot finish between this check and the kill
            victim = started[0]
        time.sleep(0.02)
    caught = victim is not None and mlflow.MlflowClient().get_run(victim.info.run_id).info.status == "RUNNING"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
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
