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
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from saecomp.config import ACCELERATOR_TAG
from saecomp.step_server import LAUNCHER_ENV  # noqa: F401 - "SAECOMP_LAUNCHER", also tracking's

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
CACHE_DIR = Path(os.environ.get("SAECOMP_CACHE", PROJECT_ROOT / ".saecomp" / "cache"))
STEP_TAG, KEY_TAG = "saecomp.step", "saecomp.key"
# MLflow 3.17's UI opens an experiment in its GenAI view unless told it is model development (GUIDE §2).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
LIBRARIES = ("torch", "transformer-lens", "sae-lens", "sae-bench", "mlflow", "transformers")


def local_store_database(tracking_uri: str | None = None) -> Path | None:
    """The database file of a SQLite tracking store (``sqlite:///mlflow.db`` relative to the working directory,
    ``sqlite:////abs/mlflow.db`` absolute), or None for any other store."""
    uri = tracking_uri or mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None  # a server, another database, or SQLite in memory (sqlite://)
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).resolve()


def open_local_store(tracking_uri: str | None = None):
    """A SQLite store's ``SqlAlchemyStore`` whose new experiments keep their artifacts beside its database, in MLflow's
    own layout (``<database's folder>/mlruns/<experiment id>``), created with its Default experiment there if new; None
    for any other store. MLflow's client puts them under ``./mlruns`` of whatever directory the creating process runs
    in, so a store at another path (a test session's, one on a shared disk) would scatter its artifacts into its
    callers' working directories (the repository's, for a step)."""
    database = local_store_database(tracking_uri)
    if database is None or os.environ.get("MLFLOW_ENABLE_WORKSPACES", "").lower() in ("1", "true"):
        return None  # workspaces take another store class: MLflow's own default then
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    database.parent.mkdir(parents=True, exist_ok=True)
    return SqlAlchemyStore(f"sqlite:///{database}", str(database.parent / "mlruns"))


ARTIFACT_ROOT_ENV = "SAECOMP_ARTIFACT_ROOT"
"""Where a database store without a server (``postgresql+psycopg2://...``) keeps new experiments' artifacts:
``<root>/<experiment name>`` (an S3 URI or a folder every machine mounts)."""


def serverless_database(tracking_uri: str | None = None) -> bool:
    """Whether the store is a database other than SQLite reached directly, with no tracking server between (MLflow's
    client then puts a new experiment's artifacts under ``./mlruns`` of whichever process creates it)."""
    from urllib.parse import urlparse

    scheme = urlparse(tracking_uri or mlflow.get_tracking_uri()).scheme.split("+")[0]
    return scheme in ("postgresql", "mysql", "mssql")


def check_artifact_store(name: str) -> None:
    """Raise ValueError where experiment ``name`` would be created in a serverless database with its artifacts in the
    creating process's working directory, out of every other machine's and user's reach."""
    if not serverless_database() or os.environ.get(ARTIFACT_ROOT_ENV) or MlflowClient().get_experiment_by_name(name):
        return
    raise ValueError(
        f"MLFLOW_TRACKING_URI={_without_password(mlflow.get_tracking_uri())} is a database with no tracking server: MLflow would "
        f"keep the new experiment {name!r}'s artifacts under {Path.cwd() / 'mlruns'}, where no other machine or user finds them; "
        f"use a tracking server (MLFLOW_TRACKING_URI=http://..., README: A shared tracking server), or say where they go: "
        f"{ARTIFACT_ROOT_ENV}=s3://bucket/path or a shared folder"
    )


class StoreRefused(ValueError):
    """The tracking store refused this client (a server's authentication or permissions, or no server at all), said
    in one line: each entry point prints it so (``entrypoints.common.experiment_option``), wherever it is raised."""


_ACCESS_CHECKED: set[tuple] = set()
SERVER_REACH_SECONDS = 20.0
"""How long a step tries to open a connection to its tracking server before saying it is unreachable (a server that
restarts comes back within it); MLflow's own client would retry for minutes and then raise its traceback."""


def _unreachable(uri: str) -> str | None:
    """Why no TCP connection to the server of ``uri`` opens within ``SERVER_REACH_SECONDS``, or None when one does
    (or when a proxy stands between, whose reach a direct connection does not test)."""
    from saecomp.names import unreachable_now

    deadline = time.monotonic() + SERVER_REACH_SECONDS
    while True:
        why = unreachable_now(uri, timeout_s=max(1.0, min(5.0, SERVER_REACH_SECONDS)))
        if why is None or time.monotonic() >= deadline:
            return why
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def check_tracking_access(name: str, write: bool = True) -> None:
    """Raise StoreRefused, in one line, where a tracking server refuses this client: no or wrong credentials (HTTP 401,
    from MLflow's basic-auth app) or no permission to read experiment ``name`` or, with ``write``, to add runs to it
    (403; a run needs EDIT on its experiment, which setting the experiment's kind tag needs too: it is set to what it
    is, or to what ``experiment_id_for`` would set); or a server that does not answer at all (``_unreachable``).
    Without this a step dies on its first store call in MLflow's traceback, after minutes of retries for a server that
    is not there. Servers only (``http(s)://``); once per process, server, experiment and credentials. Creating an
    experiment that does not exist yet is not probed (a probe would create it); ``experiment_id_for`` says in one line
    when the server refuses that."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    user, password, token = (os.environ.get(f"MLFLOW_TRACKING_{v}") for v in ("USERNAME", "PASSWORD", "TOKEN"))
    secrets = hashlib.sha256(json.dumps([password, token]).encode()).hexdigest()  # new credentials are checked again
    checked = (uri, name, user, secrets, write)
    if checked in _ACCESS_CHECKED:
        return
    if why := _unreachable(uri):
        raise StoreRefused(
            f"the tracking server {_without_password(uri)} is not reachable ({why}, for {SERVER_REACH_SECONDS:g} s); is it "
            "running, and is MLFLOW_TRACKING_URI right?"
        )
    client, doing = MlflowClient(), "read"
    try:
        found = client.get_experiment_by_name(name)
        if write and found is not None:
            doing = "add runs to"
            (kind, default), = EXPERIMENT_KIND.items()
            client.set_experiment_tag(found.experiment_id, kind, found.tags.get(kind, default))
    except mlflow.exceptions.MlflowException as error:
        server = _without_password(uri)
        if error.error_code == "UNAUTHENTICATED":
            if user and password:
                who = f"the credentials of MLFLOW_TRACKING_USERNAME={user!r}"
            elif token:
                who = "the token of MLFLOW_TRACKING_TOKEN"
            else:  # MLflow sends a user name only with a password
                who = f"this client (MLFLOW_TRACKING_{'PASSWORD' if user else 'USERNAME'} not set)"
            raise StoreRefused(
                f"the tracking server {server} refused {who} (401: not authenticated); set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD to an account on it (README: A shared tracking server)"
            ) from None
        if error.error_code == "PERMISSION_DENIED":
            # under `mlflow run` the step's own run is where MLflow put it; the upstream steps it starts go to `name`
            where = " (where the steps this one starts make their runs)" if doing != "read" and os.environ.get("MLFLOW_RUN_ID") else ""
            raise StoreRefused(
                f"the tracking server {server} does not let {user or 'this client'} {doing} experiment {name!r}{where} (403: "
                f"permission denied); ask its owner or the server's admin for {'EDIT' if write else 'READ'} permission on it, or "
                "name another experiment (`name:` in the experiment file)"
            ) from None
        raise
    _ACCESS_CHECKED.add(checked)


def _terminal():
    """The process's own stderr, for what a watch thread or a signal hook says: during an SAEBench suite `sys.stderr`
    is the suite's log (`entrypoints/evaluate.py`), which a process ending with `os._exit` never uploads."""
    return sys.__stderr__ or sys.stderr


