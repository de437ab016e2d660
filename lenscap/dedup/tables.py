"""Pass 2's near-duplicate search as executor tasks: one task per pigeonhole table.

The tables are independent: a pair is emitted only by the first table on which it agrees, which
the pair's XOR alone decides, so the tables can run anywhere, in any order, and their pairs add up
to exactly the set ``pigeonhole.near_pairs`` finds in one process.

Files, under ``work/search/`` (storage every worker reads, as for the shards themselves):

- ``plan.json``: what the files below were made from (the plan, the bucket cap, a checksum of the
  hashes). A different one empties the directory, so done tasks of another input never count.
- ``hashes-B.parquet``: the distinct hashes, sorted on the partition bits of block B (one copy per
  first block of the plan, as ``near_pairs`` keeps sorted tables), so a task reads only the row
  groups of the partition it is on. Without partitions, one unsorted ``hashes.parquet``.
- ``table-T.parquet`` (pairs ``a, b, d``) and ``table-T.capped.parquet`` (oversized buckets),
  written to a temporary name and renamed; then ``table-T.done``. A rerun, or Ray running a task
  again after its worker died, skips a done table; an unfinished one is written again whole, over
  whatever its killed attempt left, so no pair is ever counted twice.

Each task opens its own DuckDB connection with its share of ``--memory-limit`` and its own spill
directory under ``work/spill/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lenscap.core.commits import atomic_write_json
from lenscap.core.errors import LenscapError
from lenscap.core.executors import Executor, LocalExecutor, RayExecutor
from lenscap.core.job import Job
from lenscap.core.sql import literal, out_of_core
from lenscap.dedup.pigeonhole import PigeonholePlan, create_outputs, table_pairs

__all__ = ["TableJob", "split_near_pairs", "memory_share"]

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# Below this a DuckDB connection spends its time spilling; a smaller share is raised to it.
_MIN_TASK_MEMORY = 64 * 2**20


def memory_share(limit: str, tasks: int) -> str:
    """``limit`` (as ``DedupOptions`` checked it: ``2GB``, ``512MiB``) split between ``tasks``."""
    m = re.match(r"^(\d+(?:\.\d+)?)\s*([a-z]+)$", limit.strip().lower())
    assert m, limit
    total = float(m.group(1)) * _UNITS[m.group(2)]
    return f"{max(_MIN_TASK_MEMORY, int(total // max(1, tasks)))}B"


@dataclass(frozen=True)
class TableJob:
    """An executor job whose item is a table number of ``plan``; everything it needs is in files."""

    dir: str
    spill: str
    plan: PigeonholePlan
    bucket_cap: int
    restrict: str | None
    memory_limit: str
    threads: int

    def setup(self) -> None:
        pass

    def pairs(self, number: int) -> Path:
        return Path(self.dir) / f"table-{number}.parquet"

    def capped(self, number: int) -> Path:
        return Path(self.dir) / f"table-{number}.capped.parquet"

    def marker(self, number: int) -> Path:
        return Path(self.dir) / f"table-{number}.done"

    def hashes(self, block: int) -> Path:
        return Path(self.dir) / ("hashes.parquet" if self.plan.partition_bits == 0 else f"hashes-{block}.parquet")

    def run(self, number: int) -> dict[str, Any]:
        if self.marker(number).exists():  # done by an attempt whose worker died before reporting
            return json.loads(self.marker(number).read_text())
        spill = Path(self.spill) / f"table-{number}"
        con = out_of_core(self.memory_limit, spill, self.threads)
        try:
            create_outputs(con)
            rows = f"read_parquet({literal(self.hashes(self.plan.tables[number][0]))})"
            table_pairs(con, self.plan, number, rows, self.bucket_cap, self.restrict)
            # Unique temporary names: a killed attempt's leftovers never meet the retry's files.
            for name, path in (("near", self.pairs(number)), ("capped", self.capped(number))):
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                con.execute(f"COPY {name} TO {literal(tmp)} (FORMAT parquet)")
                os.replace(tmp, path)
            counts = {
                "pairs": con.execute("SELECT count(*) FROM near").fetchall()[0][0],
                "capped": con.execute("SELECT count(*) FROM capped").fetchall()[0][0],
            }
        finally:
            con.close()
            shutil.rmtree(spill, ignore_errors=True)
        atomic_write_json(self.marker(number), counts)
        return counts


def _tasks_at_once(executor: Executor) -> int:
    """How many tasks may share one machine's memory at a time."""
    if isinstance(executor, LocalExecutor):
        return executor.processes
    if isinstance(executor, RayExecutor):  # the biggest node's CPUs, in the executor's tasks
        nodes = [n["Resources"].get("CPU", 0) for n in executor.connect().nodes() if n.get("Alive")]
        return max(1, int(max(nodes, default=1) // max(executor.num_cpus, 1e-9)))
    return 1


def _task_threads(executor: Executor, threads: int | None, at_once: int) -> int:
    if isinstance(executor, RayExecutor):  # what Ray reserved for the task, not what this machine has
        return max(1, round(executor.num_cpus))
    return max(1, (threads or os.cpu_count() or 1) // at_once)


def _prepare(con: Any, source: str, job: TableJob) -> None:
    """Write the hashes for the tasks, unless ``plan.json`` says the directory already holds them."""
    cols = "uid, h" + (", has_new" if job.restrict else "")
    rows, checksum = con.execute(f"SELECT count(*), bit_xor(hash({cols})) FROM {source}").fetchall()[0]
    ident = json.loads(
        json.dumps(
            {"plan": asdict(job.plan), "bucket_cap": job.bucket_cap, "restrict": job.restrict, "rows": rows, "checksum": checksum}
        )
    )
    path = Path(job.dir) / "plan.json"
    if path.exists() and json.loads(path.read_text()) == ident:
        return
    shutil.rmtree(job.dir, ignore_errors=True)
    Path(job.dir).mkdir(parents=True)
    for block in sorted({t[0] for t in job.plan.tables}):
        target = job.hashes(block)
        if target.exists():  # without partitions every block shares one file
            continue
        query = (
            job.plan.sorted_sql(block, source, job.restrict is not None)
            if job.plan.partition_bits
            else f"SELECT {cols} FROM {source}"
        )
        tmp = target.with_name(f".{target.name}.tmp")
        con.execute(f"COPY ({query}) TO {literal(tmp)} (FORMAT parquet)")
        os.replace(tmp, target)
    atomic_write_json(path, ident)


def split_near_pairs(
    con: Any,
    source: str,
    plan: PigeonholePlan,
    bucket_cap: int,
    job: Job,
    work_dir: Path,
    memory_limit: str,
    threads: int | None = None,
    restrict: str | None = None,
    on_table: Callable[[int, int], None] | None = None,
) -> None:
    """``pigeonhole.near_pairs``, one task per table on ``job``'s executor: fills ``near`` and ``capped``
    in ``con`` the same. A task that failed raises here; a rerun does only the tables not yet done."""
    executor = job.executor
    at_once = min(_tasks_at_once(executor), len(plan.tables))
    tables = TableJob(
        str(work_dir / "search"),
        str(work_dir / "spill"),
        plan,
        bucket_cap,
        restrict,
        memory_share(memory_limit, at_once),
        _task_threads(executor, threads, at_once),
    )
    _prepare(con, source, tables)
    numbers = range(len(plan.tables))
    todo = [n for n in numbers if not tables.marker(n).exists()]
    done = len(plan.tables) - len(todo)

    def on_done(number: int, result: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        if on_table is not None:
            on_table(done, len(plan.tables))

    failed = job.map(tables, todo, on_done)
    if failed:
        number = min(failed)
        raise LenscapError(
            f"the near-duplicate search failed on {len(failed)} of {len(plan.tables)} tables "
            f"(table {number}: {failed[number]}); rerun to retry them"
        )
    create_outputs(con)
    pairs = ", ".join(literal(tables.pairs(n)) for n in numbers)
    capped = ", ".join(literal(tables.capped(n)) for n in numbers)
    con.execute(f"INSERT INTO near SELECT a, b, d FROM read_parquet([{pairs}])")
    con.execute(f"INSERT INTO capped SELECT tbl, k, n FROM read_parquet([{capped}])")
