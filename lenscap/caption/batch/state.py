"""A batch job's state: one small SQLite file, ``OUT/.lenscap/batch/state.sqlite``.

Every step of the job is a transaction here, so a run killed at any point leaves a state the next run
reads as it was before or after that step, never between. A pass of the job queries only the files
in flight (``files_by_state``), so it costs the same at 80 shards or 80,000.

    meta    job id, the packing cursor (a shard), the file counter, the queue limit learned from the API
    shards  per source shard prepared: its requests, how many are cut into files, how many have their
            final answer, committed
    files   per batch file: round, state, sizes, token and cost estimates, file and batch ids, outcome
    spool   per retry file (requests of a merged batch that got no answer): lines packed from it so far
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["BatchState", "IN_QUEUE", "WAITING", "UNFINISHED"]

# What the API counts against the batch queue: batches it has been asked to create.
IN_QUEUE = ("creating", "submitted")
# Packed, or interrupted before its batch exists: submitted when the queue and the budget allow.
WAITING = ("packed", "uploading", "uploaded")
# Every state but the last (merged): what a pass still has to look after.
UNFINISHED = (*WAITING, *IN_QUEUE, "done")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards(shard INTEGER PRIMARY KEY, requests INTEGER NOT NULL, bytes INTEGER NOT NULL,
    tokens INTEGER NOT NULL, cut INTEGER NOT NULL DEFAULT 0, answered INTEGER NOT NULL DEFAULT 0,
    committed INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS files(name TEXT PRIMARY KEY, round INTEGER NOT NULL, state TEXT NOT NULL,
    requests INTEGER NOT NULL, bytes INTEGER NOT NULL, est_tokens INTEGER NOT NULL, est_cost REAL NOT NULL,
    file_id TEXT, batch_id TEXT, status TEXT, counts TEXT, errors TEXT, output_file_id TEXT, error_file_id TEXT,
    tries INTEGER NOT NULL DEFAULT 0, packed_at REAL, step_at REAL, submitted_at REAL, finished_at REAL,
    answered INTEGER, unanswered INTEGER, spent REAL);
CREATE INDEX IF NOT EXISTS files_by_state ON files(state);
CREATE TABLE IF NOT EXISTS spool(name TEXT PRIMARY KEY, round INTEGER NOT NULL, requests INTEGER NOT NULL,
    bytes INTEGER NOT NULL, consumed INTEGER NOT NULL DEFAULT 0);
"""
_JSON_COLUMNS = ("counts", "errors")


class BatchState:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a step recorded is a step done, even across a power cut
        self.db.executescript(_SCHEMA)
        self._depth = 0

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            self._depth = 0

    # -- meta -----------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def put(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # -- files ----------------------------------------------------------------------------------

    @staticmethod
    def _record(row: sqlite3.Row) -> dict[str, Any]:
        record = dict(row)
        for column in _JSON_COLUMNS:
            record[column] = json.loads(record[column]) if record[column] else None
        return record

    def files(self, *states: str) -> list[dict[str, Any]]:
        """Files in these states (all files with none), in packing order."""
        if not states:
            rows = self.db.execute("SELECT * FROM files ORDER BY name")
        else:
            marks = ",".join("?" * len(states))
            rows = self.db.execute(f"SELECT * FROM files WHERE state IN ({marks}) ORDER BY name", states)
        return [self._record(r) for r in rows]

    def file(self, name: str) -> dict[str, Any]:
        return self._record(self.db.execute("SELECT * FROM files WHERE name = ?", (name,)).fetchone())

    def save(self, record: dict[str, Any]) -> None:
        values = {k: json.dumps(v) if k in _JSON_COLUMNS and v is not None else v for k, v in record.items()}
        columns = ",".join(values)
        self.db.execute(f"INSERT OR REPLACE INTO files({columns}) VALUES ({','.join('?' * len(values))})", tuple(values.values()))

    def unfinished(self, before_round: int | None = None) -> bool:
        """Whether a file (of a round before ``before_round``) is not merged yet: found through the state index,
        not by scanning every file the job ever made."""
        marks = ",".join("?" * len(UNFINISHED))
        where = f"state IN ({marks})" + ("" if before_round is None else " AND round < ?")
        args = UNFINISHED if before_round is None else (*UNFINISHED, before_round)
        return self.db.execute(f"SELECT 1 FROM files WHERE {where} LIMIT 1", args).fetchone() is not None

    def queued_tokens(self) -> int:
        marks = ",".join("?" * len(IN_QUEUE))
        return int(
            self.db.execute(f"SELECT coalesce(sum(est_tokens), 0) FROM files WHERE state IN ({marks})", IN_QUEUE).fetchone()[0]
        )

    def by_state(self) -> dict[str, int]:
        return {
            r[0]: r[1]
            for r in self.db.execute("SELECT state, count(*) FROM files WHERE requests > 0 GROUP BY state ORDER BY state")
        }

    # -- shards ---------------------------------------------------------------------------------

    def shard(self, shard_id: int) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM shards WHERE shard = ?", (shard_id,)).fetchone()
        return dict(row) if row else None

    def add_shard(self, shard_id: int, requests: int, size: int, tokens: int) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO shards(shard, requests, bytes, tokens) VALUES (?, ?, ?, ?)", (shard_id, requests, size, tokens)
        )

    def prepared(self, shard_ids: list[int]) -> dict[int, dict[str, Any]]:
        """The rows of those of ``shard_ids`` packed already (in chunks: SQLite caps a statement's variables)."""
        out: dict[int, dict[str, Any]] = {}
        for i in range(0, len(shard_ids), 500):
            chunk = shard_ids[i : i + 500]
            for row in self.db.execute(f"SELECT * FROM shards WHERE shard IN ({','.join('?' * len(chunk))})", chunk):
                out[row["shard"]] = dict(row)
        return out

    def set_cut(self, shard_id: int, lines: int) -> None:
        self.db.execute("UPDATE shards SET cut = ? WHERE shard = ?", (lines, shard_id))

    def answered(self, counts: dict[int, int]) -> None:
        self.db.executemany("UPDATE shards SET answered = answered + ? WHERE shard = ?", [(n, s) for s, n in counts.items()])

    def finished_shards(self, shard_ids: list[int]) -> list[int]:
        """Those of ``shard_ids`` whose every request has its final answer and which are not committed yet."""
        rows = self.prepared(shard_ids)
        return sorted(s for s, r in rows.items() if r["answered"] >= r["requests"] and not r["committed"])

    def set_committed(self, shard_id: int) -> None:
        self.db.execute("UPDATE shards SET committed = 1 WHERE shard = ?", (shard_id,))

    # -- spool ----------------------------------------------------------------------------------

    def spools(self, round_no: int | None = None) -> list[dict[str, Any]]:
        """Retry files with lines left to pack, oldest first."""
        where = "consumed < requests" + ("" if round_no is None else " AND round = ?")
        args = () if round_no is None else (round_no,)
        return [dict(r) for r in self.db.execute(f"SELECT * FROM spool WHERE {where} ORDER BY round, name", args)]

    def add_spool(self, name: str, round_no: int, requests: int, size: int) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO spool(name, round, requests, bytes) VALUES (?, ?, ?, ?)", (name, round_no, requests, size)
        )

    def consume_spool(self, name: str, consumed: int) -> None:
        self.db.execute("UPDATE spool SET consumed = ? WHERE name = ?", (consumed, name))
