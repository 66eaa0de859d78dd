"""Warm step processes: a server that imported the heavy libraries once forks the process of each step.

Every step is its own process (`mlflow run -e <step>` starts ``python -m entrypoints.<step>``), and each spent about
6 s importing torch, TransformerLens, SAELens, SAEBench and MLflow before any work: on the two dozen steps of the
tiny default pipeline, minutes. Inside a pipeline a step server imports them once. The step's process, started and
tracked by MLflow as before, hands its command line, environment, working folder and standard streams to the server
(``entrypoints/__init__.py`` calls `hand_over`), and the server forks a child that runs the step as ``python -m``
would. The step's process then waits for that child: it forwards the signals it gets (Ctrl-C, MLflow's cancel) and
exits with the child's status, so that MLflow and the pipeline see a step process as before. The child, whose
command line is the server's, is named after its step (``prune_sae`` in ``ps -o pid,comm`` and ``top``) and tags
its run with its pid.

Whenever the server cannot run a step exactly as a fresh interpreter would, the step starts the usual way (imports
included): no server (a step run by hand), a server not ready yet or gone, another interpreter or
saecomp checkout, or an environment that differs in a variable the libraries read when imported (``HF_HOME``, say).
Set ``SAECOMP_STEP_SERVER=0`` to never use one.

This module is imported by every step before anything heavy: it imports only the standard library.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

SERVER_ENV = "SAECOMP_STEP_SERVER"  # the server's socket path; "0": never use a server
LAUNCHER_ENV = "SAECOMP_LAUNCHER"  # see saecomp.tracking: the pid a step watches
# What a step's environment may not differ in from the server's: the variables the preloaded libraries (or the
# interpreter) read when imported: cache folders, offline switches, thread pools, locale, the Python path. Others
# (a terminal's COLUMNS, MLflow's run variables, the launcher) are read when the step runs: the step gets its own.
IMPORT_TIME_PREFIXES = (
    "HF_", "HUGGINGFACE", "TRANSFORMERS", "DATASETS", "TOKENIZERS", "SAFETENSORS", "TORCH", "PYTORCH", "CUDA", "NVIDIA",
    "OMP_", "MKL_", "KMP_", "OPENBLAS", "GOMP", "NUMEXPR", "PYTHON", "MLFLOW_", "SAECOMP_", "SAE_", "WANDB", "MPL",
    "XDG_", "LC_", "LANG", "HOME", "TMPDIR", "TEMP", "TMP", "USER", "LOGNAME", "TF_", "USE_",
)  # fmt: skip
# Of those, what may differ all the same: MLflow's run variables and the launcher are read when the step runs; the
# thread counts are applied to torch in the child.
PER_STEP_VARIABLES = frozenset(
    {"MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_TRACKING_URI", LAUNCHER_ENV, SERVER_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS"}
)
# What every step imports anyway (in this order); a missing optional one is skipped.
PRELOAD = (
    "torch",
    "numpy",
    "pandas",
    "transformers",
    "datasets",
    "huggingface_hub",
    "safetensors",
    "transformer_lens",
    "sae_lens",
    "mlflow",
    "sklearn.linear_model",
    "sae_bench.evals.core.main",
    "sae_bench.evals.absorption.main",
    "sae_bench.evals.scr_and_tpp.main",
    "sae_bench.evals.sparse_probing.main",
    "sae_bench.evals.ravel.main",
)
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
MESSAGE_BYTES = 1 << 20

_forked_from: int | None = None  # in a step forked by a server: the server's pid


def forked_from() -> int | None:
    """The step server's pid when this process is a step it forked, else None (a fresh interpreter)."""
    return _forked_from


def _saecomp_root() -> str:
    return str(Path(__file__).resolve().parents[1])


# --- the step's side ------------------------------------------------------------------------------------------


