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
import sys
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
CACHE_DIR = Path(os.environ.get("SAECOMP_CACHE", PROJECT_ROOT / ".saecomp" / "cache"))
STEP_TAG, KEY_TAG = "saecomp.step", "saecomp.key"


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


def run_step(entry_point: str, parameters: dict[str, str], key: str) -> str:
    """Reuse the finished run of ``entry_point`` with ``key``, or run the entry point now (as its own
    MLflow run, in this environment) and return its id."""
    existing = find_finished_run(entry_point, key)
    if existing:
        print(f"[saecomp] reusing finished {entry_point} run {existing}", flush=True)
        return existing
    if not (PROJECT_ROOT / "MLproject").exists():
        raise RuntimeError(f"no finished {entry_point} run with key {key}; run `mlflow run . -e {entry_point}` first")
    print(f"[saecomp] running {entry_point} {parameters}", flush=True)
    # Nested `mlflow run`s do not inherit the env manager (GUIDE §2), and the shell they start must
    # find this interpreter's `python`.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    active = mlflow.active_run()
    submitted = mlflow.projects.run(
        uri=str(PROJECT_ROOT),
        entry_point=entry_point,
        parameters=parameters,
        env_manager="local",
        experiment_id=active.info.experiment_id if active else None,
        synchronous=True,
    )
    run_id = submitted.run_id
    if MlflowClient().get_run(run_id).data.tags.get(KEY_TAG) != key:
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


def _raise_on_sigterm(signum, frame):
    # Turn `kill` into an exception so that the run is closed as FAILED, never left FINISHED.
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def step_run(step: str, key: str, params: dict[str, object]):
    """Open (or resume, under `mlflow run`) the step's run, tag it and log ``params``.

    An exception, Ctrl-C or SIGTERM inside closes the run as FAILED/KILLED; only a clean exit marks
    it FINISHED. Params that `mlflow run` already logged from ``-P`` are not logged again (MLflow
    refuses a second value, and the first is what the user typed).
    """
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    run = mlflow.start_run()
    try:
        mlflow.set_tags({STEP_TAG: step, KEY_TAG: key, "saecomp.code": source_digest()})
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