def placed_artifacts_warning(run_id: str) -> str | None:
    """A warning where run ``run_id`` (placed by `mlflow run`) is in an experiment of a serverless database that keeps
    MLflow's default location, ``<working directory of whoever created it>/mlruns/<id>``: `mlflow run --experiment-name`
    creates a missing experiment there before the step can say anything, and no other machine or user finds the
    artifacts. ``None`` for any other store or location."""
    if not serverless_database():
        return None
    client = MlflowClient()
    try:
        experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    except Exception as error:  # noqa: BLE001 - a warning must not stop the step; the store's error will show where it matters
        return f"could not check where run {run_id}'s artifacts go ({type(error).__name__}: {str(error)[:200]})"
    location = experiment.artifact_location
    if "://" in location and not location.startswith("file://"):
        return None  # s3://, gs://, ...: reachable from elsewhere
    folder = Path(location.removeprefix("file://"))
    if folder.name != experiment.experiment_id or folder.parent.name != "mlruns":
        return None  # a location somebody chose (a shared folder): not MLflow's default
    fix = (
        f"pass `--experiment-name <the experiment file's name>` after creating that experiment with {ARTIFACT_ROOT_ENV} set "
        f"(any saecomp step or the pipeline, started directly), or use a tracking server"
        if experiment.experiment_id == "0"  # Default: created with the database, where the first client stood
        else f"for a new experiment, start any saecomp step or the pipeline with {ARTIFACT_ROOT_ENV} set before `mlflow run`, "
        f"or use a tracking server"
    )
    return (
        f"experiment {experiment.name!r} keeps its artifacts in {location}, a folder of the machine that created it (MLflow's "
        f"default where MLFLOW_TRACKING_URI is a database with no tracking server, as when `mlflow run --experiment-name` "
        f"creates the experiment): no other machine or user will find this run's artifacts. To share them, {fix}"
    )


def _without_password(uri: str) -> str:
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    return uri.replace(f":{parsed.password}@", ":***@") if parsed.password else uri


def experiment_id_for(name: str) -> str:
    """The MLflow experiment named after an experiment file's ``name``: created on first use (its artifacts beside a
    SQLite store's database: ``open_local_store``; in a serverless database, under ``SAECOMP_ARTIFACT_ROOT``:
    ``check_artifact_store``), and tagged so that the UI opens it as model training."""
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is None:
        check_artifact_store(name)
        try:
            local_store = open_local_store()
            if local_store is not None:
                from mlflow.entities import ExperimentTag

                experiment_id = local_store.create_experiment(name, tags=[ExperimentTag(k, v) for k, v in EXPERIMENT_KIND.items()])
            elif serverless_database():
                root = os.environ[ARTIFACT_ROOT_ENV].rstrip("/")
                if "://" not in root:  # a folder: absolute, never relative to whichever directory the process runs in
                    root = str(Path(root).resolve())
                experiment_id = client.create_experiment(name, artifact_location=f"{root}/{name}", tags=EXPERIMENT_KIND)
            else:
                experiment_id = client.create_experiment(name, tags=EXPERIMENT_KIND)
        except mlflow.exceptions.MlflowException as error:  # created meanwhile by a concurrent step
            found = client.get_experiment_by_name(name)
            if found is None and error.error_code == "PERMISSION_DENIED":  # a server's workspace permissions
                user = os.environ.get("MLFLOW_TRACKING_USERNAME") or "this client"
                raise StoreRefused(
                    f"the tracking server {_without_password(mlflow.get_tracking_uri())} does not let {user} create experiment "
                    f"{name!r} (403: permission denied); ask its admin to create it or to let you create experiments"
                ) from None
            if found is None:  # not a race: the store refused for another reason, said by MLflow
                raise
            experiment_id = found.experiment_id
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


def accelerator_name(device: str) -> str:
    """The model of the processor behind ``device`` ("cuda:1" -> its GPU's name, "cpu" -> the CPU's model name)."""
    import platform

    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(device))
        return "cuda (not available)"
    if device.startswith("mps"):
        return "Apple MPS " + platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown cpu"


def _step_code() -> dict[str, tuple[str, ...]]:
    # The modules whose code decides each step's output (declared in saecomp.graph): a change there makes finished
    # runs stale. (Modules such as config.py or tracking.py change no result: the resolved inputs are hashed themselves.)
    from saecomp.graph import STEPS

    return {name: step.code for name, step in STEPS.items()}


STEP_CODE = _step_code()


PACKAGE_DATA = ("*.csv",)
"""Data files of the package that a step reads as it reads its code (``paper/*.csv``: the paper's published numbers,
which compare prints beside ours): in the digests as code is."""


def source_digest(*subpackages: str) -> str:
    """Hash of the source files of `saecomp` (or of the named modules/subpackages) and their data files: code is an
    input too."""
    digest = hashlib.sha256()
    roots = [PACKAGE_DIR / s for s in subpackages] if subpackages else [PACKAGE_DIR]
    for root in roots:
        files = [root] if root.is_file() else sorted(p for pattern in ("*.py", *PACKAGE_DATA) for p in root.rglob(pattern))
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
    return _oldest_finished(f"tags.`{STEP_TAG}` = '{step}' and tags.`{KEY_TAG}` = '{key}'")


