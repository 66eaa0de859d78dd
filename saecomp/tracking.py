"""The one module of `saecomp` that talks to MLflow: runs as steps, reuse of finished runs, lineage.

A step's run carries two tags that make it findable again: ``saecomp.step`` (the entry point) and
``saecomp.key`` (a hash of everything its output depends on: the resolved inputs, the ids of the
upstream runs, and the source code of `saecomp`). A later request with the same key reuses the
FINISHED run instead of computing again; a FAILED, KILLED or still RUNNING run is never reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
CACHE_DIR = Path(os.environ.get("SAECOMP_CACHE", PROJECT_ROOT / ".saecomp" / "cache"))
STEP_TAG, KEY_TAG = "saecomp.step", "saecomp.key"
# MLflow 3.17's UI opens an experiment in its GenAI view unless told it is model development (GUIDE §2).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
LIBRARIES = ("torch", "transformer-lens", "sae-lens", "sae-bench", "mlflow", "transformers")


def experiment_id_for(name: str) -> str:
    """The MLflow experiment named after an experiment file's ``name``: created on first use, and tagged so that
    the UI opens it as model training."""
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            experiment_id = client.create_experiment(name, tags=EXPERIMENT_KIND)
        except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent step
            experiment_id = client.get_experiment_by_name(name).experiment_id
        return experiment_id
    if found.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
        client.set_experiment_tag(found.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND["mlflow.experimentKind"])
    return found.experiment_id


def library_versions() -> dict[str, str]:
    """Tags naming the versions of the libraries a result depends on."""
    from importlib.metadata import PackageNotFoundError, version

    tags = {}
    for package in LIBRARIES:
        try:
            tags[f"saecomp.version.{package}"] = version(package)
        except PackageNotFoundError:
            tags[f"saecomp.version.{package}"] = "not installed"
    return tags


# The modules whose code decides each step's output: a change there makes finished runs stale. (Modules
# such as config.py or tracking.py change no result: the resolved inputs are hashed themselves.)
STEP_CODE = {
    "build_world": ("world",),
    "prune_llm": ("models.py", "data.py", "prune_llm.py"),
    "train_sae": ("models.py", "data.py", "saes.py", "train_sae.py"),
    "prune_sae": ("models.py", "data.py", "saes.py", "prune_llm.py", "prune_sae.py"),
    "evaluate": ("models.py", "data.py", "saes.py", "evaluate.py"),
}


def source_digest(*subpackages: str) -> str:
    """Hash of the source files of `saecomp` (or of the named modules/subpackages): code is an input too."""
    digest = hashlib.sha256()
    roots = [PACKAGE_DIR / s for s in subpackages] if subpackages else [PACKAGE_DIR]
    for root in roots:
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for path in files:
            digest.update(str(path.relative_to(PACKAGE_DIR)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def step_key(step: str, inputs: dict, code: str | None = None) -> str:
    """The identity of a step's output: its resolved inputs and the code that computes it."""
    code = code if code is not None else source_digest(*STEP_CODE[step])
    payload = json.dumps({"step": step, "inputs": inputs, "code": code}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def find_finished_run(step: str, key: str) -> str | None:
    """Id of the FINISHED run of ``step`` with ``key``, in any experiment. The oldest one is canonical: a later
    identical run (started by hand with `mlflow run -e ...`) must not shift the lineage of what was built on it."""
    runs = MlflowClient().search_runs(
        experiment_ids=[e.experiment_id for e in MlflowClient().search_experiments()],
        filter_string=f"tags.`{STEP_TAG}` = '{step}' and tags.`{KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


_REUSED_TAG_LOCK = threading.Lock()  # parallel steps append to one parent's tag
# Steps run as their own process sessions (MLflow starts them with setsid), so Ctrl-C at the terminal does not reach
# them: the pipeline cancels what is live itself (`stop_running_steps`), and no new step starts once it stops.
_LIVE_STEPS: set = set()
_LIVE_LOCK = threading.Lock()
STOPPING = threading.Event()


def stop_running_steps() -> None:
    """Start no new step, and cancel (SIGTERM: each closes its run as FAILED) the ones running now."""
    STOPPING.set()
    with _LIVE_LOCK:
        live = list(_LIVE_STEPS)
    for submitted in live:
        submitted.cancel()


def run_step(
    entry_point: str, parameters: dict[str, str], key: str, experiment_name: str | None = None, parent_run_id: str | None = None
) -> str:
    """Reuse the finished run of ``entry_point`` with ``key``, or run the entry point now (as its own
    MLflow run, in this environment, in the experiment named ``experiment_name``) and return its id. A new run
    is nested under ``parent_run_id`` (default: the active run, the pipeline's; worker threads have none and must
    name it); a reused one keeps its parent and is listed on the parent's ``saecomp.reused_runs`` tag. Safe to call
    from several threads at once: each step is its own process."""
    active = mlflow.active_run()
    parent = parent_run_id or (active.info.run_id if active else None)
    client = MlflowClient()
    existing = find_finished_run(entry_point, key)
    if existing:
        print(f"[saecomp] reusing finished {entry_point} run {existing}", flush=True)
        if parent is not None:
            with _REUSED_TAG_LOCK:
                reused = client.get_run(parent).data.tags.get("saecomp.reused_runs", "")
                if existing not in reused.split(","):
                    client.set_tag(parent, "saecomp.reused_runs", ",".join(r for r in (reused, existing) if r)[:5000])
        return existing
    if not (PROJECT_ROOT / "MLproject").exists():
        raise RuntimeError(f"no finished {entry_point} run with key {key}; run `mlflow run . -e {entry_point}` first")
    if STOPPING.is_set():
        raise RuntimeError(f"not starting {entry_point}: the pipeline is stopping")
    print(f"[saecomp] running {entry_point} {parameters}", flush=True)
    # Nested `mlflow run`s do not inherit the env manager (GUIDE §2), and the shell they start must
    # find this interpreter's `python`.
    here = str(Path(sys.executable).parent)
    if not os.environ.get("PATH", "").startswith(here + os.pathsep):
        os.environ["PATH"] = f"{here}{os.pathsep}{os.environ.get('PATH', '')}"
    if experiment_name is not None:
        experiment_id = experiment_id_for(experiment_name)
    else:
        experiment_id = active.info.experiment_id if active else None
    submitted = mlflow.projects.run(
        uri=str(PROJECT_ROOT),
        entry_point=entry_point,
        parameters=parameters,
        env_manager="local",
        experiment_id=experiment_id,
        synchronous=False,
    )
    run_id = submitted.run_id
    with _LIVE_LOCK:
        _LIVE_STEPS.add(submitted)
    try:
        if parent is not None:  # nested from its start, so that a failed or killed step is found under its pipeline too
            client.set_tag(run_id, "mlflow.parentRunId", parent)
        succeeded = submitted.wait()
    except BaseException:
        submitted.cancel()
        raise
    finally:
        with _LIVE_LOCK:
            _LIVE_STEPS.discard(submitted)
    if not succeeded:
        raise mlflow.exceptions.ExecutionException(f"Run (ID '{run_id}') failed")
    if client.get_run(run_id).data.tags.get(KEY_TAG) != key:
        raise RuntimeError(f"{entry_point} run {run_id} finished with another key than {key}: its inputs changed under it")
    return run_id


def local_artifacts(run_id: str, artifact_path: str) -> Path:
    """A local copy of a run's artifact folder, downloaded once into the cache (atomically)."""
    target = CACHE_DIR / run_id / artifact_path
    if target.exists():
        return target
    staging = CACHE_DIR / run_id / f".{artifact_path.replace('/', '_')}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(staging))
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging / Path(artifact_path).name, target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


# Every step run records who computes it and when that process was last alive, so that a run left RUNNING by a
# dead process can be told from a live one, also another user's on a shared tracking server.
HOST_TAG, PID_TAG, HEARTBEAT_TAG = "saecomp.host", "saecomp.pid", "saecomp.heartbeat"
PID_NAMESPACE_TAG = "saecomp.pid_namespace"  # containers may share a host name but not their process ids
PID_START_TAG = "saecomp.pid_start"  # the process's start (clock ticks after boot): a reused pid has another
KILLED_REASON_TAG = "saecomp.killed_reason"
HEARTBEAT_SECONDS = float(os.environ.get("SAECOMP_HEARTBEAT_SECONDS", 30))
# A run whose process is on another host counts as dead only when its heartbeat is this old.
STALE_AFTER_SECONDS = float(os.environ.get("SAECOMP_STALE_AFTER_SECONDS", 600))


class Heartbeat:
    """Writes ``saecomp.heartbeat`` (epoch seconds) on a run every few seconds from a daemon thread."""

    def __init__(self, run_id: str, every: float = HEARTBEAT_SECONDS):
        self.run_id, self.every = run_id, every
        self._stop = threading.Event()
        MlflowClient().set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{run_id[:8]}", daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(self.every):
            try:
                MlflowClient().set_tag(self.run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
            except Exception:  # a busy store misses one beat; the next one comes
                pass

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def alive(run_id: str):
    """Tag ``run_id`` with this host and process and keep its heartbeat while the block runs."""
    MlflowClient().set_tag(run_id, HOST_TAG, socket.gethostname())
    MlflowClient().set_tag(run_id, PID_TAG, str(os.getpid()))
    MlflowClient().set_tag(run_id, PID_NAMESPACE_TAG, _pid_namespace())
    MlflowClient().set_tag(run_id, PID_START_TAG, _process_start(os.getpid()) or "unknown")
    heartbeat = Heartbeat(run_id)
    try:
        yield
    finally:
        heartbeat.stop()


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "unknown"


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (field 22 of /proc/<pid>/stat), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def why_dead(run, now: float | None = None, host: str | None = None) -> str | None:
    """Why a RUNNING step run has no live process behind it, or None if it may be alive. Its own host can check the
    process; any host can see a heartbeat older than `STALE_AFTER_SECONDS` (also a run that never beat, by its
    start time)."""
    now, host = now or time.time(), host or socket.gethostname()
    tags = run.data.tags
    here = tags.get(HOST_TAG) == host and tags.get(PID_NAMESPACE_TAG, _pid_namespace()) == _pid_namespace()
    if here and tags.get(PID_TAG, "").isdigit():
        if not _process_alive(int(tags[PID_TAG])):
            return f"process {tags[PID_TAG]} on {host} is gone"
        recorded, now_start = tags.get(PID_START_TAG), _process_start(int(tags[PID_TAG]))
        if recorded not in (None, "unknown") and now_start is not None and recorded != now_start:
            return f"process {tags[PID_TAG]} on {host} is gone (its pid belongs to a newer process)"
        return None  # its process is alive here, whatever its heartbeat says
    last_seen = float(tags.get(HEARTBEAT_TAG) or run.info.start_time / 1000)
    if now - last_seen > STALE_AFTER_SECONDS:
        return f"no heartbeat from {tags.get(HOST_TAG, 'an unknown host')} for {now - last_seen:.0f} s"
    return None


def reap_dead_runs(experiment_ids: list[str] | None = None) -> list[str]:
    """Mark the step runs left RUNNING by dead processes KILLED, with the reason as a tag; live runs, this process's
    own (``MLFLOW_RUN_ID``) and other users' live ones, are left alone. Returns the ids marked."""
    client = MlflowClient()
    ids = experiment_ids or [e.experiment_id for e in client.search_experiments()]
    mine = {os.environ.get("MLFLOW_RUN_ID"), *(r.info.run_id for r in [mlflow.active_run()] if r)}
    reaped = []
    for run in client.search_runs(ids, filter_string="attributes.status = 'RUNNING'", max_results=1000):
        if run.info.run_id in mine or STEP_TAG not in run.data.tags:
            continue
        reason = why_dead(run)
        if reason is None:
            continue
        client.set_tag(run.info.run_id, KILLED_REASON_TAG, f"{reason} (found by pid {os.getpid()} on {socket.gethostname()})")
        client.set_terminated(run.info.run_id, "KILLED")
        print(f"[saecomp] marked run {run.info.run_id} ({run.data.tags.get(STEP_TAG)}) KILLED: {reason}", file=sys.stderr, flush=True)
        reaped.append(run.info.run_id)
    return reaped


def _raise_on_sigterm(signum, frame):
    # Turn `kill` into an exception so that the run is closed as FAILED, never left FINISHED.
    raise SystemExit(128 + signum)


_TOLD_ABOUT_DEFAULT = False


@contextlib.contextmanager
def step_run(
    step: str,
    key: str,
    params: dict[str, object],
    experiment_name: str | None = None,
    run_name: str | None = None,
    description: str | None = None,
    tags: dict[str, str] | None = None,
):
    """Open (or resume, under `mlflow run`) the step's run, name, describe and tag it, and log ``params``.

    Outside `mlflow run` the run goes to the experiment named ``experiment_name``; under it MLflow has placed
    the run already (``--experiment-name``), and a run left in MLflow's Default experiment says once how to name
    one. An exception, Ctrl-C or SIGTERM inside closes the run as FAILED/KILLED; only a clean exit marks
    it FINISHED. Params that `mlflow run` already logged from ``-P`` are not logged again (MLflow
    refuses a second value, and the first is what the user typed).
    """
    global _TOLD_ABOUT_DEFAULT
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    reap_dead_runs()
    if os.environ.get("MLFLOW_RUN_ID") or experiment_name is None:
        run = mlflow.start_run()
    else:
        run = mlflow.start_run(experiment_id=experiment_id_for(experiment_name))
    keep_alive = alive(run.info.run_id)
    keep_alive.__enter__()
    try:
        labels = {STEP_TAG: step, KEY_TAG: key, "saecomp.code": source_digest(), **library_versions(), **(tags or {})}
        if run_name:
            labels["mlflow.runName"] = run_name
        if description:
            labels["mlflow.note.content"] = description
        mlflow.set_tags(labels)
        if experiment_name and run.info.experiment_id == "0" and not _TOLD_ABOUT_DEFAULT:
            _TOLD_ABOUT_DEFAULT = True
            print(
                f"[saecomp] this run is in MLflow's Default experiment; `mlflow run . --experiment-name {experiment_name} ...` "
                f"files it (and the steps it starts) under the experiment {experiment_name!r}",
                file=sys.stderr,
                flush=True,
            )
        already = MlflowClient().get_run(run.info.run_id).data.params
        mlflow.log_params({k: v for k, v in params.items() if k not in already})
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        keep_alive.__exit__(None, None, None)
        signal.signal(signal.SIGTERM, previous)


def register_sae(local_dir: str | Path, registered_name: str, tags: dict[str, str]) -> str:
    """Register a SAELens folder in the MLflow Model Registry as a LoggedModel of the active run (a folder
    logged with `log_artifacts` cannot be registered; GUIDE §2). Returns ``name/version``."""
    run = mlflow.active_run()
    logged = mlflow.initialize_logged_model(
        name=re.sub(r"[/:.%\"']", "-", registered_name), source_run_id=run.info.run_id if run else None, tags=tags, model_type="sae"
    )
    try:
        MlflowClient().log_model_artifacts(logged.model_id, str(local_dir))
    except BaseException:
        mlflow.finalize_logged_model(logged.model_id, "FAILED")
        raise
    mlflow.finalize_logged_model(logged.model_id, "READY")
    version = mlflow.register_model(f"models:/{logged.model_id}", registered_name, tags=tags)
    return f"{registered_name}/{version.version}"
