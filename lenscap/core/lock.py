"""One writer per output directory: a lock file that a dead process cannot leave behind for good.

The lock file holds the owner's host, pid and process start time. Taking it is an exclusive create;
if it exists, the owner is checked: on this host, a pid that is gone, or that now belongs to a
process started at another time (a reused pid), marks the lock stale, and it is taken over (said
on stderr). A lock held by a live process, or by another host (a shared filesystem: its liveness
cannot be checked from here), is refused with ``Locked`` (exit code 5), naming the owner.

A dead owner's lock is not stale while a process it started lives on: a worker of a local process
pool registers itself (its pid and start time) in ``lock.procs/`` beside every lock its parent holds
(``held_registries``, handed to the pool; ``register_process``, in the worker's initializer before it
looks at its parent). A worker whose parent dies exits within a quarter of a second (see
``lenscap.core.executors``), so a rerun that finds the owner gone but a worker alive waits a few
seconds for it, then refuses with ``Locked``, naming it: a rerun never runs beside a survivor of
the old run. (Ray's workers are not this machine's children and are not registered.)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from lenscap.core.dataset import Dataset
from lenscap.core.errors import DatasetError, Locked
from lenscap.core.progress import log

__all__ = ["DirLock", "output_lock", "held_registries", "register_process", "REGISTRY_SUFFIX", "BREAK_SUFFIX"]

_HELD: dict[str, int] = {}  # lock files this process holds, with how many times
REGISTRY_SUFFIX = ".procs"  # beside the lock file: the processes its owner started (``lock.procs/PID``)
BREAK_SUFFIX = ".break"  # beside the lock file: held while a stale lock is removed
# How long a rerun waits for a dead owner's surviving workers to exit before refusing.
SURVIVOR_WAIT_S = 3.0


def _registry(lock_file: Path) -> Path:
    return lock_file.with_name(lock_file.name + REGISTRY_SUFFIX)


def held_registries() -> list[str]:
    """Where a process started now must register itself (``register_process``): the registry of every
    lock this process holds. A local executor hands this list to its workers."""
    return [str(_registry(Path(key))) for key in _HELD]


def register_process(registries: list[str]) -> None:
    """Record this process (pid and start time) as one the holder of these locks started, so that its
    lock is not taken over while it lives (``DirLock``). Called by a worker before it checks its parent."""
    pid = os.getpid()
    for registry in registries:
        try:
            os.makedirs(registry, exist_ok=True)
            tmp = os.path.join(registry, f".{pid}.tmp")
            Path(tmp).write_text(_start_time(pid) or "")
            os.replace(tmp, os.path.join(registry, str(pid)))
        except OSError:
            pass  # its output's directory is gone or read-only: the lock there protects nothing now


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    if _zombie(pid):  # exited, not yet reaped (an orphan's new parent may never reap it): gone
        return False
    now = _start_time(pid)
    return started is None or now is None or now == started


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _registered(registry: Path) -> list[tuple[Path, int, str | None]]:
    """The processes in a lock's registry: (its file, pid, start time or None)."""
    found = []
    for entry in registry.iterdir() if registry.is_dir() else []:
        if entry.name.isdigit():
            try:
                found.append((entry, int(entry.name), entry.read_text().strip() or None))
            except OSError:
                continue
    return found


