"""Where a pipeline's steps run: one interface, three back ends.

Every step is an MLflow run computed by its own process (``mlflow run -e <step>`` under the hood); an executor
decides only *where* that process starts and how many run at once:

- ``InProcess``: on this machine, one step at a time (the default); a pipeline's forks its step processes from a
  warm step server (`saecomp.step_server`), which saves each step its imports;
- ``LocalPool(jobs)``: on this machine, ``jobs`` steps at once from every hook/layer cell, the cores shared out;
- ``RayCluster(address)``: each step a Ray task that asks for the resources its step declares (a GPU for the
  model steps when the experiment runs on CUDA), so GPU steps land on GPU nodes. A task whose worker is lost
  is retried once (Ray's ``max_retries``); a step that fails by itself (bad input, a bug) is never retried.

The pipeline hands its cells to ``executor.map`` and every ``tracking.run_step`` goes through
``executor.launch``: the key lookup, reuse and lineage are the same whichever back end runs the step.
"""

from __future__ import annotations

import atexit
import contextlib
import heapq
import itertools
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Resources:
    """What one run of a step needs from the machine it runs on (Ray's task options)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float = 2.0


def step_resources(step: str, device: str) -> Resources:
    """A step's resources on ``device``. The model steps take a whole GPU when the experiment runs on CUDA (their
    memory is the model's and its activations; sharing a card would only make them slower); building the world
    is CPU work in any case."""
    from saecomp.graph import STEPS

    declared = STEPS[step]
    if declared.gpu and device.startswith("cuda"):
        return Resources(cpus=1.0, gpus=1.0, memory_gb=declared.memory_gb)
    return Resources(cpus=1.0, gpus=0.0, memory_gb=declared.memory_gb)


class InProcess:
    """One step at a time on this machine (each in its own process, as `mlflow run` starts it). With ``warm``, a step
    server started at the first launch forks those processes with the libraries already imported
    (`saecomp.step_server`); ``close`` stops it."""

    name = "in-process"
    concurrency = 1

    def __init__(self, warm: bool = False):
        import contextlib
        import threading

        self.warm = warm and os.environ.get("SAECOMP_STEP_SERVER") != "0"
        self._server = contextlib.ExitStack()
        self._server_lock = threading.Lock()
        self._server_started = False

    def launch(
        self, entry_point: str, parameters: dict[str, str], experiment_id: str | None, parent: str | None, key: str, priority: int = 1
    ):
        """Run one step; ``priority`` orders the steps waiting for a slot of a pool (lower first), ignored here."""
        from saecomp.tracking import launch_local

        if self.warm:
            with self._server_lock:
                if not self._server_started:  # its imports overlap this first step, which starts the usual way
                    from saecomp.step_server import serving

                    self._server.enter_context(serving())
                    self._server_started = True
        return launch_local(entry_point, parameters, experiment_id, parent)

    def map(self, function: Callable, items: Iterable) -> list:
        return _map_with_threads(function, list(items), self.concurrency)

    def describe(self) -> str:
        return "in-process, one step at a time" + (" (step processes forked by a warm step server)" if self.warm else "")

    def close(self) -> None:
        with self._server_lock:
            self._server.close()
            self._server_started = False


class PrioritySlots:
    """``n`` slots; a thread waiting for one gets it before every waiter of a higher ``priority`` number, and before
    the later waiters of its own (a semaphore wakes its waiters in no set order). The pipeline gives the steps that
    hold up others the lower numbers, so that the last minutes are not one long step beside an idle core."""

    def __init__(self, n: int):
        self.free = n
        self._waiting: list[tuple[int, int]] = []  # heap of (priority, arrival)
        self._arrivals = itertools.count()
        self._changed = threading.Condition()

    @contextmanager
    def taken(self, priority: int = 1) -> Iterator[None]:
        with self._changed:
            ticket = (priority, next(self._arrivals))
            heapq.heappush(self._waiting, ticket)
            try:
                while self.free == 0 or self._waiting[0] != ticket:
                    self._changed.wait()
            except BaseException:  # (Ctrl-C) a ticket left in the queue would hold up every later waiter
                self._waiting.remove(ticket)
                heapq.heapify(self._waiting)
                self._changed.notify_all()
                raise
            heapq.heappop(self._waiting)
            self.free -= 1
            self._changed.notify_all()  # the next in line may find a slot free too
        try:
            yield
        finally:
            with self._changed:
                self.free += 1
                self._changed.notify_all()


class LocalPool(InProcess):
    """Up to ``jobs`` steps at once on this machine, drawn from every hook/layer cell (and, within a cell, from its
    variants' evaluations): a step waits for a free slot, not for its cell's turn, so the cores stay busy until the
    last step. A step of the cells gets ``cores // jobs`` torch threads; one the pipeline runs before or after them
    (the world, ``prune_llm``, ``compare``: nothing runs beside it) gets every core."""

    name = "local pool"

    def __init__(self, jobs: int, warm: bool = False):
        super().__init__(warm)
        self.jobs = jobs
        self.cores = available_cores()  # read once: launches set OMP_NUM_THREADS for their steps meanwhile
        self.concurrency = 64  # cells (and variants) all start; the slots decide which step runs
        self._slots = PrioritySlots(jobs)
        self._mapping = 0  # cells being computed now (their steps share the cores)
        self._mapping_lock = threading.Lock()

    def launch(
        self, entry_point: str, parameters: dict[str, str], experiment_id: str | None, parent: str | None, key: str, priority: int = 1
    ):
        with self._mapping_lock:
            threads = max(1, self.cores // self.jobs) if self._mapping else self.cores
        with self._slots.taken(priority):
            from saecomp.tracking import STOPPING

            if STOPPING.is_set():  # a step failed (or Ctrl-C) while this one waited for its slot
                raise RuntimeError(f"not starting {entry_point}: the pipeline is stopping")
            with thread_count(threads):
                return super().launch(entry_point, parameters, experiment_id, parent, key)

    def map(self, function: Callable, items: Iterable) -> list:
        items = list(items)
        with self._mapping_lock:
            self._mapping += 1
        try:
            return _map_with_threads(function, items, max(1, min(self.concurrency, len(items))))
        finally:
            with self._mapping_lock:
                self._mapping -= 1

    def describe(self) -> str:
        warm = " (step processes forked by a warm step server)" if self.warm else ""
        return f"local pool, {self.jobs} steps at a time{warm}"


def automatic_jobs(model: str, device: str) -> int:
    """``--jobs auto``: one step per core for the tiny world on CPU (two processes do more on 2 cores than one process
    with two torch threads: benchmarks/README.md), no more than the memory holds at the steps' declared sizes; one at a
    time on a GPU (a model step takes the whole card) or for a real model on CPU (its steps' memory is the model's)."""
    from saecomp.graph import STEPS
    from saecomp.names import TINY_MODELS

    if model not in TINY_MODELS or not device.startswith("cpu"):
        return 1
    per_step = max(step.memory_gb for step in STEPS.values())
    return max(1, min(available_cores(), int(available_memory_gb() // per_step)))


def available_memory_gb() -> float:
    """MemAvailable (Linux), else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def available_cores() -> int:
    """The cores this process may use; a thread count the user set (OMP_NUM_THREADS) is the budget to share out."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    asked = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(cores, int(asked))) if asked.isdigit() else cores


_THREADS = threading.local()


@contextmanager
def thread_count(threads: int) -> Iterator[None]:
    """The torch thread count for the steps this thread launches (``tracking.launch_local`` hands it to the step's
    environment, where torch and the step server read it)."""
    before = getattr(_THREADS, "count", None)
    _THREADS.count = threads
    try:
        yield
    finally:
        _THREADS.count = before


def launch_thread_count() -> int | None:
    """The thread count :func:`thread_count` set for this thread's launches, if any."""
    return getattr(_THREADS, "count", None)


# The environment a step process needs wherever it runs: the tracking store, the caches and offline mode.
FORWARDED_ENVIRONMENT = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "HF_TOKEN",
    "SAECOMP_CACHE",
    "SAECOMP_HEARTBEAT_SECONDS",
    "SAECOMP_STALE_AFTER_SECONDS",
    "TOKENIZERS_PARALLELISM",
)


