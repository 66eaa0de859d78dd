"""The prune_llm step as a user drives it: bad input, reuse of finished runs, interruption, artifacts."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
from click.testing import CliRunner
from conftest import ROOT

from entrypoints import prune_llm
from saecomp.tracking import experiment_id_for, local_store_database, open_local_store


def all_runs():
    client = mlflow.MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)


BAD_INPUTS = [
    (["--sparsity", "abc"], "llm_pruning.sparsity='abc' is not a number"),
    (["--sparsity", "1.2"], "sparsity=1.2 is not valid; valid: a number in [0, 1)"),
    (["--method", "foo"], "method='foo' is not valid; valid: wanda, magnitude, wanda-seed"),
    (["--model", "not-a-model"], "model='not-a-model' is not a known model"),
    (["--nm", "4:2"], "nm='4:2' is not valid; N:M needs 0 < N < M"),
    (["--nm", "two"], "nm='two' is not an N:M pattern"),
    (["--nm", "2:3"], "nm=2:3 is not valid for this model: W_Q/W_K/W_V/W_in have 32 inputs, not a multiple of 3"),
    (["--layers", "7"], "layer=7 is outside tiny-gpt2; valid: 0..1"),
    (["--seq_len", "100000"], "calibration.seq_len=100000 is longer than tiny-gpt2's context; valid: 2..64, or null for the whole context"),
    (["--calibration_sequences", "0"], "calibration.n_sequences=0 must be at least 1"),
    (["--device", "cuda:99"], "device='cuda:99' is not available"),
    (["--device", "tpu"], "device='tpu' is not valid; valid: cpu, cuda, cuda:<index>, mps"),
    (["--dtype", "int8"], "dtype='int8' is not valid; valid: float32, bfloat16, float16"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[a[0] + "=" + a[1] for a, _ in BAD_INPUTS])
def test_bad_input_fails_before_any_run_or_compute(small_experiment, args, message):
    before = len(all_runs())
    result = CliRunner().invoke(prune_llm.main, ["--experiment", str(small_experiment), *args])
    assert result.exit_code == 2
    assert f"saecomp: error: {message}" in result.output
    assert len(all_runs()) == before, "a run was opened for bad input"


def test_ctrl_c_is_said_once_by_the_process_the_user_started(monkeypatch):
    """Ctrl-C reaches every process of the terminal's group: a step started by another saecomp process (its launcher,
    interrupted too) exits quietly, so the user reads one line, not one "Aborted!" per process."""
    import click

    from entrypoints.common import experiment_option
    from saecomp import tracking

    @click.command()
    @experiment_option
    def interrupted(experiment):
        raise KeyboardInterrupt

    said = CliRunner().invoke(interrupted, [])
    assert said.exit_code == 1
    assert said.output.strip() == "Aborted. Finished steps are kept; the same command resumes from them."
    monkeypatch.setattr(tracking, "_MY_LAUNCHER", f"{os.getppid()}:0:here")  # started by a pipeline
    quiet = CliRunner().invoke(interrupted, [])
    assert quiet.exit_code == 1 and quiet.output == ""


def test_bad_experiment_files(tmp_path):
    cases = {
        tmp_path / "missing.yaml": "cannot be read",
        tmp_path / "broken.yaml": "is not valid YAML",
        tmp_path / "unknown.yaml": "unknown key llm_pruning.sparsty; valid keys: method, sparsity, nm, layers",
        tmp_path / "hub-world.yaml": "world settings apply only to tiny models",
        tmp_path / "nameless.yaml": "names no experiment; valid: a `name:` line, the MLflow experiment its runs go to",
        tmp_path / "empty.yaml": "names no experiment",
    }
    (tmp_path / "nameless.yaml").write_text("model: tiny-gpt2\nllm_pruning: {sparsity: 0.3}\n")
    (tmp_path / "empty.yaml").write_text("# every line commented out\n")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    (tmp_path / "unknown.yaml").write_text("llm_pruning:\n  sparsty: 0.5\n")
    (tmp_path / "hub-world.yaml").write_text("model: gpt2\ndata: {dataset: Skylion007/openwebtext}\nworld: {vocab_size: 10}\n")
    for path, message in cases.items():
        result = CliRunner().invoke(prune_llm.main, ["--experiment", str(path)])
        assert result.exit_code == 2, path
        assert message in result.output, (path, result.output)


def test_mlflow_run_with_bad_input_leaves_a_failed_run(small_experiment):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "run",
            str(ROOT),
            "-e",
            "prune_llm",
            "--env-manager",
            "local",
            "-P",
            f"experiment={small_experiment}",
            "-P",
            "sparsity=abc",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert "saecomp: error: llm_pruning.sparsity='abc' is not a number" in out.stderr
    run = sorted(all_runs(), key=lambda r: r.info.start_time)[-1]
    assert run.data.tags["mlflow.project.entryPoint"] == "prune_llm"
    assert run.info.status == "FAILED"
    assert mlflow.MlflowClient().list_artifacts(run.info.run_id) == []
    # and it says why, where the UI shows it
    assert run.data.tags["saecomp.error"] == "llm_pruning.sparsity='abc' is not a number"
    assert run.data.tags["mlflow.note.content"].endswith("llm_pruning.sparsity='abc' is not a number")


def test_world_is_built_once_and_reused(small_experiment, tracked_world):
    from entrypoints.common import load, resolve_world, world_step

    # The world of this experiment's model (other tests build the world of another model, tiny-gemma2: its own key).
    exp = load(str(small_experiment), {})
    key = world_step(exp, str(small_experiment))[0]
    worlds = [r for r in all_runs() if r.data.tags.get("saecomp.step") == "build_world" and r.data.tags.get("saecomp.key") == key]
    seen = [(r.info.run_name, r.info.status, r.data.tags.get("mlflow.parentRunId"), r.data.tags.get("saecomp.process")) for r in worlds]
    assert len(worlds) == 1 and worlds[0].info.status == "FINISHED", seen
    assert "tiny-gpt2.train_loss" in worlds[0].data.metrics
    assert resolve_world(exp, str(small_experiment)) == tracked_world
    assert len([r for r in all_runs() if r.data.tags.get("saecomp.key") == key]) == 1  # reused, not built again
    assert (tracked_world / "tiny-gpt2" / "config.json").exists()


def test_prune_llm_logs_what_it_did(small_experiment, tracked_world):
    result = CliRunner().invoke(prune_llm.main, ["--experiment", str(small_experiment), "--nm", "2:4", "--model", "tiny-gemma2"])
    assert result.exit_code == 0, result.output
    run = sorted([r for r in all_runs() if r.data.tags.get("saecomp.step") == "prune_llm"], key=lambda r: r.info.start_time)[-1]
    assert run.info.status == "FINISHED"
    params, metrics = run.data.params, run.data.metrics
    assert params["model"] == "tiny-gemma2" and params["method"] == "wanda" and float(params["sparsity"]) == 0.5
    assert abs(metrics["sparsity_actual"] - 0.5) < 1e-9
    assert metrics["ce_loss_pruned"] > metrics["ce_loss_dense"] > 0
    assert {"calibration_seconds", "pruning_seconds", "perplexity_pruned"} <= set(metrics)
    # The artifacts load with the tools people know, and carry the pruning.
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id))
    model = AutoModelForCausalLM.from_pretrained(local / "pruned_model")
    assert (model.model.layers[0].mlp.gate_proj.weight == 0).float().mean().item() == 0.5
    tokens = load_file(local / "tokens.safetensors")
    assert tokens["calibration_tokens"].shape == (16, 64)
    # Findable in the UI: its own experiment (opened as model training), a name, a description, tags, versions.
    experiment = mlflow.MlflowClient().get_experiment(run.info.experiment_id)
    assert experiment.name == "small" and experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # Its artifacts beside the session's database, never under ./mlruns of the directory the step ran from (the repo).
    store_folder = local_store_database().parent
    assert Path(urlparse(run.info.artifact_uri).path).is_relative_to(store_folder / "mlruns" / experiment.experiment_id)
    assert not Path(urlparse(run.info.artifact_uri).path).is_relative_to(ROOT)
    tags = run.data.tags
    assert tags["mlflow.runName"] == "prune_llm · tiny-gemma2 wanda 2:4"
    assert "Pruned the attention and MLP weights of tiny-gemma2 with wanda" in tags["mlflow.note.content"]
    assert tags["method"] == "wanda" and tags["sparsity"] == "0.5"
    assert {f"saecomp.version.{p}" for p in ("torch", "transformer-lens", "sae-lens", "sae-bench", "mlflow")} <= set(tags)
    assert tags["saecomp.version.torch"].startswith("2.")
    # The processor behind its device, which compare matches before it calls a difference a finding
    from saecomp.tracking import accelerator_name

    assert tags["saecomp.accelerator"] == accelerator_name("cpu") != "" and run.data.params["device"] == "cpu"


def test_prune_llm_runs_and_logs_in_bfloat16(small_experiment, tracked_world):
    """`dtype` reaches the model: a bfloat16 run is its own run (another key), logs its dtype, and its
    exported checkpoint is bfloat16 with the masks' exact sparsity."""
    result = CliRunner().invoke(prune_llm.main, ["--experiment", str(small_experiment), "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    runs = [r for r in all_runs() if r.data.tags.get("saecomp.step") == "prune_llm" and r.info.status == "FINISHED"]
    bf16 = [r for r in runs if r.data.params.get("dtype") == "bfloat16"]
    assert len(bf16) == 1 and bf16[0].data.params["device"] == "cpu"
    assert bf16[0].data.tags["saecomp.key"] not in {r.data.tags["saecomp.key"] for r in runs if r.data.params.get("dtype") == "float32"}
    assert abs(bf16[0].data.metrics["sparsity_actual"] - 0.5) < 1e-9
    from transformers import AutoConfig

    local = Path(mlflow.artifacts.download_artifacts(run_id=bf16[0].info.run_id, artifact_path="pruned_model"))
    assert str(AutoConfig.from_pretrained(local).dtype).endswith("bfloat16")


def test_interrupted_prune_never_looks_finished(small_experiment, tracked_world):
    """SIGTERM once the run is open and the pruning has begun: the run ends FAILED or KILLED with no artifact. The
    signal is sent when the step reports the dense cross-entropy, 7 s of pruning before its end on an idle machine;
    on a loaded one the step can finish before the signal lands, so it is then tried again with 4x the calibration
    text (more to prune), until one attempt is interrupted."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    for sequences in (3000, 12000, 48000):
        command = ["--experiment", str(small_experiment), "--calibration_sequences", str(sequences)]
        process = subprocess.Popen(
            [sys.executable, "-m", "entrypoints.prune_llm", *command],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "dense held-out cross-entropy" in line:
                process.send_signal(signal.SIGTERM)
                break
        rest = process.stderr.read()  # what the step wrote after the signal was sent
        process.wait(timeout=300)
        if "[prune_llm] done:" not in rest:
            break  # interrupted before its end
    else:
        pytest.fail(f"the step finished before SIGTERM reached it at every size tried:\n{''.join(lines)}{rest}")
    assert process.returncode != 0, "".join(lines) + rest
    run = sorted([r for r in all_runs() if r.data.tags.get("saecomp.step") == "prune_llm"], key=lambda r: r.info.start_time)[-1]
    assert run.data.params.get("calibration.n_sequences") == str(sequences)
    assert run.info.status in ("FAILED", "KILLED")
    assert mlflow.MlflowClient().list_artifacts(run.info.run_id) == []


def test_step_run_marks_ctrl_c_killed():
    from saecomp.tracking import step_run

    with pytest.raises(KeyboardInterrupt):
        with step_run("probe", "key-1", {"x": 1}) as run:
            raise KeyboardInterrupt
    assert mlflow.MlflowClient().get_run(run.info.run_id).info.status == "KILLED"


class _SigtermInDel:
    """Freed at once; its `__del__` is where the SIGTERM handler runs and where Python drops what it raises (as it did
    once in a WeakKeyDictionary's callback in CI: that prune ran on to FINISHED)."""

    def __del__(self):
        signal.raise_signal(signal.SIGTERM)  # handled in this thread before the call returns: inside `__del__`


def test_a_sigterm_whose_exception_python_drops_still_stops_the_step():
    from saecomp.tracking import step_run

    reached_the_end = False
    with pytest.raises(SystemExit) as stopped:
        with step_run("probe", "key-term-dropped", {}) as run:
            _SigtermInDel()
            for _ in range(500):  # 5 s of work in plain code, where the signal sent again lands
                time.sleep(0.01)
            reached_the_end = True
    assert stopped.value.code == 143 and not reached_the_end
    assert mlflow.MlflowClient().get_run(run.info.run_id).info.status == "FAILED"


def test_a_sigterm_dropped_as_the_step_ends_never_finishes_its_run(monkeypatch):
    """Dropped in the step's last statement: no plain code is left for the signal sent again, which lands while the step
    closes its run, slowly here (a tracking server's round trip): the run still ends FAILED, never RUNNING, and the
    step's handlers are undone."""
    from saecomp.tracking import step_run

    set_terminated = mlflow.MlflowClient.set_terminated

    def slowly(self, *args, **kwargs):
        time.sleep(0.2)  # the signal sent again lands in here
        return set_terminated(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", slowly)
    before = signal.getsignal(signal.SIGTERM), sys.unraisablehook
    with pytest.raises(SystemExit) as stopped:
        with step_run("probe", "key-term-dropped-last", {}) as run:
            _SigtermInDel()
    assert stopped.value.code == 143
    monkeypatch.undo()
    time.sleep(0.2)  # the signal sent again (if still to come) finds SIGTERM's handler restored and does nothing
    assert mlflow.MlflowClient().get_run(run.info.run_id).info.status == "FAILED"
    assert (signal.getsignal(signal.SIGTERM), sys.unraisablehook) == before


def test_a_sigterm_a_library_swallows_is_sent_again_until_the_step_stops(monkeypatch, capfd):
    """Code that catches BaseException (or a bare `except:`) swallows the exit a SIGTERM raised, and the step would run
    on to its end: the signal is sent again while the step stays in its body, so it stops within a resend period,
    FAILED. A step that obeyed the first one is closed by then and gets nothing more."""
    from saecomp import tracking
    from saecomp.tracking import step_run

    monkeypatch.setattr(tracking, "SIGTERM_RESEND_SECONDS", 0.3)
    swallowed = 0
    started = time.monotonic()
    with pytest.raises(SystemExit) as stopped:
        with step_run("probe", "key-term-swallowed", {}) as run:
            try:
                signal.raise_signal(signal.SIGTERM)
            except BaseException:  # noqa: BLE001 - a library's broad handler: what the test is about
                swallowed += 1
            threading.Event().wait(30)  # then a blocking wait (a queue, a join): the resend interrupts it
    assert stopped.value.code == 143 and swallowed == 1
    assert time.monotonic() - started < 10
    assert mlflow.MlflowClient().get_run(run.info.run_id).info.status == "FAILED"
    assert "sent again" in capfd.readouterr().err

    # obeyed at once: closed before the period is over, and nothing is sent into what runs next
    with pytest.raises(SystemExit):
        with step_run("probe", "key-term-obeyed", {}):
            signal.raise_signal(signal.SIGTERM)
    time.sleep(0.6)
    assert capfd.readouterr().err.count("sent again") == 0


def test_a_sigterm_landing_as_the_step_begins_to_close_never_leaves_its_run_open(monkeypatch):
    """The signal can land in the few bytecodes between the body's clean end and the step's switch to counting
    signals: raised there, it skips the step's `except` clauses, and a run left open would be marked FINISHED by
    MLflow's exit hook. The step closes it FAILED on its way out."""
    from saecomp import tracking
    from saecomp.tracking import step_run

    install = signal.signal
    landed, ran = [], []

    def lands_first(signum, handler):  # the first switch to counting after the body: where the signal lands
        if handler is tracking._count_sigterm and ran and not landed:
            landed.append(True)
            raise tracking._Terminated(128 + signal.SIGTERM)
        return install(signum, handler)

    monkeypatch.setattr(signal, "signal", lands_first)
    with pytest.raises(SystemExit):
        with step_run("probe", "key-term-closing", {}) as run:
            ran.append(True)
    monkeypatch.undo()
    assert landed and mlflow.active_run() is None
    assert mlflow.MlflowClient().get_run(run.info.run_id).info.status == "FAILED"


def test_a_sigterm_landing_while_mlflow_creates_the_run_closes_that_run(monkeypatch):
    """A SIGTERM between the run's creation in the store and `mlflow.start_run`'s return: raised there, the run stayed
    RUNNING, unknown to the step and with no tag to say whose it was. It is counted until the run is open, then the
    step closes it FAILED and exits as a SIGTERM makes it."""
    from saecomp.tracking import step_run

    start_run = mlflow.start_run
    created = []

    def signalled_inside(*args, **kwargs):
        run = start_run(*args, **kwargs)
        created.append(run.info.run_id)
        os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode: still inside start_run
        return run

    monkeypatch.setattr(mlflow, "start_run", signalled_inside)
    body = []
    with pytest.raises(SystemExit) as exit_:
        with step_run("probe", "key-term-creating", {}):
            body.append(True)
    monkeypatch.undo()
    assert exit_.value.code == 128 + signal.SIGTERM and not body and mlflow.active_run() is None
    assert mlflow.MlflowClient().get_run(created[0]).info.status == "FAILED"


@pytest.mark.parametrize("fails", [False, True])
def test_a_store_refusing_the_final_status_still_gets_it(monkeypatch, fails):
    """MLflow takes the run off its stack before it writes the status, so a store that refused that one write (SQLite
    locked by another process, a server's hiccup) left the run of a step that had ended RUNNING. The status is written
    again: FINISHED after a clean body, FAILED after an exception."""
    from mlflow.exceptions import MlflowException

    from saecomp.tracking import step_run

    set_terminated = mlflow.MlflowClient.set_terminated
    refused, step = [], []

    def refuses_once(self, run_id, status=None, end_time=None):
        if step == [run_id] and not refused:  # the step's own run (a start also closes dead runs it finds: not those)
            refused.append(status)
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return set_terminated(self, run_id, status, end_time)

    monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", refuses_once)
    with contextlib.suppress(RuntimeError):
        with step_run("probe", f"key-refused-{fails}", {}) as run:
            step.append(run.info.run_id)
            if fails:
                raise RuntimeError("the step's own failure")
    monkeypatch.undo()
    expected = "FAILED" if fails else "FINISHED"
    assert refused == [expected] and mlflow.active_run() is None
    assert mlflow.MlflowClient().get_run(run.info.run_id).info.status == expected


def test_the_oldest_finished_run_of_a_key_is_canonical():
    from saecomp.tracking import find_finished_run, step_run

    ids = []
    for _ in range(2):
        with step_run("probe-canonical", "same-key", {}) as run:
            ids.append(run.info.run_id)
    assert find_finished_run("probe-canonical", "same-key") == ids[0]


def test_a_sqlite_stores_experiments_keep_their_artifacts_beside_it_whatever_the_working_directory(tmp_path, monkeypatch):
    """MLflow's client files a new experiment's artifacts under ./mlruns of the process creating it: a store elsewhere
    would leave them in each caller's directory. saecomp's experiments, and the Default one of a store it creates,
    go beside the database, in MLflow's layout."""
    store_folder, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{store_folder / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        assert local_store_database() == store_folder / "mlflow.db"
        open_local_store()  # a new store: created with its Default experiment
        client = mlflow.MlflowClient()
        assert Path(urlparse(client.get_experiment("0").artifact_location).path) == store_folder / "mlruns" / "0"
        experiment_id = experiment_id_for("beside")
        experiment = client.get_experiment(experiment_id)
        assert Path(urlparse(experiment.artifact_location).path) == store_folder / "mlruns" / experiment_id
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        assert experiment_id_for("beside") == experiment_id  # found, not created twice
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.log_text("x", "x.txt")
        assert (store_folder / "mlruns" / experiment_id / run.info.run_id / "artifacts" / "x.txt").is_file()
        assert not (elsewhere / "mlruns").exists()
        # relative URIs are the working directory's (MLflow's default store, sqlite:///mlflow.db); other stores: MLflow's way
        assert local_store_database("sqlite:///mlflow.db") == elsewhere / "mlflow.db"
        assert local_store_database("http://127.0.0.1:5000") is None and open_local_store("sqlite://") is None
    finally:
        mlflow.set_tracking_uri(previous)
