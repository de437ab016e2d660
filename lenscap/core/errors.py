"""The errors lenscap raises on purpose.

    LenscapError                 base: anything lenscap reports as a one-line message
    ├── UsageError               the user asked for something impossible (exit code 2):
    │   ├── InputError           missing, empty or unreadable input; unknown column
    │   ├── DatasetError         a directory that is not (or not the right) dataset directory
    │   ├── BackendError         no key, rejected key, unknown model, unreachable server
    │   └── MissingDependency    an optional extra is not installed
    ├── Outage                   the caption server stopped answering for --outage-timeout (exit code 1)
    ├── DiskFull                 a local write found no space (or an I/O error): the run stops (exit code 1)
    ├── BudgetReached            --max-cost reached (exit code 4); rerun with a higher cap to go on
    └── Locked                   another live lenscap process is writing the same output (exit code 5)

The CLI turns a UsageError into ``error: <message>`` and exit code 2, without a traceback.
Per-sample problems (404s, corrupt images, ...) are never exceptions: they are statuses in the data.
A shard that fails for any reason is reported by the job driver and left for the rerun (exit code 1).
"""

from __future__ import annotations

import errno
import os
import shutil

__all__ = [
    "LenscapError",
    "UsageError",
    "InputError",
    "DatasetError",
    "BackendError",
    "MissingDependency",
    "BudgetReached",
    "Locked",
    "Outage",
    "DiskFull",
    "disk_full",
]


class LenscapError(Exception):
    """Base class of the errors lenscap reports as a one-line message."""

    exit_code = 1


class UsageError(LenscapError):
    """The command cannot run as asked: a bad flag, a missing file, a wrong directory."""

    exit_code = 2


class InputError(UsageError):
    """The URL list cannot be read: missing, empty, unreadable, or without the named column."""


class DatasetError(UsageError):
    """A path that should be a dataset directory is not one, or holds a different job."""


class BackendError(UsageError):
    """The caption backend refuses the job as configured: no key, a rejected key, an unknown model,
    an unreachable server. Reported once, before or instead of marking every sample failed."""


class MissingDependency(UsageError):
    """An optional feature whose extra is not installed."""


class Outage(LenscapError):
    """Every caption endpoint failed every request for ``--outage-timeout``: the run stops, and the
    samples they did not answer are left unanswered (not recorded as errors) for the rerun."""

    exit_code = 1


class DiskFull(LenscapError):
    """A write of lenscap's own (a journal, a shard, the cache) found the disk full, over quota, or
    failing: the run stops before asking for more, keeping what it has; free space and rerun."""

    exit_code = 1


def disk_full(e: OSError, path: object = None, within: object = None) -> DiskFull | None:
    """The ``DiskFull`` an ``OSError`` of a local write means, or None if it means something else.
    ``path``: the file being written, when the error does not name it; ``within``: the directory it was
    in, when not even that is known (img2dataset's writes). The free space is that of the filesystem
    the file is on, never of another (the current directory's)."""
    if e.errno not in {getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EIO") if hasattr(errno, name)}:
        return None
    target = path or e.filename
    where = str(target) if target else f"a file in {within}" if within else "a file"
    probe = target or within
    try:
        free = f"{shutil.disk_usage(_nearest_directory(probe)).free:,} bytes free there" if probe else "free space unknown"
    except OSError:
        free = "free space unknown"
    return DiskFull(
        f"cannot write {where}: {e.strerror or e} ({free}); the run stopped before asking for more, and "
        "kept what it had: free some space and rerun the same command"
    )


def _nearest_directory(path: object) -> str:
    """``path`` if it is a directory, else the nearest directory above it that exists."""
    current = os.path.abspath(os.fspath(path))  # type: ignore[call-overload]
    while not os.path.isdir(current) and os.path.dirname(current) != current:
        current = os.path.dirname(current)
    return current


class BudgetReached(LenscapError):
    """``--max-cost`` was reached: finished shards are kept, unfinished ones resume on a rerun."""

    exit_code = 4
    spent_usd: float | None = None  # set by lenscap.api.caption: what the output directory spent


class Locked(LenscapError):
    """Another lenscap process that is still alive holds the output's lock (two cron firings)."""

    exit_code = 5
