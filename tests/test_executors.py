"""The local executor: never more worker processes than tasks, and a worker whose setup refuses the job
says why instead of breaking the pool."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lenscap.core.errors import MissingDependency
from lenscap.core.executors import LocalExecutor


class WherePid:
    def setup(self) -> None:
        pass

    def run(self, item: int) -> dict:
        return {"pid": os.getpid()}


class Refuses:
    def setup(self) -> None:
        raise MissingDependency("the nsfw annotator needs the nsfw extra")

    def run(self, item: int) -> dict:
        return {}


def test_one_task_runs_here_whatever_processes_says():
    done: dict[int, dict] = {}
    assert LocalExecutor(4).run(WherePid(), [7], lambda i, r: done.__setitem__(i, r), {}) is None
    assert done == {7: {"pid": os.getpid()}}


def test_a_worker_setup_that_refuses_the_job_is_that_error_not_a_broken_pool():
    failed: dict[int, str] = {}
    error = LocalExecutor(2).run(Refuses(), [0, 1, 2], lambda i, r: None, failed)
    assert isinstance(error, MissingDependency) and "nsfw extra" in str(error)
    assert failed == {}


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    """SIGKILL leaves the driver no chance to stop its pool: the workers must not live on (they hold its
    stdout, so a caller reading it to the end would wait forever)."""
    import signal
    import subprocess
    import sys
    import time

    script = f"""
import os, sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from lenscap.core.executors import LocalExecutor
from tests.test_executors import Sleeps
LocalExecutor(2).run(Sleeps({str(tmp_path)!r}), [0, 1], lambda i, r: None, {{}})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = [int(p.stem) for p in tmp_path.glob("*.pid")]
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)  # ends only once no worker holds the pipes
    for pid in workers:
        assert not alive(pid)


def alive(pid: int) -> bool:
    """Running, not gone or a zombie (an exited orphan that this container's PID 1 may never reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Sleeps:
    def __init__(self, where: str) -> None:
        self.where = where

    def setup(self) -> None:
        pass

    def run(self, item: int) -> dict:
        Path(self.where, f"{os.getpid()}.pid").touch()
        time.sleep(300)
        return {}


def _spawned_children(parent: int) -> list[int]:
    """The worker processes ``parent`` has spawned so far (not multiprocessing's resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            found.append(int(entry.name))
    return found


def test_workers_exit_when_their_parent_is_killed_while_they_start(tmp_path):
    """Killed before its workers have started (a kill in the first second of a run): a worker that only
    then looks for its parent finds PID 1, and used to watch it forever, running its tasks beside the
    rerun. It must see that the parent it was started by is gone, and exit."""
    import signal
    import subprocess
    import sys

    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from lenscap.core.executors import LocalExecutor
from tests.test_executors import Sleeps
LocalExecutor(2).run(Sleeps({str(tmp_path)!r}), [0, 1], lambda i, r: None, {{}})
"""
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while not workers and time.monotonic() < deadline:
            workers = _spawned_children(proc.pid)
        assert workers, "the pool never started a worker"
        os.kill(proc.pid, signal.SIGKILL)  # as soon as a worker exists: before it has set itself up
        proc.wait(timeout=60)
        time.sleep(3)
        survivors = [pid for pid in workers if alive(pid)]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        assert not survivors, f"workers {survivors} outlived their killed parent by 3 s"
