"""Group records by a 64-bit hash out of core, in bounded memory: the audit's global pass.

Records (a numpy structured array with a uniform ``uint64`` field ``h``) are appended to 256 files by
the top byte of ``h``; every record with a given ``h`` is then in one file. Reading gives one file's
records at a time; a file larger than the budget is first split again by the next byte (and so on),
so memory holds at most about ``budget`` bytes of records however large the dataset. This is
external hash partitioning, done in numpy: its freed memory is reused by the next partition (and by
what comes after), where a second allocator (DuckDB's) would add its own peak to the scan's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

__all__ = ["Spill"]

_FANOUT_BITS = 8


class Spill:
    def __init__(self, root: Path, dtype: np.dtype, budget_bytes: int = 32 << 20) -> None:
        self.root = root
        self.dtype = np.dtype(dtype)
        self.budget = max(budget_bytes, self.dtype.itemsize)
        root.mkdir(parents=True, exist_ok=True)
        self._files: dict[int, IO[bytes]] = {}

    def append(self, records: np.ndarray) -> None:
        self._write(records, 0, self._files, self.root, "p")

    def _write(self, records: np.ndarray, level: int, files: dict[int, IO[bytes]], where: Path, prefix: str) -> None:
        if not len(records):
            return
        shift = np.uint64(64 - _FANOUT_BITS * (level + 1))
        part = ((records["h"] >> shift) & np.uint64(2**_FANOUT_BITS - 1)).astype(np.intp)
        order = np.argsort(part, kind="stable")
        part, records = part[order], records[order]
        bounds = np.searchsorted(part, np.arange(2**_FANOUT_BITS + 1))
        for p in np.flatnonzero(np.diff(bounds)):
            f = files.get(int(p))
            if f is None:
                f = files[int(p)] = open(where / f"{prefix}{int(p):03d}.bin", "ab")  # noqa: SIM115 - kept open
            f.write(records[bounds[p] : bounds[p + 1]].tobytes())

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def partitions(self) -> Iterator[np.ndarray]:
        """Each partition's records (every record of one ``h`` in one partition); files are removed as read."""
        self.close()
        for path in sorted(self.root.glob("p*.bin")):
            yield from self._read(path, 1)

    def _read(self, path: Path, level: int) -> Iterator[np.ndarray]:
        if path.stat().st_size <= self.budget or _FANOUT_BITS * (level + 1) > 64:
            records = np.fromfile(path, self.dtype)
            path.unlink()
            yield records
            return
        children: dict[int, IO[bytes]] = {}
        chunk = max(1, self.budget // self.dtype.itemsize)
        try:
            with open(path, "rb") as f:
                while True:
                    records = np.fromfile(f, self.dtype, count=chunk)
                    if not len(records):
                        break
                    self._write(records, level, children, path.parent, f"{path.stem}-")
        finally:
            for child in children.values():
                child.close()
        path.unlink()
        for p in sorted(children):
            yield from self._read(path.parent / f"{path.stem}-{p:03d}.bin", level + 1)
