"""The errors lenscap raises on purpose.

    LenscapError                 base: anything lenscap reports as a one-line message
    └── UsageError               the user asked for something impossible (exit code 2):
        ├── InputError           missing, empty or unreadable input; unknown column
        └── DatasetError         a directory that is not (or not the right) dataset directory

The CLI turns a UsageError into ``error: <message>`` and exit code 2, without a traceback.
Per-sample problems (404s, corrupt images, ...) are never exceptions: they are statuses in the data.
A shard that fails for any reason is reported by the runner and left for the rerun (exit code 1).
"""

from __future__ import annotations

__all__ = ["LenscapError", "UsageError", "InputError", "DatasetError"]


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
