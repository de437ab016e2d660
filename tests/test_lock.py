"""One writer per output: a live holder is refused with exit code 5; a dead one's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from conftest import run_cli

from lenscap.core.lock import DirLock, output_lock
from lenscap.demo.datasets import write_image_dataset

HOLD = """
import sys, time
from lenscap.core.lock import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_live_writer_blocks_a_second_and_a_killed_one_does_not(tmp_path):
    src = write_image_dataset(tmp_path / "in", 6, per_shard=3, size=(64, 48)).path
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run_cli("filter", str(src), str(out), "--quiet")
        assert r.returncode == 5, r.stderr
        assert f"{out} is being written by another lenscap process (pid {holder.pid}" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        r = run_cli("dedup", str(src), str(out), "--quiet")
        assert r.returncode == 5 and "being written by another lenscap process" in r.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without releasing: its lock is stale, and the next run takes it over
    assert (out / ".lenscap" / "lock").exists()
    r = run_cli("filter", str(src), str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert f"taking over the lock on {out} from pid {holder.pid}, which is gone" in r.stderr
    assert not (out / ".lenscap" / "lock").exists()  # released at the end


def test_a_reused_pid_does_not_hold_a_lock(tmp_path):
    lock_file = tmp_path / "out" / ".lenscap" / "lock"
    lock_file.parent.mkdir(parents=True)
    # a live pid (this one) but another start time: the pid was reused since the lock was written
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "1", "since": "then"}))
    with output_lock(tmp_path / "out"):
        assert json.loads(lock_file.read_text())["started"] != "1"
    assert not lock_file.exists()


def test_the_same_process_may_take_a_lock_it_holds(tmp_path):
    lock = DirLock(tmp_path / "lock", "x")
    with lock:
        with DirLock(tmp_path / "lock", "x"):
            assert (tmp_path / "lock").exists()
        assert (tmp_path / "lock").exists()
    assert not (tmp_path / "lock").exists()


def test_another_host_is_never_presumed_dead(tmp_path):
    lock_file = tmp_path / "lock"
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "1", "since": "then", "command": "lenscap run"}))
    start = time.monotonic()
    try:
        DirLock(lock_file, "the output").acquire()
        raise AssertionError("acquired a lock held on another host")
    except Exception as e:  # noqa: BLE001
        assert type(e).__name__ == "Locked" and "pid 1 on elsewhere" in str(e)
    assert time.monotonic() - start < 5


def test_two_processes_that_find_a_lock_stale_do_not_both_take_it(tmp_path, monkeypatch):
    """The race filelock's SoftFileLock closes: B finds the dead owner's lock stale; before B breaks
    it, A takes it over; B must then see A's live lock and stop (exit 5), not delete it."""
    from lenscap.core.errors import Locked

    path = tmp_path / ".lenscap" / "lock"
    path.parent.mkdir()
    dead = {"host": socket.gethostname(), "pid": 2**22 + 12345, "started": "1", "since": "x", "command": "lenscap filter"}
    path.write_text(json.dumps(dead))
    a_takes_it_over = {"host": socket.gethostname(), "pid": os.getpid(), "started": None, "since": "y", "command": "A"}
    b = DirLock(path, "out")
    real_stale = DirLock._stale

    def stale_then_racer(self, quiet=False):
        found = real_stale(self, quiet)
        if quiet and found and json.loads(path.read_text())["pid"] == dead["pid"]:
            path.write_text(json.dumps(a_takes_it_over))  # A, between B's look and B's break
        return found

    monkeypatch.setattr(DirLock, "_stale", stale_then_racer)
    try:
        b.acquire()
        raise AssertionError("B took a lock A holds")
    except Locked as e:
        assert "pid" in str(e)
    assert json.loads(path.read_text())["command"] == "A"  # A's lock is still there
    assert not path.with_name("lock.break").exists()


# -- a dead owner's workers -----------------------------------------------------------------------

REGISTERED = """
import sys, time
from lenscap.core.lock import register_process
register_process([sys.argv[1]])
print("registered", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _dead_owner(lock_file) -> int:
    """A lock file left by a process that is gone (killed: it could not release it)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    owner = {"host": socket.gethostname(), "pid": proc.pid, "started": "1", "since": "then", "command": "lenscap caption"}
    lock_file.write_text(json.dumps(owner))
    return proc.pid


def _registered_worker(lock_file, lives_s: float) -> subprocess.Popen:
    worker = subprocess.Popen(
        [sys.executable, "-c", REGISTERED, str(lock_file) + ".procs", str(lives_s)], stdout=subprocess.PIPE, text=True
    )
    assert worker.stdout.readline().strip() == "registered"
    return worker


def test_a_dead_owners_live_worker_keeps_its_lock(tmp_path, monkeypatch):
    """The owner was SIGKILLed but a worker it started still runs (paying for captions): a rerun must not
    run beside it. It waits a little for the worker to exit, then refuses (exit 5), naming it."""
    from lenscap.core import lock as lock_module
    from lenscap.core.errors import Locked

    monkeypatch.setattr(lock_module, "SURVIVOR_WAIT_S", 0.5)
    lock_file = tmp_path / "out" / ".lenscap" / "lock"
    owner = _dead_owner(lock_file)
    worker = _registered_worker(lock_file, 60)
    try:
        start = time.monotonic()
        try:
            output_lock(tmp_path / "out").acquire()
            raise AssertionError("took over a lock while the old run's worker was alive")
        except Locked as e:
            assert f"pid(s) {worker.pid}, worker(s) of the lenscap process {owner} that is gone" in str(e)
        assert time.monotonic() - start >= 0.5
        assert json.loads(lock_file.read_text())["pid"] == owner  # not taken over
    finally:
        worker.kill()
        worker.wait()
    with output_lock(tmp_path / "out"):  # the worker is gone now: the lock is stale, and its registry cleared
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert not lock_file.exists() and not (tmp_path / "out" / ".lenscap" / "lock.procs").exists()


def test_a_rerun_waits_for_a_dead_owners_worker_that_is_exiting(tmp_path):
    """A worker's watch of its parent ends it within a quarter of a second: the rerun waits, then goes on."""
    lock_file = tmp_path / "out" / ".lenscap" / "lock"
    _dead_owner(lock_file)
    worker = _registered_worker(lock_file, 0.3)
    registered = time.monotonic()
    with output_lock(tmp_path / "out"):
        # The lock reads an exited, not yet reaped worker (a zombie) as gone, and poll() may not have
        # reaped it yet at this instant: what shows the wait is that the lock came after its 0.3 s.
        assert time.monotonic() - registered >= 0.25, "took the lock while the worker was alive"
        assert worker.wait(timeout=10) is not None
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()


def test_local_workers_register_under_the_lock_their_parent_holds(tmp_path):
    from lenscap.core.executors import LocalExecutor
    from tests.test_executors import WherePid

    registry = tmp_path / "out" / ".lenscap" / "lock.procs"
    seen: dict[int, dict] = {}
    with output_lock(tmp_path / "out"):
        assert LocalExecutor(2).run(WherePid(), [0, 1, 2, 3], lambda i, r: seen.__setitem__(i, r), {}) is None
        workers = {r["pid"] for r in seen.values()}
        assert workers and os.getpid() not in workers
        assert workers <= {int(p.name) for p in registry.iterdir()}
    assert not registry.exists(), "the workers are gone once the pool ends: their registrations go at release"
