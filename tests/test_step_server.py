"""The warm step server (saecomp/step_server.py): a step handed to it runs as its own `python -m` would (argv, working
folder, environment, streams, exit status, signals), and whatever it cannot run exactly starts the usual way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from saecomp.step_server import SERVER_ENV, serving

ROOT = Path(__file__).resolve().parents[1]

# A stand-in step: hands itself over like entrypoints/__init__.py, then reports what it sees.
STEP = '''
from saecomp.step_server import forked_from, hand_over

hand_over()
import os, signal, sys, time

comm = open("/proc/self/comm").read().strip()
print(f"forked_from={forked_from()} argv={sys.argv[1:]} cwd={os.getcwd()} probe={os.environ.get('STEP_PROBE')} comm={comm}", flush=True)
mode = sys.argv[1]
if mode == "exit":
    sys.exit(int(sys.argv[2]))
if mode == "fail":
    raise RuntimeError("the step failed")
if mode == "random":  # unseeded draws: those of a fresh interpreter, whatever the server did before forking
    import torch

    print(f"torch={torch.initial_seed()},{torch.rand(3).tolist()} threads={torch.get_num_threads()}", flush=True)
    sys.exit(0)
if mode == "cuda":  # the step's first CUDA work, in a process forked from a server that imported every library
    import torch

    print(f"nvml_switch={os.environ.get('PYTORCH_NVML_BASED_CUDA_CHECK')}", flush=True)
    print(f"cuda_sum={torch.ones(4, device='cuda').sum().item()}", flush=True)
    sys.exit(0)
open(sys.argv[2], "w").write(str(os.getpid()))  # the pid of the process that computes the step
try:
    time.sleep(120)
except KeyboardInterrupt:
    print("interrupted once", flush=True)
    sys.exit(3)
'''


KMP = "KMP_DUPLICATE_LIB_OK"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A step server whose interpreter finds the stand-in step (PYTHONPATH is read at start, so both need it)."""
    folder = tmp_path_factory.mktemp("steps")
    (folder / "standin_step.py").write_text(textwrap.dedent(STEP))
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(folder), str(ROOT), *([saved] if saved else [])])
    session_server = os.environ.pop(SERVER_ENV, None)  # the test session's (tests/conftest.py): this module starts its own
    # set by scikit-learn when imported (as this process may have done already): here only the server's imports set it
    kmp = os.environ.pop(KMP, None)
    try:
        with serving() as process:
            path = Path(os.environ[SERVER_ENV])
            deadline = time.time() + 120
            while not path.exists() and time.time() < deadline and process.poll() is None:
                time.sleep(0.1)
            assert path.exists(), "the step server never started listening"
            yield process, dict(os.environ)
    finally:
        os.environ.pop("PYTHONPATH") if saved is None else os.environ.update(PYTHONPATH=saved)
        if session_server is not None:
            os.environ[SERVER_ENV] = session_server
        if kmp is not None:
            os.environ[KMP] = kmp


def step(environment: dict, *args: str, cwd: Path | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "standin_step", *args], cwd=cwd or ROOT, env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )  # fmt: skip


def wait_for_pid(path: Path, seconds: float = 60) -> int:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError("the step never started")


def gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):  # a zombie nobody reaped yet
                return True
        except (FileNotFoundError, IndexError):
            return True
        time.sleep(0.05)
    return False


def test_a_step_runs_forked_with_its_own_argv_folder_environment_streams_and_status(server, tmp_path):
    process, environment = server
    done = step({**environment, "STEP_PROBE": "mine"}, "exit", "7", cwd=tmp_path)
    out, err = done.communicate(timeout=120)
    assert done.returncode == 7, err
    # through the stdout it was handed; named after its module in `ps -o comm`
    assert f"forked_from={process.pid} argv=['exit', '7'] cwd={tmp_path} probe=mine comm=standin_step" in out

    failed = step(environment, "fail")
    out, err = failed.communicate(timeout=120)
    assert failed.returncode == 1 and "RuntimeError: the step failed" in err  # the traceback on the step's stderr


def test_what_the_server_cannot_run_exactly_starts_the_usual_way(server, tmp_path):
    _, environment = server
    done = step({**environment, "HF_HOME": str(tmp_path)}, "exit", "0")  # read by huggingface_hub at import
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert "forked_from=None" in out and "environment variable HF_HOME differs" in err
    done = step({**environment, SERVER_ENV: "0"}, "exit", "0")
    assert "forked_from=None" in done.communicate(timeout=300)[0]


