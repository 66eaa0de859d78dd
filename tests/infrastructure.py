"""Real services on loopback for the scale tests: PostgreSQL (Debian's), an S3-compatible server (moto's server mode)
and an MLflow tracking server over both, each its own process, all stopped and deleted afterwards; and freezing a step
process without blocking the test's own reads of its SQLite store."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PG_BIN = Path(os.environ.get("SAECOMP_PG_BIN", "/usr/lib/postgresql/15/bin"))
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "saecomp-test", "AWS_SECRET_ACCESS_KEY": "saecomp-test", "AWS_DEFAULT_REGION": "us-east-1"}


def without_session_step_server(**changes: str) -> dict[str, str]:
    """This process's environment (with ``changes``) less the session's step server (tests/conftest.py), for a
    subprocess whose steps must be its own processes: one the test freezes or kills by pid, or a pipeline that starts
    its own server (on Ray, each worker's)."""
    from saecomp.step_server import SERVER_ENV

    return {k: v for k, v in {**os.environ, **changes}.items() if k != SERVER_ENV}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} exited with {process.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(f"nothing served {url} within {seconds} s")


def _as_postgres(command: list[str]) -> list[str]:
    # initdb refuses root (GUIDE §2): run the server's tools as the postgres user then.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextlib.contextmanager
def postgres(database: str = "mlflow"):
    """A PostgreSQL cluster in a fresh directory on a free loopback port; yields its SQLAlchemy URI (psycopg2: SQLAlchemy 2.1
    takes a bare postgresql:// for psycopg 3)."""
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="saecomp-postgres-"))  # directly in /tmp: the postgres user must reach it
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres")
    port = free_port()
    data, log = directory / "data", directory / "log"
    subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "mlflow"]), check=True, capture_output=True)
    options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start"]), check=True)
    try:
        subprocess.run(_as_postgres([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", database]), check=True)
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/{database}"
    finally:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def s3_server(bucket: str):
    """moto's S3 server on a free loopback port with ``bucket`` created; yields its endpoint URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **S3_CREDENTIALS},
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{endpoint}/moto-api/", process)
        import boto3

        boto3.client("s3", endpoint_url=endpoint, **_boto_credentials()).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=30)


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_CREDENTIALS["AWS_DEFAULT_REGION"],
    }


def s3_objects(endpoint: str, bucket: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


@contextlib.contextmanager
def mlflow_server(backend_uri: str, s3_endpoint: str, bucket: str, log: Path):
    """`mlflow server` over ``backend_uri`` that stores (and proxies) artifacts in ``s3://bucket``; yields its URL."""
    port = free_port()
    env = {**os.environ, **S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                backend_uri,
                "--artifacts-destination",
                f"s3://{bucket}",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "2",
            ],  # fmt: skip
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    with _serving(process, port) as url:
        yield url


@contextlib.contextmanager
def _serving(process: subprocess.Popen, port: int):
    """A server process (its own session) on ``port``: its URL once /health answers; its process group stopped after."""
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", process, seconds=180)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def mlflow_auth_server(folder: Path, admin_password: str):
    """`mlflow server --app-name basic-auth` (MLflow's authentication) over a SQLite store in ``folder``, proxying
    artifacts it keeps there, as the README sets it up: a secret key for its CSRF protection, the first admin's password
    from MLFLOW_AUTH_ADMIN_PASSWORD, credential checks cached for a minute (each is a PBKDF2 hash). Yields its URL;
    the admin is ``admin``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "basic_auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'basic_auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\nauth_cache_ttl_seconds = 60\n"
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_AUTH_ADMIN_PASSWORD=admin_password)
    env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = "saecomp-test"
    with open(folder / "server.log", "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    with _serving(process, port) as url:
        yield url


def store_readable(seconds: float = 0.25, tracking_uri: str | None = None) -> bool:
    """Whether the test store can be read now. SQLite (in MLflow's default rollback-journal mode) makes readers wait
    while a writer commits, so a step frozen with SIGSTOP mid-commit would block every read of the store until
    MLflow's 20 s busy timeout fails it ("database is locked", met once in CI). A tracking server's client holds no
    lock of its store: the server commits for it."""
    import sqlite3

    uri = tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    if uri.startswith("http"):
        return True
    assert uri.startswith("sqlite:///"), uri
    connection = sqlite3.connect(uri.removeprefix("sqlite:///"), timeout=seconds)
    try:
        connection.execute("SELECT count(*) FROM runs").fetchone()
        return True
    except sqlite3.OperationalError as error:
        if "locked" not in str(error):
            raise
        return False
    finally:
        connection.close()


def freeze(pid: int, tracking_uri: str | None = None) -> None:
    """SIGSTOP ``pid`` at a moment it holds no lock that blocks readers of the store (else let it run a moment more)."""
    for _ in range(200):
        os.kill(pid, signal.SIGSTOP)
        if store_readable(tracking_uri=tracking_uri):
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError(f"process {pid} held the store's write lock through 200 tries")
