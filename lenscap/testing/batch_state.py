"""A batch job's state grown to 800M-request size without sending anything (tests and bench/batch_poll.py).

``grow_state`` adds, to a real job's state file, the shards and merged batch files an 800M-sample job
has behind it mid-way: shards committed long ago and files merged long ago, under ids and names that
sort before the real ones, so the job's own files stay the ones in flight.
"""

from __future__ import annotations

import time
from pathlib import Path

from lenscap.caption.batch.state import BatchState

__all__ = ["grow_state"]


def grow_state(state_file: Path, shards: int = 80_000, files: int = 333_000, first_shard: int = 1_000_000) -> None:
    """Add ``shards`` committed shards (ids from ``first_shard``) and ``files`` merged batch files."""
    state = BatchState(state_file)
    now = time.time()
    try:
        with state.transaction():
            state.db.executemany(
                "INSERT INTO shards(shard, requests, bytes, tokens, answered, committed) VALUES (?, 10000, 874880000, 2630000, 10000, 1)",
                ((first_shard + i,) for i in range(shards)),
            )
            state.db.executemany(
                """INSERT INTO files(name, round, state, requests, bytes, est_tokens, est_cost, file_id, batch_id, status,
                   tries, packed_at, submitted_at, finished_at, answered, unanswered, spent)
                   VALUES (?, 0, 'merged', 2397, 209715200, 630411, 1.2, ?, ?, 'completed', 0, ?, ?, ?, 2397, 0, 0.9)""",
                ((f"old-{i:07d}", f"file-old{i}", f"batch_old{i}", now - 86400, now - 86400, now - 3600) for i in range(files)),
            )
    finally:
        state.close()