_WORKER_SERVER = contextlib.ExitStack()  # a Ray worker's step server: started with its first step, gone with the worker


def _step_on_worker(entry_point: str, parameters: dict[str, str], experiment_id, parent, key: str, environment: dict[str, str]):
    """A Ray task: run one step on the node Ray picked, with the driver's tracking store and offline settings. A retry
    (the first worker was lost) first looks for the run: the step may have finished just before its worker died.

    Ray keeps its worker processes for the next tasks, so each worker keeps a step server (`saecomp.step_server`) from
    its first step on: the steps after it are forked with the libraries imported. The server and its steps are in a
    session of their own, so that a step outlives its lost worker long enough to close its run as KILLED; the server
    ends with the worker."""
    import mlflow
    import ray

    from saecomp.tracking import RAY_NODE_ENV, find_finished_run, launch_local

    os.environ.update(environment)
    # The node, for the step's run (saecomp.ray_node); before the step server starts, whose steps inherit it.
    os.environ[RAY_NODE_ENV] = ray.get_runtime_context().get_node_id()
    mlflow.set_tracking_uri(environment["MLFLOW_TRACKING_URI"])
    from saecomp.step_server import SERVER_ENV, serving

    if os.environ.get(SERVER_ENV) is None:  # the first step on this worker (its imports overlap that step)
        _WORKER_SERVER.enter_context(serving(own_session=True))
        atexit.register(_WORKER_SERVER.close)
    return find_finished_run(entry_point, key) or launch_local(entry_point, parameters, experiment_id, parent, own_session=True)