def hand_over() -> None:
    """Have the step server run this ``python -m entrypoints.<step>`` process's step, and exit with its status.
    Returns (the interpreter goes on to import and run the step itself) when no server can take it."""
    path = os.environ.get(SERVER_ENV)
    argv = getattr(sys, "orig_argv", [])
    if not path or path == "0" or _forked_from is not None or "-m" not in argv[:-1]:
        return
    module_at = argv.index("-m") + 1
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        connection.connect(path)
        request = {
            "module": argv[module_at],
            "args": argv[module_at + 1 :],
            "env": dict(os.environ),
            "cwd": os.getcwd(),
            "path": sys.path,
            "executable": sys.executable,
            "saecomp": _saecomp_root(),
        }
        socket.send_fds(connection, [json.dumps(request).encode()], [0, 1, 2])
        reply = json.loads(connection.recv(MESSAGE_BYTES) or b'{"cold": "the step server closed the connection"}')
    except OSError:  # not listening yet, or gone: start the usual way
        connection.close()
        return
    if "cold" in reply:
        print(f"[saecomp] {argv[module_at]} starts without the step server: {reply['cold']}", file=sys.stderr, flush=True)
        connection.close()
        return
    step = int(reply["pid"])

    def forward(signum, frame):
        try:
            os.kill(step, signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    data = connection.recv(MESSAGE_BYTES)
    if not data:
        print(f"[saecomp] the step server went away while it ran {argv[module_at]} (pid {step})", file=sys.stderr, flush=True)
        os._exit(1)
    _exit_like(int(json.loads(data)["status"]))


def _exit_like(status: int) -> None:
    """Exit with ``status`` as ``os.waitstatus_to_exitcode`` gives it: negative for the signal that ended the step,
    which this process then dies of too."""
    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        os._exit(128 - status)
    os._exit(status)


# --- the pipeline's side --------------------------------------------------------------------------------------


@contextmanager
def serving(own_session: bool = False):
    """A step server for the steps started inside the block (and their own nested steps), stopped after it; nothing
    when ``SAECOMP_STEP_SERVER`` is 0 or a server is already set for this process. ``own_session``: the server and
    the steps it forks in a session of their own, out of reach of signals for this process's group (a Ray worker's,
    which Ray signals when the worker dies: its steps must outlive it to close their runs as KILLED)."""
    import shutil
    import subprocess
    import tempfile

    if os.environ.get(SERVER_ENV):
        yield None
        return
    folder = tempfile.mkdtemp(prefix="saecomp-steps-")
    path = os.path.join(folder, "socket")
    process = subprocess.Popen(
        [sys.executable, "-m", "saecomp.step_server", path, str(os.getpid())],
        stdin=subprocess.DEVNULL,
        cwd=_saecomp_root(),
        start_new_session=own_session,
    )
    os.environ[SERVER_ENV] = path
    try:
        yield process
    finally:
        os.environ.pop(SERVER_ENV, None)
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)


# --- the server -----------------------------------------------------------------------------------------------