def _oldest_finished(tag_filter: str) -> str | None:
    """Id of the oldest FINISHED run, in any experiment, that matches ``tag_filter``."""
    runs = MlflowClient().search_runs(
        experiment_ids=[e.experiment_id for e in MlflowClient().search_experiments()],
        filter_string=f"{tag_filter} and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


SUITE_KEY_TAG = "saecomp.suite_key."
"""`evaluate` tags each suite it computed with that suite's own key, so one suite's result is reused alone."""


def find_finished_suite(suite: str, key: str) -> str | None:
    """Id of the oldest FINISHED `evaluate` run that computed ``suite`` with that suite's ``key``."""
    return _oldest_finished(f"tags.`{STEP_TAG}` = 'evaluate' and tags.`{SUITE_KEY_TAG}{suite}` = '{key}'")


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
    from saecomp import executors

    cancel = getattr(executors.current(), "cancel", None)
    if cancel is not None:
        cancel()


# A step process watches the process that launched it (``SAECOMP_LAUNCHER`` = "pid:start:pid space"): when the launcher dies
# (a SIGKILLed pipeline, a lost Ray worker), the step closes its run as KILLED and exits, instead of finishing
# unseen while a rerun computes the same thing again.
# Read (and removed) at import: the variable is for this process alone, never for what it starts by other means.
_MY_LAUNCHER = os.environ.pop(LAUNCHER_ENV, None)
_LAUNCH_LOCK = threading.Lock()  # the variable is set only around the start of one step


def launched_by_saecomp() -> bool:
    """Whether this step was started by another saecomp process (a pipeline, a step that ran its upstream), which
    waits on it and speaks for it."""
    return _MY_LAUNCHER is not None


def note_reused(parent: str | None, run_ids: list[str]) -> None:
    """List reused runs on the parent's ``saecomp.reused_runs`` tag (a reused run keeps its own parent)."""
    if parent is None:
        return
    client = MlflowClient()
    with _REUSED_TAG_LOCK:
        reused = client.get_run(parent).data.tags.get("saecomp.reused_runs", "")
        new = [r for r in run_ids if r not in reused.split(",")]
        if new:
            client.set_tag(parent, "saecomp.reused_runs", ",".join(r for r in (reused, *new) if r)[:5000])


def run_step(
    entry_point: str,
    parameters: dict[str, str],
    key: str,
    experiment_name: str | None = None,
    parent_run_id: str | None = None,
    priority: int = 1,
) -> str:
    """Reuse the finished run of ``entry_point`` with ``key``, or run the entry point now (as its own
    MLflow run, in the experiment named ``experiment_name``, wherever the current executor puts it) and return its
    id. A new run is nested under ``parent_run_id`` (default: the active run, the pipeline's; worker threads have
    none and must name it); a reused one keeps its parent and is listed on the parent's ``saecomp.reused_runs`` tag.
    Safe to call from several threads at once: each step is its own process. ``priority``: among the steps waiting
    for a slot of a local pool, lower numbers start first (`executors.PrioritySlots`)."""
    from saecomp import executors

    active = mlflow.active_run()
    parent = parent_run_id or (active.info.run_id if active else None)
    client = MlflowClient()
    existing = find_finished_run(entry_point, key)
    if existing:
        print(f"[saecomp] reusing finished {entry_point} run {existing}", flush=True)
        note_reused(parent, [existing])
        return existing
    if not (PROJECT_ROOT / "MLproject").exists():
        raise RuntimeError(f"no finished {entry_point} run with key {key}; run `mlflow run . -e {entry_point}` first")
    if STOPPING.is_set():
        raise RuntimeError(f"not starting {entry_point}: the pipeline is stopping")
    if experiment_name is not None:
        experiment_id = experiment_id_for(experiment_name)
    else:
        experiment_id = active.info.experiment_id if active else None
    run_id = executors.current().launch(entry_point, parameters, experiment_id, parent, key, priority=priority)
    if client.get_run(run_id).data.tags.get(KEY_TAG) != key:
        raise RuntimeError(f"{entry_point} run {run_id} finished with another key than {key}: its inputs changed under it")
    return run_id


def launch_local(
    entry_point: str, parameters: dict[str, str], experiment_id: str | None, parent: str | None, own_session: bool = False
) -> str:
    """Run one entry point here, as `mlflow run` does (its own process, in this environment), and wait for it.
    Returns the run id of a FINISHED run, or raises. ``own_session``: through an `mlflow run` process in a session of
    its own, out of reach of signals for this process's group (a Ray worker's, which Ray signals when the worker dies:
    the step must outlive it to close its run as KILLED, with the reason)."""
    print(f"[saecomp] running {entry_point} {parameters}", flush=True)
    # Nested `mlflow run`s do not inherit the env manager (GUIDE §2), and the shell they start must
    # find this interpreter's `python`.
    here = str(Path(sys.executable).parent)
    if not os.environ.get("PATH", "").startswith(here + os.pathsep):
        os.environ["PATH"] = f"{here}{os.pathsep}{os.environ.get('PATH', '')}"
    from saecomp.executors import launch_thread_count

    threads = launch_thread_count()  # a local pool's share of the cores for this step
    step_environment = {LAUNCHER_ENV: f"{os.getpid()}:{_process_start(os.getpid()) or 'unknown'}:{_pid_space()}"}  # the step watches us
    if threads is not None:
        step_environment.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with _LAUNCH_LOCK:  # `mlflow.projects.run` copies os.environ when it starts the step: only that step sees these
        saved = {name: os.environ.get(name) for name in step_environment}
        os.environ.update(step_environment)
        try:
            submitted = _start_project_run(entry_point, parameters, experiment_id, own_session)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    run_id = submitted.run_id
    with _LIVE_LOCK:
        _LIVE_STEPS.add(submitted)
    client = MlflowClient()
    try:
        command = getattr(submitted, "command_proc", None)  # (bash or the step itself: it lives as long as the step)
        if command is not None:
            mark_launched(run_id, command.pid)  # the step marks it again as it starts (entrypoints.common.load)
        if STOPPING.is_set():  # the pipeline stopped while this step was starting: it is not among those it cancelled
            submitted.cancel()
        if parent is not None:  # nested from its start, so that a failed or killed step is found under its pipeline too
            client.set_tag(run_id, "mlflow.parentRunId", parent)
        succeeded = submitted.wait()
    except BaseException:
        submitted.cancel()
        raise
    finally:
        with _LIVE_LOCK:
            _LIVE_STEPS.discard(submitted)
        # What `mlflow run` does once its command has ended: a run its process left open is closed by the exit status
        # (a step that failed before its run was open, one killed outright). A run the step closed stays as it is.
        from mlflow.entities import RunStatus

        left = client.get_run(run_id)
        if not RunStatus.is_terminated(RunStatus.from_string(left.info.status)):
            client.set_terminated(run_id, "FINISHED" if submitted.get_status() == "FINISHED" else "FAILED")
        if STEP_TAG not in left.data.tags:  # its step never opened it (a bad input, killed while it waited): a name for the UI
            with contextlib.suppress(Exception):  # a name only: never in place of the error on its way
                client.set_tag(run_id, "mlflow.runName", f"{entry_point} · ended before its run opened")
    if not succeeded:
        raise mlflow.exceptions.ExecutionException(f"Run (ID '{run_id}') failed")
    return run_id


def _start_project_run(entry_point: str, parameters: dict[str, str], experiment_id: str | None, own_session: bool = False):
    """Start ``mlflow run -e <entry_point>`` of this project (local environment) and return its SubmittedRun at once.

    Through MLflow's local project backend (its plugin interface, what `mlflow.projects.run` calls), asked to run
    the entry point's command straight from this process: `mlflow.projects.run(synchronous=False)` would first
    start an `mlflow run` command-line process per step, 3.4 s of imports on 2 cores, only to start the same command."""
    if experiment_id is None or own_session:  # (MLflow's own rules for the default experiment)
        return mlflow.projects.run(
            uri=str(PROJECT_ROOT),
            entry_point=entry_point,
            parameters=parameters,
            env_manager="local",
            experiment_id=experiment_id,
            synchronous=False,
        )
    from mlflow.projects.backend import loader
    from mlflow.projects.utils import (
        PROJECT_BUILD_IMAGE,
        PROJECT_DOCKER_ARGS,
        PROJECT_DOCKER_AUTH,
        PROJECT_ENV_MANAGER,
        PROJECT_STORAGE_DIR,
        PROJECT_SYNCHRONOUS,
    )
    from mlflow.utils.mlflow_tags import MLFLOW_PROJECT_BACKEND

    config = {
        PROJECT_ENV_MANAGER: "local",
        PROJECT_SYNCHRONOUS: True,  # the backend starts the command and returns; we wait for it (or cancel it)
        PROJECT_DOCKER_ARGS: None,
        PROJECT_STORAGE_DIR: None,
        PROJECT_BUILD_IMAGE: False,
        PROJECT_DOCKER_AUTH: None,
    }
    submitted = loader.load_backend("local").run(
        str(PROJECT_ROOT), entry_point, parameters, None, config, mlflow.get_tracking_uri(), experiment_id
    )
    MlflowClient().set_tag(submitted.run_id, MLFLOW_PROJECT_BACKEND, "local")
    return submitted


def run_is_open(run_id: str) -> bool:
    """Whether ``run_id`` is still RUNNING (True when the store cannot say: a store hiccup stops nothing)."""
    try:
        return MlflowClient().get_run(run_id).info.status == "RUNNING"
    except Exception:  # noqa: BLE001
        return True


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
THREADS_TAG = "saecomp.torch_threads"  # torch's intra-op threads in the step's process
PROCESS_TAG = "saecomp.process"  # how the step's process started: its own interpreter, or forked by a step server
RAY_NODE_TAG = "saecomp.ray_node"  # the Ray node a step ran on (a Ray task's): several nodes may share one host
RAY_NODE_ENV = "SAECOMP_RAY_NODE"  # set by the Ray task for the step it launches
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
def alive(run_id: str, watch_launcher: bool = False):
    """Tag ``run_id`` with this host and process and keep its heartbeat while the block runs. With
    ``watch_launcher``, a step whose launcher dies closes this run as KILLED and exits (see ``LAUNCHER_ENV``)."""
    MlflowClient().set_tag(run_id, HOST_TAG, socket.gethostname())
    MlflowClient().set_tag(run_id, PID_TAG, str(os.getpid()))
    MlflowClient().set_tag(run_id, PID_NAMESPACE_TAG, _pid_namespace())
    MlflowClient().set_tag(run_id, PID_START_TAG, _process_start(os.getpid()) or "unknown")
    from saecomp.step_server import forked_from

    server = forked_from()
    if os.environ.get(RAY_NODE_ENV):
        MlflowClient().set_tag(run_id, RAY_NODE_TAG, os.environ[RAY_NODE_ENV])
    MlflowClient().set_tag(run_id, PROCESS_TAG, f"forked by the step server (pid {server})" if server else "own interpreter")
    if "torch" in sys.modules:  # CPU results depend on it (the order of float sums), and a local pool shares the cores out
        MlflowClient().set_tag(run_id, THREADS_TAG, str(sys.modules["torch"].get_num_threads()))
    waiting = _WAITING.pop(run_id, None)
    if waiting is not None:  # the step opens its run: its own heartbeat takes over
        waiting.stop()
    heartbeat = Heartbeat(run_id)
    watchdog = _LauncherWatch.of(run_id, _MY_LAUNCHER) if watch_launcher else None
    try:
        yield watchdog
    finally:
        heartbeat.stop()
        if watchdog:
            watchdog.stop()


LAUNCHER_CHAIN_GRACE_S = 10.0
"""How long a step whose launcher died keeps its run KILLED against a late FAILED from the launcher's own chain (a later
one is undone by the next step or pipeline to start: `reap_dead_runs`)."""
LAUNCHER_GONE = "its launcher (process"
"""How the killed reason of a step that closed its own run because its launcher died begins."""


class _LauncherWatch:
    """Checks twice a second that the launching process lives (same pid, same start time)."""

    @classmethod
    def of(cls, run_id: str, launcher: str | None):
        """A watch on ``launcher`` ("pid:start:pid space"), or None unless that process is really an ancestor of this
        one (a value that is malformed, from another host or from an unrelated process arms nothing). A launcher of
        this machine and pid namespace that is gone already (it died while this step was starting, before the step
        could see it heading its chain) gives a watch that is gone at once: the step closes its run as KILLED rather
        than finish a twin of the run a rerun makes."""
        pid, _, rest = (launcher or "").partition(":")
        start, _, space = rest.partition(":")
        if not pid.isdigit():
            return None
        between = _ancestors_below(int(pid))
        known_start = start not in ("", "unknown")
        if between is not None and (not known_start or _process_start(int(pid)) == start):
            return cls(run_id, int(pid), start, between)
        # Dead (a zombie not yet reaped still shows its old start time) or its pid reused: gone.
        if known_start and space and space == _pid_space() and (not _process_alive(int(pid)) or _process_start(int(pid)) != start):
            return cls(run_id, int(pid), start, [])  # nothing between is known: the launcher headed it, and is gone
        return None

    def __init__(self, run_id: str, pid: int, start: str, between: list[tuple[int, str | None]]):
        self.run_id, self.pid, self.start = run_id, pid, start
        # The processes between the launcher and this one: `mlflow run` (when the step was started by one) closes the
        # run as FAILED when this one dies (seen: it overwrote KILLED), so they go first; a step server is no longer
        # needed once its pipeline is gone. Found now, while the launcher still heads the chain, each with its start
        # time so that a reused pid is never killed.
        self.between = between
        self._closing = threading.Lock()  # the watch and the step's own end never both close the run
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="launcher-watch", daemon=True)
        self._thread.start()

    def gone(self) -> bool:
        if not _process_alive(self.pid):
            return True
        now = _process_start(self.pid)
        return self.start not in ("", "unknown") and now is not None and now != self.start

    def close_run_and_exit(self):
        self._closing.acquire()  # never released: this process ends here
        reason = f"{LAUNCHER_GONE} {self.pid} on {socket.gethostname()}) is gone"
        print(f"[saecomp] run {self.run_id}: {reason}; closing it as KILLED", file=_terminal(), flush=True)
        for pid, start in self.between:
            if start is not None and _process_start(pid) == start:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        try:
            for attempt in range(10):  # a busy store (SQLite's lock, a server's hiccup) must not leave the run open
                try:
                    client = MlflowClient()
                    client.set_tag(self.run_id, KILLED_REASON_TAG, reason)
                    client.set_terminated(self.run_id, "KILLED")
                    break
                except Exception as error:  # noqa: BLE001 - reported, then tried again
                    print(f"[saecomp] run {self.run_id}: could not close it as KILLED ({error!r}); try {attempt + 1} of 10",
                          file=_terminal(), flush=True)  # fmt: skip
                    time.sleep(1)
            else:
                return
            # What is left of the dead launcher's chain can still close the run after us: a step forked by a lost Ray
            # worker's step server has the worker's `mlflow run` (a session of its own) above its server, not above it,
            # and that one writes FAILED once its own child is gone. Seen in CI: FAILED over our KILLED. For a while,
            # the run stays KILLED, with its reason.
            deadline = time.monotonic() + LAUNCHER_CHAIN_GRACE_S
            while time.monotonic() < deadline:
                time.sleep(0.25)
                with contextlib.suppress(Exception):
                    if client.get_run(self.run_id).info.status != "KILLED":
                        client.set_terminated(self.run_id, "KILLED")
                        print(f"[saecomp] run {self.run_id}: closed as KILLED again (its launcher's chain wrote over it)",
                              file=_terminal(), flush=True)  # fmt: skip
        finally:
            os._exit(137)  # nothing this process writes from now on is part of a finished run

    def _watch(self):
        while not self._stop.wait(0.5):
            if self.gone():
                self.close_run_and_exit()

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)

    def finish_or_exit(self) -> None:
        """At the step's clean end: stop watching, then close the run as KILLED (and exit) if the launcher died
        meanwhile, since a retry may be computing the same; otherwise the caller marks it FINISHED."""
        self.stop()
        with self._closing:
            if not self.gone():
                return
        self.close_run_and_exit()


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _ancestors_below(launcher: int, levels: int = 5) -> list[tuple[int, str | None]] | None:
    """The processes between this one and ``launcher`` (its parent, grandparent, ...), with their start times; None
    if ``launcher`` is not an ancestor within ``levels``."""
    chain, pid = [], _parent(os.getpid())
    while pid not in (None, 0, 1) and len(chain) < levels:
        if pid == launcher:
            return chain
        chain.append((pid, _process_start(pid)))
        pid = _parent(pid)
    return None


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "unknown"


