"""The per-shard journal: every finished caption, appended the moment it arrives.

A SIGKILL loses only the requests in flight; the rerun reads the journal and asks only for the rest.
Lines are written to the OS at once (a killed process loses nothing the kernel holds); a torn last
line from a kill mid-write is ignored, and that one caption is asked for again.

A full disk must not lose an answer that was paid for: before a request is sent, room for its line
is allocated in the file (``reserve``, ``posix_fallocate``), so the disk fills at a reservation, before
the request, never at the write of its answer. The allocated tail is zeros until written; ``close``
cuts it off, and after a kill the next run writes from the last complete line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lenscap.core.errors import disk_full

__all__ = ["Journal", "ENTRY_ROOM"]

ENTRY_ROOM = 16 * 1024  # bytes held for one answer's line: a caption and its metadata are a few KB


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._end = 0  # where the next line goes: after the last complete one
        self._allocated = 0  # bytes of the file allocated
        self._pending = 0  # reservations not yet used by an answer

    def load(self) -> dict[str, dict[str, Any]]:
        entries: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return entries
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    entries[str(entry["key"])] = entry
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a kill, or room reserved and never written
        return entries

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            with open(self.path, "rb") as f:
                data = f.read()
            # After the last complete line: a torn line, or reserved zeros, from a killed run are written over.
            self._end = data.rstrip(b"\0").rfind(b"\n") + 1
            self._allocated = len(data)
        return self._fd

    def reserve(self) -> None:
        """Room for one more answer, allocated now; a full disk raises ``DiskFull`` here, before the
        request is sent."""
        fd = self._open()
        need = self._end + (self._pending + 1) * ENTRY_ROOM
        if need > self._allocated and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, self._allocated, need - self._allocated)
            except OSError as e:
                raise disk_full(e, self.path) or e from None
            self._allocated = need
        self._pending += 1

    def append(self, entry: dict[str, Any]) -> None:
        fd = self._open()
        line = json.dumps(entry, ensure_ascii=False).encode() + b"\n"
        try:
            os.pwrite(fd, line, self._end)
        except OSError as e:
            raise disk_full(e, self.path) or e from None
        self._end += len(line)
        self._allocated = max(self._allocated, self._end)
        self._pending = max(0, self._pending - 1)

    def release(self) -> None:
        """A reservation that no answer will use (the request was not sent after all)."""
        self._pending = max(0, self._pending - 1)

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, self._end)  # the room no answer used
            finally:
                os.close(self._fd)
                self._fd = None
                self._pending = 0

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
