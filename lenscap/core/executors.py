"""Where tasks run: this machine's processes, or a Ray cluster.

A *task* is anything with ``setup()`` (once per worker, before its first item: load models, open
clients) and ``run(item) -> dict`` (one item: a shard, a dedup table). Executors differ only in
where ``run`` happens; what a task writes, and how it marks an item complete, is the task's business.
So a task can move between executors and resume either way: a rerun skips what any run completed.
``lenscap.core.job.Job.map`` is the one caller of ``Executor.run``.

Both executors keep the same failure rules. An item whose ``run`` raises is reported and the
others go on; a ``LenscapError`` (the budget ran out, the backend rejected the key) concerns the
whole run: no further task starts, started ones finish, and the error is returned to the caller.
On Ray, a worker that *dies* (SIGKILL, out of memory, a lost node) is not a failure of the task:
Ray runs the task again on another worker, ``max_retries`` times.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Protocol

from lenscap.core.errors import LenscapError, MissingDependency, UsageError
from lenscap.core.install import install_hint
from lenscap.core.lock import held_registries, register_process

__all__ = [
    "Task",
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "make_executor",
    "executor_for",
    "EXECUTORS",
    "start_local_ray",
    "connect_ray",
]

EXECUTORS = ("local", "ray")
# Called with (item, its result) as each task finishes.
OnDone = Callable[[int, dict[str, Any]], None]


class Task(Protocol):
    """What an executor runs: ``setup`` once per worker, then ``run`` per item (a shard id, a table)."""

    def setup(self) -> None: ...

    def run(self, item: int) -> dict[str, Any]: ...


class Executor(ABC):
    name: str

    @property
    def distributed(self) -> bool:
        """Whether tasks may run on other machines (so state shared through memory is not shared)."""
        return False

    @property
    def width(self) -> int:
        """How many tasks run at once."""
        return 1

    @abstractmethod
    def run(
        self, task: Task, items: list[int], on_done: OnDone, failed: dict[int, str], *, keep_workers: bool = False
    ) -> LenscapError | None:
        """Run ``task`` for every item; fill ``failed`` with the items that raised; return a fatal error.
        ``keep_workers``: the caller will run the same task again soon (a batch job prepares shards a few
        at a time), so workers that set it up stay until ``close``."""

    def close(self) -> None:
        """Let go of workers kept for later runs."""


# -- this machine ---------------------------------------------------------------------------------

_worker_task: Task | None = None
# A setup that refused the task (a missing extra, a rejected key): said by each task, as the error it is,
# where an initializer that raised would break the whole pool with nothing but BrokenProcessPool.
_worker_refusal: LenscapError | None = None


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was killed (SIGKILL leaves it no chance to stop its pool) exits too, instead
    of living on holding the parent's pipes (a caller waiting for their end would wait forever) or going
    on with its tasks beside the rerun (paying for captions twice).

    ``parent`` is the pid the parent gave when it started the pool, not ``os.getppid()`` read here: a
    parent killed while this worker was still starting is already gone by now, and the worker would
    then watch its new parent (PID 1) forever."""
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.25)
        os._exit(1)

    threading.Thread(target=watch, name="lenscap-parent-watch", daemon=True).start()


def _init_worker(task: Task, parent: int, registries: list[str]) -> None:
    global _worker_task, _worker_refusal
    # Registered before the parent is checked: a rerun that finds the parent dead then either sees this
    # worker alive (and waits for it), or finds it gone; never a worker it does not know of at work.
    register_process(registries)
    _exit_with_parent(parent)
    _worker_task = task
    try:
        task.setup()
    except LenscapError as e:
        _worker_refusal = e


def _run_in_worker(item: int) -> dict[str, Any]:
    if _worker_refusal is not None:
        raise _worker_refusal
    assert _worker_task is not None
    return _worker_task.run(item)