def _pid_space() -> str:
    """Where a pid names one process: this boot of this machine and this pid namespace ("" when unknown, which never
    matches)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
    namespace = _pid_namespace()
    return f"{boot}/{namespace}" if boot and namespace != "unknown" else ""


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (field 22 of /proc/<pid>/stat), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _process_exists(pid: int) -> bool:
    """Whether ``pid`` names a process, a zombie included."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:  # a zombie (killed, not yet waited for by its parent) is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


SCRATCH_KINDS = ("shared-activations", "shared-forward")


def scratch_folder(kind: str) -> Path:
    """A temporary folder of this process (a pipeline's shared model sides or forward passes: up to GBs), named after
    the process (pid namespace, pid, start time) so that the next pipeline on this machine deletes it if this one is
    killed before it could (`remove_orphaned_scratch`)."""
    import tempfile

    assert kind in SCRATCH_KINDS, kind
    owner = f"{_pid_namespace()}.{os.getpid()}.{_process_start(os.getpid()) or 'unknown'}"
    return Path(tempfile.mkdtemp(prefix=f"saecomp-{kind}.{owner}."))


def remove_orphaned_scratch() -> list[Path]:
    """Delete the scratch folders (`scratch_folder`) whose process is gone: a pipeline killed (SIGKILL, a lost machine)
    before its own clean-up. A folder of a live process, of another pid namespace or of an unknown start is kept."""
    import re
    import tempfile

    pattern = re.compile(rf"^saecomp-({'|'.join(SCRATCH_KINDS)})\.(\d+)\.(\d+)\.(\d+)\.[^.]+$")
    removed = []
    for path in Path(tempfile.gettempdir()).glob("saecomp-*"):
        found = pattern.match(path.name)
        if not found or found.group(2) != _pid_namespace() or not path.is_dir():
            continue
        pid, start = int(found.group(3)), found.group(4)
        if _process_alive(pid) and _process_start(pid) == start:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def why_dead(run, now: float | None = None, host: str | None = None) -> str | None:
    """Why a RUNNING step run has no live process behind it, or None if it may be alive. Its own host can check the
    process; any host can see a heartbeat older than `STALE_AFTER_SECONDS` (also a run that never beat, by its
    start time)."""
    now, host = now or time.time(), host or socket.gethostname()
    tags = run.data.tags
    opened = STEP_TAG in tags
    if opened:
        here = tags.get(HOST_TAG) == host and tags.get(PID_NAMESPACE_TAG, _pid_namespace()) == _pid_namespace()
    else:  # a run made for a step whose process has not opened it yet: who was started for it (``mark_launched``)
        launched = _launched(tags)
        # this boot of this machine, not its name (two machines may share one, and the initial pid namespace with it)
        here = bool(launched.get(PID_SPACE_KEY)) and launched.get(PID_SPACE_KEY) == _pid_space()
        tags = {**tags, **launched}  # its heartbeat (while it waits, ``mark_launched``) from the run, who from the record
    if here and tags.get(PID_TAG, "").isdigit():
        pid = int(tags[PID_TAG])
        # An unopened run's process that has exited but is not yet waited for (a zombie: a bad input's exit) is its live
        # launcher's to close, FAILED: not a kill.
        if not (_process_alive(pid) or (not opened and _process_exists(pid))):
            return f"process {pid} on {host} is gone"
        recorded, now_start = tags.get(PID_START_TAG), _process_start(pid)
        if recorded not in (None, "unknown") and now_start is not None and recorded != now_start:
            return f"process {pid} on {host} is gone (its pid belongs to a newer process)"
        return None  # its process is alive here, whatever its heartbeat says
    if not opened and HEARTBEAT_TAG not in tags:  # another machine's, not yet beating: it may be starting; cannot tell
        return None
    last_seen = float(tags.get(HEARTBEAT_TAG) or run.info.start_time / 1000)
    if now - last_seen > STALE_AFTER_SECONDS:
        return f"no heartbeat from {tags.get(HOST_TAG, 'an unknown host')} for {now - last_seen:.0f} s"
    return None