def test_a_variable_the_servers_own_imports_set_alike_does_not_keep_a_step_cold(server):
    """A step started by a process that imported scikit-learn (a test process, a notebook) inherits what that import
    sets; the server's imports set the same value in the forked step, so it can run forked. Another value cannot."""
    process, environment = server
    assert KMP not in environment
    done = step({**environment, KMP: "True"}, "exit", "0")  # scikit-learn's os.environ.setdefault(KMP, "True")
    out, err = done.communicate(timeout=120)
    assert done.returncode == 0 and f"forked_from={process.pid}" in out, err
    done = step({**environment, KMP: "FALSE"}, "exit", "0")
    out, err = done.communicate(timeout=300)
    assert "forked_from=None" in out and f"environment variable {KMP} differs" in err


def test_forked_steps_draw_their_own_unseeded_numbers(server):
    """As fresh interpreters do (torch seeds its generator from the OS at start): never a copy of the server's state,
    so two steps that forget to seed do not silently draw the same numbers. And the step's own thread count."""
    process, environment = server
    draws = [step({**environment, "OMP_NUM_THREADS": "1"}, "random").communicate(timeout=300)[0] for _ in range(2)]
    assert all(f"forked_from={process.pid}" in out and "threads=1" in out for out in draws)
    assert draws[0].splitlines()[1] != draws[1].splitlines()[1]


def test_a_forked_step_can_use_cuda(server):
    """CUDA does not survive a fork: had the server's imports initialised it (SAEBench's absorption asks whether CUDA
    is available when imported), every step forked on a GPU machine would fail its first CUDA call. The server asks
    through NVML, and its steps do not inherit that switch. Without a GPU, only the second half is checked."""
    process, environment = server
    out, err = step(environment, "cuda").communicate(timeout=300)
    assert f"forked_from={process.pid}" in out, err
    assert "nvml_switch=None" in out, out
    import torch

    if torch.cuda.is_available():
        assert "cuda_sum=4.0" in out, err
    else:
        assert "cuda_sum" not in out and ("CUDA" in err or "cuda" in err), err


def test_a_cuda_runtime_device_count_during_the_imports_is_seen_and_the_watch_leaves_no_trace():
    """The server's other guard (for a machine where torch cannot ask NVML): every call of the CUDA runtime's device
    count while it imports is recorded, and the runtime's own function is back afterwards. Checked on a stand-in for
    torch, since a CPU build has no such function."""
    from types import SimpleNamespace

    from saecomp.step_server import watch_cuda_runtime

    runtime = SimpleNamespace(_cuda_getDeviceCount=lambda: 1)
    original = runtime._cuda_getDeviceCount
    calls: list[str] = []
    stop = watch_cuda_runtime(SimpleNamespace(_C=runtime), calls)
    assert runtime._cuda_getDeviceCount() == 1 and calls == ["_cuda_getDeviceCount"]
    stop()
    assert runtime._cuda_getDeviceCount is original and vars(runtime).keys() == {"_cuda_getDeviceCount"}
    runtime._cuda_getDeviceCount()
    assert calls == ["_cuda_getDeviceCount"]  # no longer recorded
    assert watch_cuda_runtime(SimpleNamespace(_C=SimpleNamespace()), calls)() is None  # a CPU build: nothing to watch


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_step_process_stops_its_step(server, tmp_path, signum):
    """MLflow cancels a step with SIGTERM on the process it started; a SIGKILLed one cannot forward anything, so the
    server kills the step when the process's connection drops."""
    _, environment = server
    running = step(environment, "sleep", str(tmp_path / "pid"))
    child = wait_for_pid(tmp_path / "pid")
    assert child != running.pid
    os.kill(running.pid, signum)
    running.communicate(timeout=60)
    assert running.returncode == -signum
    assert gone(child), f"the step ({child}) outlived its process"


def test_ctrl_c_reaches_the_step_once_as_keyboard_interrupt(server, tmp_path):
    _, environment = server
    running = step(environment, "sleep", str(tmp_path / "pid"))
    wait_for_pid(tmp_path / "pid")
    os.kill(running.pid, signal.SIGINT)
    out, err = running.communicate(timeout=60)
    assert running.returncode == 3, err
    assert out.count("interrupted once") == 1


def test_the_server_goes_when_its_pipeline_dies(tmp_path):
    pipeline = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom saecomp.step_server import serving\nwith serving() as p:\n"
         "    print(p.pid, flush=True)\n    time.sleep(120)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={k: v for k, v in os.environ.items() if k != SERVER_ENV},
    )  # fmt: skip
    server_pid = int(pipeline.stdout.readline())
    time.sleep(0.5)
    pipeline.kill()
    pipeline.wait()
    assert gone(server_pid, seconds=60), "the step server outlived the pipeline that started it"


def test_a_garbled_request_gets_an_answer_and_the_server_serves_on(server):
    import json
    import socket

    process, environment = server
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
        raw.connect(environment[SERVER_ENV])
        raw.send(b"not json")
        assert "cold" in json.loads(raw.recv(65536))
    done = step(environment, "exit", "0")
    assert f"forked_from={process.pid}" in done.communicate(timeout=120)[0] and done.returncode == 0