def serve(path: str, parent: int) -> None:
    """Import `PRELOAD`, then fork a step for every request on the socket at ``path`` until ``parent`` is gone or
    a SIGTERM comes. Single-threaded: a fork copies only the thread that calls it."""
    import importlib
    import select

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the pipeline and the steps (forwarded by theirs)
    before = dict(os.environ)
    # CUDA does not survive a fork: once the driver is initialised here, every forked step fails its first CUDA call.
    # SAEBench's absorption asks `torch.cuda.is_available()` when imported; asked through NVML (PyTorch's documented
    # switch) the question initialises nothing. Only the server's imports see the switch, not the steps.
    os.environ[NVML_CHECK] = "1"
    unusable = None
    asked_cuda: list[str] = []  # the CUDA runtime asked for its devices during the imports (NVML missing, say)
    stop_watching = lambda: None  # noqa: E731 - replaced once torch is imported
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
        except Exception as error:  # noqa: BLE001 - a library that fails to import fails the step, in the step
            print(f"[saecomp] the step server could not import {name}: {error!r}", file=sys.stderr, flush=True)
            unusable = f"importing {name} failed in the step server ({error!r})"
            break
        if name == "torch":
            stop_watching = watch_cuda_runtime(sys.modules["torch"], asked_cuda)
    os.environ.pop(NVML_CHECK, None)
    if NVML_CHECK in before:
        os.environ[NVML_CHECK] = before[NVML_CHECK]
    torch = sys.modules.get("torch")
    if torch is not None:
        stop_watching()
        if torch.cuda.is_initialized() or asked_cuda:
            unusable = "CUDA was initialised while the step server imported its libraries; a forked step could not use it"
    set_by_imports = {k: v for k, v in os.environ.items() if before.get(k) != v}
    own = {
        "env": before,
        "path": sys.path,
        "executable": sys.executable,
        "saecomp": _saecomp_root(),
        "unusable": unusable,
        "set_by_imports": set_by_imports,
    }

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path + ".partial")
    listener.listen(64)
    os.rename(path + ".partial", path)  # a client sees the socket only once it accepts
    steps: dict[int, socket.socket] = {}  # pid -> the connection of the step process waiting for it
    try:
        while os.getppid() == parent:
            waiting = [listener, *steps.values()]
            for ready in select.select(waiting, [], [], 0.1)[0]:
                if ready is listener:
                    _accept(listener, steps, own, set_by_imports)
                else:  # a step's process died (SIGKILL): its step dies with it, as it would have
                    pid = next(p for p, c in steps.items() if c is ready)
                    _signal(pid, signal.SIGKILL)
                    steps.pop(pid).close()
            _reap(steps)
    finally:
        listener.close()
        try:
            os.unlink(path)
            os.rmdir(os.path.dirname(path))  # its own folder (`serving`), left behind when the parent was killed
        except OSError:
            pass


def watch_cuda_runtime(torch, calls: list[str]):
    """Record in ``calls`` every call of the CUDA runtime's device count (what initialises the driver, and so spoils
    every later fork, when torch cannot ask NVML); returns the function that stops recording."""
    module = torch._C
    original = getattr(module, "_cuda_getDeviceCount", None)
    if original is None:  # a torch built without CUDA
        return lambda: None

    def device_count():
        calls.append("_cuda_getDeviceCount")
        return original()

    module._cuda_getDeviceCount = device_count

    def stop() -> None:
        module._cuda_getDeviceCount = original

    return stop


def _accept(listener: socket.socket, steps: dict, own: dict, set_by_imports: dict) -> None:
    """Serve one request: fork its step, or answer why not. Nothing a client sends (or fails to) stops the server."""
    connection, _ = listener.accept()
    fds: list[int] = []
    try:
        message, fds, _, _ = socket.recv_fds(connection, MESSAGE_BYTES, 3)
        request = json.loads(message)
        why = _why_cold(request, own) if len(fds) == 3 else "no standard streams"
    except (OSError, ValueError, TypeError, AttributeError) as error:
        why = f"unreadable request ({error})"
    try:
        if why:
            connection.send(json.dumps({"cold": why}).encode())
            connection.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_step(request, fds, [listener, connection, *steps.values()], set_by_imports)  # never returns
        try:
            connection.send(json.dumps({"pid": pid}).encode())
        except OSError:  # the step's process is gone already: so is its step
            _signal(pid, signal.SIGKILL)
            connection.close()
            return
        steps[pid] = connection
    except OSError:
        connection.close()
    finally:
        for fd in fds:
            os.close(fd)