LAUNCHED_TAG = "saecomp.launched"
"""On a run MLflow made for a step (`mlflow run`, `launch_local`): the host, pid namespace, pid space (this boot of this
machine and that namespace), pid and start of the process started for it, as JSON. A step opens its run
(``step_run``: its step tag, heartbeat and own pid) only once its upstream steps are done, which may take hours; killed
before that (a SIGTERM to the process group, as `timeout` and Slurm send, or SIGKILL), its run would be left RUNNING
with nothing saying whose it was. ``reap_dead_runs`` marks it KILLED when that process is gone (its own machine checks
the process; another, the heartbeat the step keeps while it waits)."""
MLFLOW_ENTRY_POINT_TAG = "mlflow.project.entryPoint"
_MARKED: set[tuple[str, int]] = set()


PID_SPACE_KEY = "saecomp.pid_space"
_WAITING: dict[str, Heartbeat] = {}


def mark_launched(run_id: str, pid: int | None = None, beat: bool = False) -> None:
    """Tag ``run_id`` with the process started for it (``pid``, default this one), once per run and process; with
    ``beat``, keep its heartbeat until the step opens the run (``alive`` stops it), so that another machine can tell a
    step that waits on its upstream steps from one that died waiting (a Slurm job requeued on another node). Never
    raises: this is bookkeeping, and the step tags its run itself once it opens it."""
    pid = pid or os.getpid()
    if (run_id, pid) in _MARKED:
        return
    who = {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), PID_NAMESPACE_TAG: _pid_namespace(),
           PID_SPACE_KEY: _pid_space(), PID_START_TAG: _process_start(pid) or "unknown"}  # fmt: skip
    try:
        MlflowClient().set_tag(run_id, LAUNCHED_TAG, json.dumps(who))
        if beat and run_id not in _WAITING:
            _WAITING[run_id] = Heartbeat(run_id)
    except Exception as error:  # noqa: BLE001 - a store hiccup must not stop a healthy step
        print(f"[saecomp] could not tag run {run_id} with its process ({type(error).__name__}); going on", file=sys.stderr, flush=True)
        return
    _MARKED.add((run_id, pid))