class RayCluster:
    """Each step a Ray task with its declared resources, on the cluster at ``address`` (``local``: start one here).

    The cluster can be started any way Ray supports (``ray start``, KubeRay, Slurm): saecomp only connects to it.
    Its nodes need saecomp installed and the same tracking store reachable; several nodes need a tracking server
    (``check_store``)."""

    name = "ray"

    def __init__(self, address: str | None = None, device: str = "cpu", num_cpus: int | None = None, retries: int = 1):
        try:
            import ray
        except ImportError:
            raise ValueError("--executor ray needs Ray: pip install 'saecomp[cluster]' (or ray==2.60.0)") from None

        self.device = device  # the experiment's: decides whether the model steps ask for a GPU
        # Steps on another machine cannot use this machine's files, even on a cluster of one node.
        self.remote = address not in (None, "local", "auto") and not _on_this_machine(address)
        self._ray = ray
        if address not in (None, "local", "auto"):
            _check_reachable(address)
        if not ray.is_initialized():
            kwargs = {"num_cpus": num_cpus} if address in (None, "local") else {}
            # "local", not None: None joins a cluster already running on this machine (`ray start`'s, another pipeline's),
            # which is not what no address means here
            ray.init(address="local" if address in (None, "local") else address, include_dashboard=False, log_to_driver=True, **kwargs)
        self.retries = retries
        self.concurrency = 64  # the cells wait on Ray, which runs as many as the cluster's resources allow
        self._remote = ray.remote(_step_on_worker)
        self._live: dict = {}

    def nodes(self) -> int:
        return sum(1 for node in self._ray.nodes() if node.get("Alive"))

    def launch(
        self, entry_point: str, parameters: dict[str, str], experiment_id: str | None, parent: str | None, key: str, priority: int = 1
    ):
        import mlflow

        resources = step_resources(entry_point, self.device)
        environment = {v: os.environ[v] for v in FORWARDED_ENVIRONMENT if v in os.environ}
        environment["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
        # torch threads = the CPUs the task holds (Ray sets OMP's alone; BLAS would take every core of the node)
        environment["OMP_NUM_THREADS"] = environment["MKL_NUM_THREADS"] = str(max(1, int(resources.cpus)))
        if os.environ.get("SAECOMP_STEP_SERVER") == "0":  # no warm workers either (a socket path here means nothing there)
            environment["SAECOMP_STEP_SERVER"] = "0"
        task = self._remote.options(
            num_cpus=resources.cpus,
            num_gpus=resources.gpus,
            memory=int(resources.memory_gb * 2**30),  # so that Ray never packs more steps on a node than fit
            max_retries=self.retries,  # a lost worker or node: run the step again, once
            retry_exceptions=False,  # a step that failed by itself fails the same way again
            name=f"saecomp.{entry_point}",
        ).remote(entry_point, parameters, experiment_id, parent, key, environment)
        self._live[task.hex()] = task
        try:
            return self._ray.get(task)
        except self._ray.exceptions.RayTaskError as error:  # the step's own failure, with its own traceback
            raise error.as_instanceof_cause() from None
        finally:
            self._live.pop(task.hex(), None)

    def cancel(self) -> None:
        for task in list(self._live.values()):
            self._ray.cancel(task, force=True)  # the worker dies; its step notices and closes its run as KILLED

    def map(self, function: Callable, items: Iterable) -> list:
        items = list(items)
        return _map_with_threads(function, items, max(1, min(self.concurrency, len(items))))

    def describe(self) -> str:
        resources = self._ray.cluster_resources()
        return f"ray, {self.nodes()} node(s), {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"

    def close(self) -> None:
        self._ray.shutdown()


def _on_this_machine(address: str) -> bool:
    import socket

    host = address.removeprefix("ray://").rpartition(":")[0]
    return host in ("127.0.0.1", "localhost", socket.gethostname())


def _check_reachable(address: str) -> None:
    """Fail in seconds when nothing listens at a Ray address (``ray.init`` itself waits minutes before it gives up)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--address {address!r} is not valid; valid: host:port (e.g. head:6379), ray://host:10001, auto or local")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        raise ValueError(f"--address {address}: nothing answers there ({error}); is the Ray head running (ray start --head)?") from None


def check_store(executor, tracking_uri: str, artifact_location: str) -> None:
    """Refuse what cannot work: steps on several Ray nodes writing to one machine's SQLite file or artifact folder."""
    if not isinstance(executor, RayCluster) or (executor.nodes() <= 1 and not executor.remote):
        return
    from urllib.parse import urlparse

    local_store = urlparse(tracking_uri).scheme in ("", "file", "sqlite")
    local_artifacts = urlparse(artifact_location).scheme in ("", "file")
    if local_store or local_artifacts:
        where = tracking_uri if local_store else artifact_location
        raise ValueError(
            f"--executor ray on {executor.nodes()} nodes needs a tracking server that every node reaches "
            f"(MLFLOW_TRACKING_URI=http://...), with remote artifacts; this store is local: {where}"
        )


def _map_with_threads(function: Callable, items: list, workers: int) -> list:
    """``function`` over ``items`` with ``workers`` threads, results in the order of ``items``. The first failure (or
    Ctrl-C) cancels the steps running now, starts no new one, and is raised once the cells have noticed."""
    from saecomp.tracking import stop_running_steps

    pool = ThreadPoolExecutor(max_workers=workers)
    futures = [pool.submit(function, item) for item in items]
    try:
        for future in as_completed(futures):
            if future.exception() is not None:
                raise future.exception()
    except BaseException:
        stop_running_steps()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return [future.result() for future in futures]


_CURRENT: list = [InProcess()]


def current():
    """The executor `tracking.run_step` launches through (in-process unless a pipeline chose another)."""
    return _CURRENT[0]


def use(executor) -> None:
    _CURRENT[0] = executor


def make(name: str, jobs: int = 1, address: str | None = None, device: str = "cpu"):
    """The executor a pipeline's options name: ``local`` (``jobs`` > 1: a pool) or ``ray``."""
    if name == "ray":
        return RayCluster(address, device=device)
    if name != "local":
        raise ValueError(f"executor={name!r} is not valid; valid: local, ray")
    return LocalPool(jobs, warm=True) if jobs > 1 else InProcess(warm=True)
