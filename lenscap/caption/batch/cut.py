"""Packing, part two: cutting prepared lines into batch files (a byte copy, on the driver).

A batch file takes lines in a fixed order until the next would break ``--max-requests-per-file`` or
``--max-file-mib``, so where files begin and end depends only on the lines, never on timing or on which
worker prepared them. Sources, in order of preference:

1. a retry spool (requests of merged batches that got no answer) holding a full file's worth;
2. fresh lines, in shard order from the packing cursor on (each shard's ``cut`` says how many of its
   lines are packed); a file is cut only when full or when every shard is prepared, so a shard not
   prepared yet is asked for (``NeedLines``) instead. A shard that completed in the input after the
   cursor passed it (``--allow-incomplete``, an input still being downloaded) is packed first;
3. once fresh lines are exhausted, what is left in the lowest round's spool, when nothing can add to
   it any more (no file of an earlier round in flight).

The file is written in full (lines and ids, fsynced, renamed), then one transaction records it and
moves the cursor or the spool's count: a run killed before the transaction cuts the same file again.
"""

from __future__ import annotations

import bisect
import os
import time
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

from lenscap.caption.backends.openai_batch import BatchOptions
from lenscap.caption.batch.ids import IdLine, prepared_paths
from lenscap.caption.batch.state import BatchState

__all__ = ["Cutter", "NeedLines", "spool_paths"]

_COPY_CHUNK = 8 * 1024 * 1024


@dataclass
class NeedLines:
    """The next file needs these shards prepared first (in packing order, from the first unprepared)."""

    first: int  # index into the open shards


@dataclass
class _Take:
    path: Path
    ids: list[IdLine]
    start: int  # line index in the source
    end: int
    offset: int  # byte offset of line ``start``


def spool_paths(root: Path, name: str) -> tuple[Path, Path]:
    return root / "retry" / f"{name}.jsonl", root / "retry" / f"{name}.ids"


