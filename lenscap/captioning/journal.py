"""The per-shard journal: every finished caption, appended the moment it arrives.

A SIGKILL loses only the requests in flight; the rerun reads the journal and asks only for the rest.
Lines are flushed to the OS at once (a killed process loses nothing the kernel holds); a torn last
line from a kill mid-write is ignored, and that one caption is asked for again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["Journal"]


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = None

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
                    continue  # a line torn by a kill
        return entries

    def append(self, entry: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")
            # A torn line from a killed run must not glue itself onto the first new line.
            if self._file.tell() > 0:
                self._file.write(b"\n")
        self._file.write(json.dumps(entry, ensure_ascii=False).encode() + b"\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