class LocalExecutor(Executor):
    """``processes`` spawned worker processes (``spawn``: no state inherited by accident, same on
    every OS), or this process itself when ``processes`` is 1."""

    name = "local"

    def __init__(self, processes: int = 1) -> None:
        if processes < 1:
            raise UsageError(f"--processes must be at least 1, not {processes}")
        self.processes = processes
        self._kept: tuple[Task, ProcessPoolExecutor] | None = None
        self._set_up: Task | None = None

    @property
    def width(self) -> int:
        return self.processes

    def run(
        self, task: Task, items: list[int], on_done: OnDone, failed: dict[int, str], *, keep_workers: bool = False
    ) -> LenscapError | None:
        if not items:
            return None
        # Never more workers than tasks: spawning a process costs its imports. A pool kept for later
        # runs of the task is made as wide as asked, since later runs may have more.
        workers = self.processes if keep_workers else min(self.processes, len(items))
        if workers <= 1:
            if self._set_up is not task:
                task.setup()
            self._set_up = task if keep_workers else None
            for item in items:
                try:
                    result = task.run(item)
                except LenscapError as e:
                    return e
                except Exception as e:  # noqa: BLE001 - one task's failure must not cost the others
                    failed[item] = f"{type(e).__name__}: {e}"
                    continue
                on_done(item, result)
            return None
        if self._kept is not None and self._kept[0] is task and not getattr(self._kept[1], "_broken", False):
            return self._run_pool(self._kept[1], items, on_done, failed)  # a pool whose worker died is made again
        self.close()
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(task, os.getpid(), held_registries())
        )
        if keep_workers:
            self._kept = (task, pool)
            return self._run_pool(pool, items, on_done, failed)
        with pool:
            return self._run_pool(pool, items, on_done, failed)

    def close(self) -> None:
        if self._kept is not None:
            self._kept[1].shutdown(cancel_futures=True)
            self._kept = None
        self._set_up = None

    def _run_pool(
        self, pool: ProcessPoolExecutor, items: list[int], on_done: OnDone, failed: dict[int, str]
    ) -> LenscapError | None:
        fatal: LenscapError | None = None
        futures: dict[Future[dict[str, Any]], int] = {pool.submit(_run_in_worker, i): i for i in items}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                item = futures[fut]
                if fut.cancelled():
                    continue
                try:
                    result = fut.result()
                except LenscapError as e:
                    if fatal is None:
                        fatal = e
                        for other in pending:
                            other.cancel()  # tasks not started yet; running ones finish
                    continue
                except Exception as e:  # noqa: BLE001
                    failed[item] = f"{type(e).__name__}: {e}"
                    continue
                on_done(item, result)
        return fatal


# -- a Ray cluster ----------------------------------------------------------------------------------

# Per worker process: the task that ran ``setup`` here, by run token, so a worker that runs many
# tasks of one run sets up once (a model loads once), and a new run never reuses an old task.
_ray_ready: dict[str, Task] = {}


def _ray_task(task: Task, token: str, item: int) -> dict[str, Any]:
    ready = _ray_ready.get(token)
    if ready is None:
        task.setup()
        _ray_ready.clear()
        _ray_ready[token] = ready = task
    return ready.run(item)


def import_ray() -> Any:
    try:
        import ray  # optional (the ray extra)
    except ImportError:
        raise MissingDependency(f"--executor ray needs Ray: {install_hint('ray')}") from None
    return ray


LOOPBACK = "127.0.0.1"
# Ray reads this once, when it is imported: "0" is the mode it runs in on macOS and Windows, one machine
# only, where the node's address is the loopback address and every server it starts listens there.
# (``_node_ip_address="127.0.0.1"`` or ``ray start --node-ip-address=127.0.0.1`` alone does not do
# it: Ray turns a loopback address into the machine's network address.)
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _single_machine_mode(ray: Any) -> None:
    """Ray's single-machine mode, in this process and in every process started from it from now on
    (Ray's own, and a process that joins by the loopback address, like img2dataset's)."""
    os.environ[SINGLE_MACHINE_ENV] = "0"
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if constants is not None and hasattr(constants, "ENABLE_RAY_CLUSTER"):
        constants.ENABLE_RAY_CLUSTER = False  # Ray read the variable when it was imported, maybe before now


def start_local_ray(**init_kwargs: Any) -> Any:
    """Start a Ray instance on this machine for this process, reachable only from this machine: its
    node address is 127.0.0.1 and all its servers listen on loopback, none on a network address.
    ``init_kwargs`` go to ``ray.init`` (``num_cpus``, ...). Returns ``ray``."""
    ray = import_ray()
    _single_machine_mode(ray)
    ray.init(address="local", _node_ip_address=LOOPBACK, **init_kwargs)
    return ray