def _launched(tags: dict[str, str]) -> dict[str, str]:
    """``mark_launched``'s record as run tags (host, pid, namespace, start), or {} where there is none."""
    try:
        who = json.loads(tags.get(LAUNCHED_TAG) or "{}")
    except ValueError:
        return {}
    return {k: str(v) for k, v in who.items()} if isinstance(who, dict) else {}


def reap_dead_runs(experiment_ids: list[str] | None = None) -> list[str]:
    """Mark the step runs left RUNNING by dead processes KILLED, with the reason as a tag; live runs, this process's
    own (``MLFLOW_RUN_ID``) and other users' live ones, are left alone; and mark KILLED again the runs a step closed as
    KILLED when its launcher died, which its launcher's chain later marked FAILED. Returns the ids marked."""
    client = MlflowClient()
    ids = experiment_ids or [e.experiment_id for e in client.search_experiments()]
    mine = {os.environ.get("MLFLOW_RUN_ID"), *(r.info.run_id for r in [mlflow.active_run()] if r)}
    reaped = []
    for run in client.search_runs(ids, filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if run.info.run_id in mine or (STEP_TAG not in tags and LAUNCHED_TAG not in tags):
            continue
        reason = why_dead(run)
        if reason is None:
            continue
        step = tags.get(STEP_TAG)
        if step is None:  # killed while it waited on its upstream steps (or still importing): name it for the UI
            step = tags.get(MLFLOW_ENTRY_POINT_TAG, "a step")
            reason = f"{reason} before the step opened its run"
            client.set_tag(run.info.run_id, "mlflow.runName", f"{step} · killed before its run opened")
        client.set_tag(run.info.run_id, KILLED_REASON_TAG, f"{reason} (found by pid {os.getpid()} on {socket.gethostname()})")
        client.set_terminated(run.info.run_id, "KILLED")
        print(f"[saecomp] marked run {run.info.run_id} ({step}) KILLED: {reason}", file=sys.stderr, flush=True)
        reaped.append(run.info.run_id)
    # A step whose launcher died closed its run as KILLED and exited (137); FAILED on such a run was written after that
    # by what was left of the launcher's chain, later than the step's grace (`LAUNCHER_CHAIN_GRACE_S`): the run was
    # killed, as its reason says. (A run KILLED by the loop above keeps a FAILED its process may write after all: that
    # process was alive and its own end is the truth.)
    overwritten = f"attributes.status = 'FAILED' and tags.`{KILLED_REASON_TAG}` LIKE '{LAUNCHER_GONE}%'"
    for run in client.search_runs(ids, filter_string=overwritten, max_results=1000):
        if STEP_TAG not in run.data.tags:
            continue
        client.set_terminated(run.info.run_id, "KILLED", end_time=run.info.end_time)
        print(f"[saecomp] run {run.info.run_id} ({run.data.tags.get(STEP_TAG)}) KILLED again: FAILED was written over it after "
              f"{run.data.tags[KILLED_REASON_TAG]}", file=sys.stderr, flush=True)  # fmt: skip
        reaped.append(run.info.run_id)
    return reaped


class _Terminated(SystemExit):
    """What a step's SIGTERM handler raises."""


_SIGTERMS_HANDLED = 0
"""SIGTERMs this process has handled: a step whose count moved never ends FINISHED, even if its exception was lost."""


SIGTERM_RESEND_SECONDS = 10.0
"""A step still in its body this long after a SIGTERM was handled is sent it again (``_insist``), and again."""


class _OpenStep:
    """The step whose body runs now (``step_run``; None while it closes), and whether it is being sent SIGTERM again."""

    def __init__(self) -> None:
        self.insisting = False


_OPEN_STEP: _OpenStep | None = None


def _raise_on_sigterm(signum, frame):
    # Turn `kill` into an exception so that the run is closed as FAILED, never left FINISHED.
    global _SIGTERMS_HANDLED
    _SIGTERMS_HANDLED += 1
    _insist(_OPEN_STEP)
    raise _Terminated(128 + signum)


def _insist(step: _OpenStep | None) -> None:
    """Send SIGTERM again every SIGTERM_RESEND_SECONDS while ``step`` stays in its body: code that catches
    BaseException (or a bare `except:`) swallows the exit the first one raised and would otherwise run on to the step's
    end. A step that obeyed is closing by then (its handler is no longer ``_raise_on_sigterm``): nothing is sent."""
    if step is None or step.insisting:
        return
    step.insisting = True

    main = threading.main_thread().ident

    def again() -> None:
        while True:
            time.sleep(SIGTERM_RESEND_SECONDS)
            if _OPEN_STEP is not step or signal.getsignal(signal.SIGTERM) is not _raise_on_sigterm:
                return
            print(f"[saecomp] the step is still running {SIGTERM_RESEND_SECONDS:g} s after a SIGTERM (its exit was swallowed): sent again",
                  file=_terminal(), flush=True)  # fmt: skip
            # a real signal to the main thread, not `_thread.interrupt_main`: that only flags the handler, which then waits
            # for the main thread's blocking call (a lock, a join, a sleep) to return by itself; a signal interrupts it
            signal.pthread_kill(main, signal.SIGTERM)

    threading.Thread(target=again, name="saecomp-sigterm-insist", daemon=True).start()


def _count_sigterm(signum, frame):
    # While a step closes its run: counted (the run then never ends FINISHED), never raised into the closing, where it
    # could leave the run RUNNING (MLflow drops the run from its stack before it writes the status) or the handlers set.
    global _SIGTERMS_HANDLED
    _SIGTERMS_HANDLED += 1


def _redeliver_dropped_sigterm(previous_hook):
    """A `sys.unraisablehook` for a step: Python drops an exception raised inside a `__del__` or a weakref callback
    (seen: a SIGTERM landing in a WeakKeyDictionary's callback mid-pruning; the step went on and finished), so the
    signal is sent again from a thread, to land once the callback has returned; other exceptions go to
    ``previous_hook``."""

    def hook(unraisable):
        if not isinstance(unraisable.exc_value, _Terminated):
            previous_hook(unraisable)
            return

        def again():
            time.sleep(0.05)  # the callback has returned by then (else this hook runs again)
            if signal.getsignal(signal.SIGTERM) is _raise_on_sigterm:  # the step is still open, not closing
                import _thread

                _thread.interrupt_main(signal.SIGTERM)  # lands in whatever handler is set then: counted while closing

        threading.Thread(target=again, name="saecomp-sigterm-again", daemon=True).start()
        try:
            where = repr(unraisable.object)[:200]
        except Exception:  # any object's repr may fail; the signal is on its way again anyway
            where = "a finaliser"
        print(f"[saecomp] SIGTERM landed in {where}, where Python drops exceptions: sent again", file=_terminal(), flush=True)

    return hook


END_RUN_TRIES = 10
"""How often, in all, a step writes its run's final status while the store refuses it, a second apart."""


def _end_run(status: str) -> None:
    """``mlflow.end_run(status)``, the status written again while the store refuses it (SQLite's lock under load, a
    server's hiccup). MLflow takes the run off its stack before it writes the status: one refusal left the run of a
    step that had stopped RUNNING, with nothing in this process left to close it."""
    active = mlflow.active_run()
    try:
        mlflow.end_run(status)
    except Exception as error:  # noqa: BLE001 - written again, then raised
        if active is None:
            raise
        _write_status(active.info.run_id, status, refused=error, tries=END_RUN_TRIES - 1)


def _write_status(run_id: str, status: str, refused: Exception | None = None, tries: int = END_RUN_TRIES) -> None:
    """Close ``run_id`` with ``status``, trying ``tries`` times a second apart while the store refuses (``refused``:
    a refusal already met), then raising the last refusal."""
    for _ in range(tries):
        if refused is not None:
            print(f"[saecomp] run {run_id}: could not close it as {status} ({refused!r}); trying again",
                  file=_terminal(), flush=True)  # fmt: skip
            time.sleep(1)
        try:
            MlflowClient().set_terminated(run_id, status)
            return
        except Exception as error:  # noqa: BLE001 - tried again
            refused = error
    raise refused


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
    global _TOLD_ABOUT_DEFAULT, _OPEN_STEP
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    previous_unraisable_hook = sys.unraisablehook
    sys.unraisablehook = _redeliver_dropped_sigterm(previous_unraisable_hook)
    sigterms_before = _SIGTERMS_HANDLED
    outer_step, _OPEN_STEP = _OPEN_STEP, _OpenStep()

    def closing() -> None:  # first thing on every way out: a SIGTERM from here on is counted, never raised
        global _OPEN_STEP
        signal.signal(signal.SIGTERM, _count_sigterm)
        _OPEN_STEP = None

    def restore() -> None:
        global _OPEN_STEP
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_unraisable_hook
        _OPEN_STEP = outer_step

    try:
        reap_dead_runs()
        experiment_id = None if os.environ.get("MLFLOW_RUN_ID") or experiment_name is None else experiment_id_for(experiment_name)
        # Counted, not raised, while MLflow creates the run: raised between its creation and its return, a SIGTERM
        # left a run RUNNING that this process never knew, with nothing to say whose it was.
        signal.signal(signal.SIGTERM, _count_sigterm)
        run = mlflow.start_run(experiment_id=experiment_id)
    except BaseException:
        restore()
        raise
    keep_alive = alive(run.info.run_id, watch_launcher=True)  # (nothing runs until it is entered)
    try:
        # signal.signal runs a pending handler before it switches: a SIGTERM counted until here is in the count below
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
        if _SIGTERMS_HANDLED != sigterms_before:  # told to stop while the run was being created
            raise _Terminated(128 + signal.SIGTERM)
        watchdog = keep_alive.__enter__()
    except BaseException:
        closing()
        try:
            _end_run("FAILED")  # never left to MLflow's exit hook, which would mark it FINISHED
        finally:
            restore()
        raise
    try:
        labels = {STEP_TAG: step, KEY_TAG: key, "saecomp.code": source_digest(), **library_versions(), **(tags or {})}
        if "device" in params:
            labels[ACCELERATOR_TAG] = accelerator_name(str(params["device"]))
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
        closing()
        _end_run("KILLED")
        raise
    except BaseException:
        closing()
        _end_run("FAILED")
        raise
    else:
        closing()
        if _SIGTERMS_HANDLED != sigterms_before:  # told to stop, and its exception was dropped before it was sent again
            _end_run("FAILED")
            raise _Terminated(128 + signal.SIGTERM)
        if watchdog is not None:
            watchdog.finish_or_exit()  # its launcher died meanwhile (a retry may compute the same): never FINISHED
        _end_run("FINISHED")
        if _SIGTERMS_HANDLED != sigterms_before:  # told to stop while it closed: FAILED after all
            _write_status(run.info.run_id, "FAILED")
            raise _Terminated(128 + signal.SIGTERM)
    finally:
        closing()
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run.info.run_id:  # a SIGTERM raised as `else:` began: never FINISHED
            with contextlib.suppress(Exception):  # (left open, MLflow's exit hook would mark it FINISHED)
                _end_run("FAILED")
        keep_alive.__exit__(None, None, None)
        restore()


def training_metrics_logger(synchronous: bool = True):
    """What a training loop hands its per-step metrics to: MLflow's ``log_metrics`` on the active run. Synchronous:
    MLflow's asynchronous logging was slower on 2 CPU cores (its thread competes with torch's, and the run's end waits
    about a second for its queue; `benchmarks/train_sae.py --asynchronous-too`)."""

    def log(step: int, metrics: dict) -> None:
        mlflow.log_metrics(metrics, step=step, synchronous=synchronous)

    return log


def register_sae(artifact_path: str, registered_name: str, tags: dict[str, str]) -> str:
    """Register the SAELens folder the active run logged at ``artifact_path`` in the MLflow Model Registry, as a version
    whose source *is* that folder: each SAE is stored once (a LoggedModel would copy it: tens of GB for GPT-2's 36
    layer x hook cells), and ``models:/<name>/<version>`` downloads the run's files. Returns ``name/version``."""
    run = mlflow.active_run()
    client = MlflowClient()
    try:
        client.create_registered_model(registered_name)
    except mlflow.exceptions.MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(registered_name, source=mlflow.get_artifact_uri(artifact_path), run_id=run.info.run_id, tags=tags)
    return f"{registered_name}/{version.version}"


def prepare_store(concurrent: bool) -> None:
    """Before steps write to the store at once: bring a SQLite store's schema up to date in this one process (several
    processes migrating a new or old SQLite file at once crash; GUIDE §2). Servers migrate themselves."""
    uri = mlflow.get_tracking_uri()
    if not (concurrent and uri.startswith("sqlite:")):
        return
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config, _upgrade_db, create_sqlalchemy_engine_with_retry

    engine = create_sqlalchemy_engine_with_retry(uri)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
        if current is None:
            MlflowClient().search_experiments()  # a new file: the store creates the whole schema, here, once
        elif current != ScriptDirectory.from_config(_get_alembic_config(str(engine.url))).get_current_head():
            _upgrade_db(engine)  # an older MLflow's file: what `mlflow db upgrade` runs
    finally:
        engine.dispose()


COMPARED_STEPS = ("prune_llm", "prune_sae", "evaluate")
PIPELINE_RUNS_ARTIFACT = "runs.json"  # a pipeline run's own list of the runs it used, by step


def collect_runs(experiment_ids: list[str], pipeline_run: str | None = None, tags: dict[str, str] | None = None):
    """The finished runs compare reads (``compare.RunRecord``), from the store only: the prune_llm, prune_sae and
    evaluate runs of the experiments, or exactly those one pipeline run used (its ``runs.json``, wherever they are:
    a reused run may sit in another experiment), narrowed to runs carrying every tag in ``tags``."""
    from saecomp.compare import RunRecord

    client = MlflowClient()
    if pipeline_run is not None:
        used = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=pipeline_run, artifact_path=PIPELINE_RUNS_ARTIFACT)).read_text())
        runs = [client.get_run(run_id) for run_id in sorted({r for ids in used.values() for r in ids})]
    else:
        runs = client.search_runs(experiment_ids, "attributes.status = 'FINISHED'", max_results=50000)
    records = []
    for run in runs:
        if run.info.status != "FINISHED" or run.data.tags.get(STEP_TAG) not in COMPARED_STEPS:
            continue
        if any(run.data.tags.get(name) != value for name, value in (tags or {}).items()):
            continue
        records.append(
            RunRecord(
                run.info.run_id,
                run.data.tags[STEP_TAG],
                run.data.tags.get("mlflow.runName", run.info.run_name or ""),
                run.info.start_time,
                run.info.experiment_id,
                dict(run.data.params),
                dict(run.data.metrics),
                dict(run.data.tags),
                bootstrap_replicates(client, run),
            )
        )
    return records


def bootstrap_replicates(client: MlflowClient, run) -> dict[str, dict]:
    """suite -> the run's ``uncertainty/<suite>.json`` (evaluate logs it beside ``<suite>.<metric>.<kind>_se``): the
    replicates that let compare pair two variants' bootstraps. Only the suites with replicates: core's bootstrap, SCR's,
    TPP's and sparse probing's bootstrap of texts (older SCR and TPP runs: their parametric one, logged as
    ``binomial_se``), absorption's split count (sparse probing's untraced errors, RAVEL's dyadic-robust ``cluster_se``
    and its binomial fallback have none);
    empty for runs that logged none."""
    suites = {
        name.split(".", 1)[0]
        for name in run.data.metrics
        if name.endswith((".bootstrap_se", ".jackknife_se")) or (name.endswith(".binomial_se") and name.split(".", 1)[0] in ("scr", "tpp"))
    }
    if not suites:
        return {}
    out = {}
    for artifact in client.list_artifacts(run.info.run_id, "uncertainty"):
        if artifact.path.endswith(".json") and Path(artifact.path).stem in suites:
            local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=artifact.path)
            out[Path(artifact.path).stem] = json.loads(Path(local).read_text())
    return out