class DirLock:
    """``with DirLock(path):`` holds ``path`` (the lock file) for this process."""

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.path = Path(path)
        self.what = what  # the output it protects, for messages

    def _owner(self) -> dict[str, object]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv[:4]),
        }

    def acquire(self) -> None:
        key = str(self.path.resolve())
        if key in _HELD:  # this process holds it already (a command whose passes each lock the output)
            _HELD[key] += 1
            return
        # Directories made only for the lock go again at release if nothing else was put in them,
        # so a command that fails its checks leaves no trace.
        self._made = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()][::-1]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatasetError(f"cannot write {self.what}: {e.strerror or e}") from None
        for _ in range(100):  # a stale lock is removed and the create retried; another process may race us
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if self._stale(quiet=True):
                    self._break_stale()
                elif self._owner_gone():
                    self._wait_for_survivors()  # returns once they are gone, or refuses
                else:
                    raise Locked(
                        f"{self.what} is being written by another lenscap process ({self._describe()}); "
                        "wait for it to finish, or stop it"
                    ) from None
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(self._owner()).encode())
            _HELD[key] = 1
            self._forget_gone()  # a dead run's workers, left registered
            return
        raise Locked(f"cannot take the lock on {self.what}: {self.path} keeps reappearing")

    def _read(self) -> dict[str, object] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _describe(self) -> str:
        owner = self._read() or {}
        return f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('since')}: {owner.get('command')}"

    def _break_stale(self) -> None:
        """Remove the stale lock, under a second lock (``lock.break``) and after checking it again there:
        two processes that both found it stale must not both go on, the second deleting the lock the
        first has just taken (as filelock's SoftFileLock re-checks before it deletes)."""
        breaker = self.path.with_name(self.path.name + BREAK_SUFFIX)
        try:
            fd = os.open(breaker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # another process is breaking it: look again after it
            try:
                if time.time() - breaker.stat().st_mtime > 10:  # its breaker died mid-break
                    breaker.unlink(missing_ok=True)
            except OSError:
                pass
            time.sleep(0.05)
            return
        try:
            os.close(fd)
            if self._stale():  # still the dead owner's, not one a racer took meanwhile
                self.path.unlink(missing_ok=True)
        finally:
            breaker.unlink(missing_ok=True)

    def _owner_gone(self) -> bool:
        """Whether the lock's owner is a process of this host that is gone (or whose pid was reused)."""
        owner = self._read()
        if owner is None or owner.get("host") != socket.gethostname():
            return False
        return not _alive(int(owner["pid"]), owner.get("started"))  # type: ignore[arg-type]

    def _survivors(self) -> list[int]:
        """The processes the lock's owners started (its workers) that are still alive."""
        return [pid for _, pid, started in _registered(_registry(self.path)) if _alive(pid, started)]

    def _forget_gone(self) -> None:
        """Remove the registrations of processes that are gone, and the registry if none is left."""
        registry = _registry(self.path)
        for entry, pid, started in _registered(registry):
            if not _alive(pid, started):
                entry.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            registry.rmdir()

    def _wait_for_survivors(self) -> None:
        """The owner is gone but a worker it started lives: a worker exits within a quarter of a second
        of its parent's death, so wait a little for it; one that stays is refused, by pid."""
        deadline = time.monotonic() + SURVIVOR_WAIT_S
        while (survivors := self._survivors()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if survivors:
            owner = self._read() or {}
            raise Locked(
                f"{self.what} is still being written by pid(s) {', '.join(map(str, survivors))}, worker(s) of "
                f"the lenscap process {owner.get('pid')} that is gone; wait for them to exit, or stop them"
            )

    def _stale(self, quiet: bool = False) -> bool:
        owner = self._read()
        if owner is None:  # unreadable or half-written: its writer died between create and write, or is writing now
            try:
                return time.time() - self.path.stat().st_mtime > 10
            except OSError:
                return True
        if not self._owner_gone() or self._survivors():
            return False
        if not quiet:
            log(f"taking over the lock on {self.what} from pid {owner.get('pid')}, which is gone")
        return True

    def release(self) -> None:
        key = str(self.path.resolve())
        if _HELD.get(key, 0) > 1:
            _HELD[key] -= 1
            return
        _HELD.pop(key, None)
        owner = self._read()
        if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self._forget_gone()
        for made in reversed(getattr(self, "_made", [])):
            try:
                made.rmdir()
            except OSError:
                break  # not empty: the command wrote something there

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def output_lock(out: str | os.PathLike[str] | Dataset) -> DirLock:
    """The lock of an output, whatever the command: ``.lenscap/lock`` in its work directory, which is
    always on this machine's disk (a remote dataset's too). A private directory of lenscap before 0.2
    (``_lenscap/``: journals of paid requests, job state) is renamed first, so nothing is asked again."""
    ds = out if isinstance(out, Dataset) else Dataset(out)
    return DirLock(ds.lock_file(), ds.location)