def connect_ray(address: str | None) -> Any:
    """Ray, connected: to ``address`` (``auto``, ``ray://host:10001``, a GCS ``host:6379``), to
    ``$RAY_ADDRESS``, or else to a Ray instance started on this machine for this run (on loopback:
    ``start_local_ray``). A GCS address on 127.0.0.1 is joined as what listens there: a single-machine
    instance (one ``start_local_ray`` started, in this process's parent or elsewhere) in that mode."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address:
        _check_reachable(address)
        if _loopback_only(ray, address):
            _single_machine_mode(ray)
    logs = {"log_to_driver": False, "include_dashboard": False, "logging_level": "WARNING", "configure_logging": True}
    try:
        # Worker output stays in Ray's logs: lenscap's stdout is for --json summaries and pipes.
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address, **logs)
        else:
            start_local_ray(**logs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or os.environ.get("RAY_ADDRESS") or "a new local instance"
        raise UsageError(
            f"cannot start or reach the Ray cluster ({where}): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    return ray


def _loopback_only(ray: Any, address: str) -> bool:
    """Whether the GCS at ``address`` (a loopback host) listens on loopback only: Ray would look for it
    at this machine's network address instead, and not find it."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    if address.startswith("ray://") or not sep or not port.isdigit() or host not in _LOCAL_HOSTS:
        return False
    if os.environ.get(SINGLE_MACHINE_ENV) == "0":
        return True  # the mode is on already
    try:
        network = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - no network address: Ray uses the loopback one itself
        return False
    if network in _LOCAL_HOSTS:
        return False
    try:
        socket.create_connection((network, int(port)), timeout=2).close()
    except OSError:
        return True
    return False


def _check_reachable(address: str) -> None:
    """Fail in seconds on an address nothing listens at: Ray itself retries for minutes."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local": Ray finds (or refuses) those itself, quickly
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise UsageError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


class RayExecutor(Executor):
    """One Ray task per item, on the cluster at ``address``.

    At most ``max_in_flight`` tasks are submitted at a time (default: twice the cluster's CPUs), so
    the driver holds a window of task handles, not one per shard of an 800M-sample job.
    """

    name = "ray"

    def __init__(
        self, address: str | None = None, max_retries: int = 3, num_cpus: float = 1.0, max_in_flight: int | None = None
    ) -> None:
        if max_retries < 0:
            raise UsageError(f"max_retries must be 0 or more, not {max_retries}")
        self.address = address
        self.max_retries = max_retries
        self.num_cpus = num_cpus
        self.max_in_flight = max_in_flight

    @property
    def distributed(self) -> bool:
        return True

    def connect(self) -> Any:
        return connect_ray(self.address)

    def cluster_address(self) -> str:
        """The GCS address other processes join this cluster by (a local instance started here too)."""
        return str(self.connect().get_runtime_context().gcs_address)

    @property
    def width(self) -> int:
        return max(1, int(self.connect().cluster_resources().get("CPU", 1) / self.num_cpus))

    def run(
        self, task: Task, items: list[int], on_done: OnDone, failed: dict[int, str], *, keep_workers: bool = False
    ) -> LenscapError | None:
        # Ray keeps its workers anyway; a task set up on one is set up again only for a new run token.
        if not items:
            return None
        ray = self.connect()
        remote_task = ray.remote(_ray_task).options(
            max_retries=self.max_retries, retry_exceptions=False, num_cpus=self.num_cpus, name="lenscap-task"
        )
        task_ref = ray.put(task)
        token = uuid.uuid4().hex
        window = self.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        queue = iter(items)
        running: dict[Any, int] = {}
        fatal: LenscapError | None = None

        def submit() -> None:
            while fatal is None and len(running) < window:
                item = next(queue, None)
                if item is None:
                    return
                running[remote_task.remote(task_ref, token, item)] = item

        submit()
        while running:
            finished, _ = ray.wait(list(running), num_returns=1)
            for ref in finished:
                item = running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    cause = e.cause if getattr(e, "cause", None) is not None else e
                    if isinstance(cause, LenscapError):
                        fatal = fatal or cause
                    else:
                        failed[item] = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}".rstrip(": ")
                    continue
                except ray.exceptions.RayError as e:  # the worker died more than max_retries times
                    failed[item] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                    continue
                on_done(item, result)
            submit()
        return fatal


def executor_for(options: Any, processes: int | None = None) -> Executor:
    """The executor an options object's ``--executor``, ``--processes`` (or ``processes``, a command's
    own default) and ``--ray-address`` ask for; an unreachable Ray cluster is an error here, before any
    output is touched."""
    executor = make_executor(options.executor, processes or options.workers, options.ray_address)
    if isinstance(executor, RayExecutor):
        executor.connect()
    return executor


def make_executor(executor: str = "local", processes: int = 1, ray_address: str | None = None) -> Executor:
    """The executor the CLI's ``--executor`` / ``--processes`` / ``--ray-address`` ask for."""
    if executor == "local":
        if ray_address:
            raise UsageError("--ray-address needs --executor ray")
        return LocalExecutor(processes)
    if executor == "ray":
        import_ray()
        return RayExecutor(ray_address)
    raise UsageError(f"--executor must be one of {', '.join(EXECUTORS)}, not {executor!r}")