class Cutter:
    def __init__(self, state: BatchState, root: Path, options: BatchOptions, shards: list[int]) -> None:
        self.state, self.root, self.options = state, root, options
        self.shards = shards
        self._ids: dict[Path, tuple[list[IdLine], list[int]]] = {}  # parsed ids and line offsets, per source

    # -- sources --------------------------------------------------------------------------------

    def _lines(self, ids_path: Path) -> tuple[list[IdLine], list[int]]:
        cached = self._ids.get(ids_path)
        if cached is None:
            if len(self._ids) > 8:
                self._ids.clear()
            ids = IdLine.read(ids_path)
            cached = self._ids[ids_path] = (ids, [0, *accumulate(i.size for i in ids)])
        return cached

    def cursor(self) -> int:
        """The shard the fresh lines go on from; past the last when they are exhausted."""
        value = self.state.get("cursor")
        return int(value) if value is not None else (self.shards[0] if self.shards else 0)

    @property
    def shards(self) -> list[int]:
        return self._shards

    @shards.setter
    def shards(self, shards: list[int]) -> None:
        """The open shards, ascending; those behind the cursor with lines not packed yet come first."""
        self._shards = shards
        behind = shards[: bisect.bisect_left(shards, self.cursor())]
        rows = self.state.prepared(behind)
        self._late = [s for s in behind if s not in rows or rows[s]["cut"] < rows[s]["requests"]]

    def fresh_left(self) -> bool:
        return bool(self._late) or bisect.bisect_left(self.shards, self.cursor()) < len(self.shards)

    def _fits(self, count: int, size: int, line: IdLine) -> bool:
        return count < self.options.max_requests_per_file and size + line.size <= self.options.max_file_bytes

    def _full(self, requests: int, size: int) -> bool:
        return requests >= self.options.max_requests_per_file or size > self.options.max_file_bytes

    def _fresh_order(self) -> list[int]:
        return [*self._late, *self.shards[bisect.bisect_left(self.shards, self.cursor()) :]]

    def _take_fresh(self) -> tuple[list[_Take], dict[int, int], int] | NeedLines | None:
        """The fresh lines of the next file: (takes, lines cut per shard after it, the cursor after it)."""
        takes: list[_Take] = []
        cut: dict[int, int] = {}
        count = size = 0
        for shard_id in self._fresh_order():
            row = self.state.shard(shard_id)
            if row is None:
                return NeedLines(self.shards.index(shard_id))
            start = row["cut"]
            if start >= row["requests"]:
                continue
            lines_path, ids_path, _ = prepared_paths(self.root, shard_id)
            ids, offsets = self._lines(ids_path)
            end = start
            while end < len(ids) and self._fits(count, size, ids[end]):
                count, size, end = count + 1, size + ids[end].size, end + 1
            if end > start:
                takes.append(_Take(lines_path, ids, start, end, offsets[start]))
                cut[shard_id] = end
            if end < len(ids):
                return takes, cut, max(self.cursor(), shard_id)
        if not takes:  # every line is cut: the cursor goes past the last shard, so fresh_left() says so
            if self.shards and self.cursor() <= self.shards[-1]:
                with self.state.transaction():
                    self.state.put("cursor", self.shards[-1] + 1)
            self._late = []
            return None
        return takes, cut, max(self.cursor(), self.shards[-1] + 1)

    def _take_spool(self, round_no: int) -> tuple[list[_Take], dict[str, int]]:
        takes: list[_Take] = []
        consumed: dict[str, int] = {}
        count = size = 0
        for row in self.state.spools(round_no):
            lines_path, ids_path = spool_paths(self.root, row["name"])
            ids, offsets = self._lines(ids_path)
            start = end = row["consumed"]
            while end < len(ids) and self._fits(count, size, ids[end]):
                count, size, end = count + 1, size + ids[end].size, end + 1
            if end > start:
                takes.append(_Take(lines_path, ids, start, end, offsets[start]))
                consumed[row["name"]] = end
            if end < len(ids):
                break
        return takes, consumed

    def _spool_rounds(self) -> dict[int, tuple[int, float]]:
        """Per round: requests left in its spool and their bytes (prorated)."""
        left: dict[int, tuple[int, float]] = {}
        for row in self.state.spools():
            n = row["requests"] - row["consumed"]
            requests, size = left.get(row["round"], (0, 0.0))
            left[row["round"]] = (requests + n, size + row["bytes"] * n / max(1, row["requests"]))
        return left

    # -- cutting --------------------------------------------------------------------------------

    def next_file(self) -> dict[str, Any] | NeedLines | None:
        """Cut the next batch file and record it as ``packed``; None when there is nothing to cut now."""
        spools = self._spool_rounds()
        for round_no in sorted(spools):
            if self._full(*spools[round_no]):
                takes, consumed = self._take_spool(round_no)
                return self._write(round_no, takes, consumed=consumed)
        fresh = self._take_fresh()
        if isinstance(fresh, NeedLines):
            return fresh
        if fresh is not None:
            takes, cut, cursor = fresh
            return self._write(0, takes, cut=cut, cursor=cursor)
        for round_no in sorted(spools):
            if self.state.unfinished(before_round=round_no):
                return None  # an earlier round still in flight may add to this spool: wait for it
            takes, consumed = self._take_spool(round_no)
            if takes:
                return self._write(round_no, takes, consumed=consumed)
        return None

    def _write(
        self,
        round_no: int,
        takes: list[_Take],
        *,
        cut: dict[int, int] | None = None,
        cursor: int | None = None,
        consumed: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        seq = int(self.state.get("seq", 0))
        name = f"r{round_no:02d}-{seq:06d}"
        inputs = self.root / "inputs"
        lines_path, ids_path = inputs / f"{name}.jsonl", inputs / f"{name}.ids"
        tmp_lines, tmp_ids = inputs / f".{name}.jsonl.tmp", inputs / f".{name}.ids.tmp"
        requests = size = tokens = 0
        cost = 0.0
        with open(tmp_lines, "wb") as out, open(tmp_ids, "wb") as ids_out:
            for take in takes:
                chosen = take.ids[take.start : take.end]
                length = sum(i.size for i in chosen)
                with open(take.path, "rb") as src:
                    src.seek(take.offset)
                    left = length
                    while left:
                        chunk = src.read(min(left, _COPY_CHUNK))
                        if not chunk:
                            raise OSError(f"{take.path} is shorter than its ids say")
                        out.write(chunk)
                        left -= len(chunk)
                ids_out.write(b"".join(i.encode() for i in chosen))
                requests += len(chosen)
                size += length
                tokens += sum(i.tokens for i in chosen)
                cost += sum(i.cost for i in chosen)
            for f in (out, ids_out):
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp_ids, ids_path)
        os.replace(tmp_lines, lines_path)
        record = {
            "name": name,
            "round": round_no,
            "state": "packed",
            "requests": requests,
            "bytes": size,
            "est_tokens": tokens,
            "est_cost": cost,
            "packed_at": time.time(),
        }
        with self.state.transaction():
            self.state.save(record)
            self.state.put("seq", seq + 1)
            if cursor is not None:
                self.state.put("cursor", cursor)
            for shard_id, lines in (cut or {}).items():
                self.state.set_cut(shard_id, lines)
            for spool, count in (consumed or {}).items():
                self.state.consume_spool(spool, count)
        if cut:
            self._late = [s for s in self._late if s not in cut or cut[s] < self.state.shard(s)["requests"]]  # type: ignore[index]
        self.forget_consumed()
        return self.state.file(name)

    def forget_consumed(self) -> None:
        """Delete prepared shards packed in full and spools packed in full (also after a crash)."""
        for path in (self.root / "prepared").glob("*"):
            stem = path.name.split(".")[0]
            row = self.state.shard(int(stem)) if stem.isdigit() else None
            if row is not None and row["cut"] >= row["requests"]:
                path.unlink(missing_ok=True)
                self._ids.pop(path, None)
        done = [row["name"] for row in self.state.db.execute("SELECT name FROM spool WHERE consumed >= requests")]
        for name in done:
            for path in spool_paths(self.root, name):
                path.unlink(missing_ok=True)
                self._ids.pop(path, None)
        if done:  # rows go after their files: a kill between leaves a row whose files are already gone
            self.state.db.executemany("DELETE FROM spool WHERE name = ?", [(n,) for n in done])