def _why_cold(request: dict, own: dict) -> str | None:
    """Why a step cannot run forked from this server (None: it can)."""
    if own.get("unusable"):
        return own["unusable"]
    if request.get("executable") != own["executable"]:
        return f"another interpreter ({request.get('executable')})"
    if request.get("saecomp") != own["saecomp"]:
        return f"another saecomp checkout ({request.get('saecomp')})"
    if request.get("path", [])[1:] != own["path"][1:]:
        return "another sys.path"
    env = request.get("env", {})
    set_by_imports = own.get("set_by_imports", {})
    for variable in sorted(set(env) | set(own["env"])):
        read_at_import = variable.startswith(IMPORT_TIME_PREFIXES) and variable not in PER_STEP_VARIABLES
        if not read_at_import or env.get(variable) == own["env"].get(variable):
            continue
        if variable in set_by_imports and env.get(variable) == set_by_imports[variable]:
            continue  # what these imports set (KMP_DUPLICATE_LIB_OK, by scikit-learn), inherited from a process that made them too
        return f"environment variable {variable} differs"
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # a thread count set at import cannot be unset
        if variable in own["env"] and variable not in env:
            return f"{variable} unset"
    return None


def _run_step(request: dict, fds: list[int], inherited: list[socket.socket], set_by_imports: dict) -> None:
    """In the forked child: become the step's process (its streams, folder, environment, argv, signals) and run the
    module as ``python -m`` does, then exit as the interpreter would."""
    global _forked_from
    code = 1
    try:
        _forked_from = os.getppid()
        os.setsid()  # Ctrl-C reaches the step once, forwarded by its own process
        for sock in inherited:
            sock.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.update(set_by_imports)  # what the imports would have set in the step's own interpreter
        sys.path[:] = request["path"]
        sys.argv = [request["module"], *request["args"]]
        _name_process(request["module"])
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(line_buffering=stream is sys.stderr or os.isatty(stream.fileno()))
        _fresh_random_state(request["env"])
        code = _run_module(request["module"])
    except BaseException:  # noqa: BLE001 - a child must never return into the server's loop
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            _exit_like(code)


def _name_process(module: str) -> None:
    """Name this process after its step (``prune_sae`` in ``ps -o comm``, ``top``): its command line is the
    server's."""
    try:
        import ctypes

        name = module.rpartition('.')[2].encode()[:15]
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _fresh_random_state(env: dict) -> None:
    """What a fresh interpreter would have: unseeded generators drawn from the OS (not the server's copy), and the
    step's torch thread count."""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()  # a fresh interpreter seeds torch's generator from the OS too
    threads = env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS")
    if threads and threads.isdigit():
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(threads))
        # Every BLAS and OpenMP pool the server's imports loaded (numpy's and scipy's OpenBLAS, scikit-learn's OpenMP)
        # was sized at import for the server's cores; a fresh interpreter would size them by this step's count (left
        # as they were, two steps of a 2-core pool would run four BLAS threads on two cores).
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            return
        threadpool_limits(limits=int(threads))


def _run_module(module: str) -> int:
    """Run ``module`` as ``__main__`` and return the exit code the interpreter would have exited with (negative:
    the signal it kills itself with, as for an uncaught KeyboardInterrupt)."""
    import atexit
    import runpy
    import threading
    import traceback

    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        if exit.code is None:
            code = 0
        elif isinstance(exit.code, int):
            code = exit.code
        else:
            print(exit.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:  # noqa: BLE001 - printed and turned into exit status 1, as the interpreter does
        traceback.print_exc()
        code = 1
    # As the interpreter's own shutdown: wait for non-daemon threads, then the exit handlers (MLflow's among them).
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    return code


def _reap(steps: dict) -> None:
    """Report every finished step to its process; collect those whose process is already gone."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        connection = steps.pop(pid, None)
        if connection is not None:
            try:
                connection.send(json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode())
            except OSError:
                pass
            connection.close()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


if __name__ == "__main__":  # the module itself, not this __main__ copy, holds the state a step reads (forked_from)
    from saecomp import step_server

    step_server.serve(sys.argv[1], int(sys.argv[2]))
