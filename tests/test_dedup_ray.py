"""dedup's global search split into executor tasks, one per pigeonhole table: on a local 2-CPU Ray
cluster the output equals the local executor's; the split is real; a worker SIGKILLed after writing
its pairs is retried without a pair counted twice; a failed table is all a rerun does."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from test_dedup import make_planted, rows
from test_dedup_parts import brute_force, planted_hashes

from lenscap.core.errors import LenscapError
from lenscap.core.executors import LocalExecutor, RayExecutor
from lenscap.core.job import Job
from lenscap.dedup.command import run_dedup
from lenscap.dedup.options import DedupOptions
from lenscap.dedup.pigeonhole import PigeonholePlan, near_pairs
from lenscap.dedup.tables import TableJob, split_near_pairs

ray = pytest.importorskip("ray")
# Ray workers cannot import this test module: the job wrappers below travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def ray_here(ray_cluster):
    return ray_cluster  # the session's cluster (conftest)


class KillOnce:
    """Table ``victim``'s first attempt writes its pairs, loses its marker, leaves a stray temporary
    file, and SIGKILLs its own worker: the worst moment, pairs on disk but not marked done."""

    def __init__(self, job: TableJob, victim: int, flag: str) -> None:
        self.job, self.victim, self.flag = job, victim, flag

    def setup(self) -> None:
        self.job.setup()

    def run(self, number: int) -> dict[str, Any]:
        if number != self.victim or os.path.exists(self.flag):
            return self.job.run(number)
        Path(self.flag).write_text(str(os.getpid()))
        self.job.run(number)
        self.job.marker(number).unlink()
        self.job.pairs(number).with_name(".stray.tmp").write_bytes(b"half a parquet file")
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


class Watching(RayExecutor):
    """Ray, noting for each pass-2 run the tables it ran and the search directory when they were done."""

    def __init__(self, kill_flag: Path | None = None) -> None:
        super().__init__()
        self.kill_flag = kill_flag
        self.tables: list[int] = []
        self.files: dict[str, bytes] = {}

    def run(self, job, items, on_done, failed, **kwargs):
        if not isinstance(job, TableJob):
            return super().run(job, items, on_done, failed, **kwargs)
        self.tables = list(items)
        if self.kill_flag is not None:
            job = KillOnce(job, items[0], str(self.kill_flag))  # table 0 finds the most pairs
            inner = job.job
        else:
            inner = job
        fatal = super().run(job, items, on_done, failed, **kwargs)
        self.files = {p.name: p.read_bytes() for p in Path(inner.dir).iterdir() if p.is_file()}
        pair_files = [str(inner.pairs(n)) for n in items]
        self.pairs = duckdb.execute("SELECT a, b, d FROM read_parquet(?)", [pair_files]).fetchall()
        return fatal


def outputs(out: Path) -> dict[str, Any]:
    """Everything dedup decided: the shards' bytes, the decisions, clusters and report (less its timing)."""
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".tar", ".parquet")}
    report = json.loads((out / "dedup" / "report.json").read_text())
    report.pop("seconds")
    decisions = duckdb.sql(f"SELECT * FROM '{out / '.lenscap' / 'dedup' / 'decisions.parquet'}'").fetchall()
    clusters = duckdb.sql(f"SELECT * FROM '{out / 'dedup' / 'clusters.parquet'}'").fetchall()
    return {"files": files, "report": report, "decisions": decisions, "clusters": clusters}


@pytest.fixture(scope="module")
def planted_runs(tmp_path_factory, ray_here):
    base = tmp_path_factory.mktemp("dedup-ray")
    src = make_planted(base / "in")
    options = DedupOptions(max_distance=4, processes=1)
    local = run_dedup(src, base / "local", options, quiet=True, executor=LocalExecutor(2))
    assert local.exit_code == 0
    return base, src, options, outputs(base / "local"), outputs(base / "local")["report"]


def test_ray_writes_what_the_local_executor_writes(planted_runs):
    base, src, options, expected, local_report = planted_runs
    executor = Watching()
    result = run_dedup(src, base / "ray", options, quiet=True, executor=executor)
    assert result.exit_code == 0
    got = outputs(base / "ray")
    assert got["files"].keys() == expected["files"].keys() and not any(n.endswith(".tar") for n in got["files"])
    assert got == expected
    assert rows(base / "ray") == rows(base / "local")
    assert got["report"]["duplicates"] == result.duplicates == local_report["duplicates"] > 0
    # the split is real: one task, one pair file and one marker per table of the plan
    tables = got["report"]["plan"]["tables"]
    assert tables >= 5 and executor.tables == list(range(tables))
    for n in range(tables):
        assert {f"table-{n}.parquet", f"table-{n}.capped.parquet", f"table-{n}.done"} <= executor.files.keys()
    assert sum(json.loads(executor.files[f"table-{n}.done"])["pairs"] for n in range(tables)) == len(executor.pairs) > 0
    assert not (base / "ray" / ".lenscap" / "dedup" / "search").exists()  # removed once the decisions are made


def test_a_worker_killed_after_writing_its_pairs_is_retried_without_duplicates(planted_runs, tmp_path):
    base, src, options, expected, _ = planted_runs
    flag = tmp_path / "killed"
    executor = Watching(kill_flag=flag)
    result = run_dedup(src, tmp_path / "out", options, quiet=True, executor=executor)
    assert result.exit_code == 0
    assert flag.exists() and int(flag.read_text()) != os.getpid()  # a Ray worker died, and Ray ran its table again
    assert json.loads(executor.files["table-0.done"])["pairs"] > 0
    assert len(executor.pairs) == len(set(executor.pairs)) > 0  # no pair twice, though the dead attempt wrote its file
    assert outputs(tmp_path / "out") == expected


def test_rerun_after_a_failed_table_runs_only_that_table(tmp_path):
    """On the split's own, with the local executor (no Ray needed): same pairs as one process."""
    h = planted_hashes(600, 3, seed=3)
    plan = PigeonholePlan.with_blocks(len(h), 3, 6)  # 20 tables
    con = duckdb.connect()
    con.register("t", pa.table({"uid": np.arange(len(h), dtype=np.int64), "h": h}))

    class Failing(LocalExecutor):
        ran: list[int] = []

        def run(self, job, items, on_done, failed, **kwargs):
            Failing.ran = list(items)
            failed[7] = "OSError: disk full"
            return super().run(job, [i for i in items if i != 7], on_done, failed, **kwargs)

    with pytest.raises(LenscapError, match=r"failed on 1 of 20 tables \(table 7: OSError: disk full\)"):
        split_near_pairs(con, "t", plan, 10**6, Job("dedup", Failing()), tmp_path, "256MB")
    ran: list[int] = []

    class Recording(LocalExecutor):
        def run(self, job, items, on_done, failed, **kwargs):
            ran.extend(items)
            return super().run(job, items, on_done, failed, **kwargs)

    split_near_pairs(con, "t", plan, 10**6, Job("dedup", Recording()), tmp_path, "256MB")
    assert Failing.ran == list(range(20)) and ran == [7]
    split = con.execute("SELECT a, b, d FROM near ORDER BY a, b").fetchall()
    near_pairs(con, "t", plan, 10**6)
    assert split == con.execute("SELECT a, b, d FROM near ORDER BY a, b").fetchall()
    assert {(a, b) for a, b, _ in split} == brute_force(h, 3)


def test_split_keeps_the_against_restriction(tmp_path):
    """With --against, only pairs touching a new hash count; the split tasks apply it the same."""
    h = planted_hashes(600, 4, seed=4)
    plan = PigeonholePlan.for_size(len(h), 4)
    con = duckdb.connect()
    has_new = np.random.default_rng(1).random(len(h)) < 0.3
    con.register("t", pa.table({"uid": np.arange(len(h), dtype=np.int64), "h": h, "has_new": has_new}))
    restrict = "a.has_new OR b.has_new"
    split_near_pairs(con, "t", plan, 10**6, Job("dedup", LocalExecutor(1)), tmp_path, "256MB", restrict=restrict)
    split = con.execute("SELECT a, b, d FROM near ORDER BY a, b").fetchall()
    near_pairs(con, "t", plan, 10**6, restrict)
    assert split == con.execute("SELECT a, b, d FROM near ORDER BY a, b").fetchall()
    assert 0 < len(split) < len(brute_force(h, 4)) and all(has_new[a] or has_new[b] for a, b, _ in split)


def test_the_semantic_buckets_as_ray_tasks_decide_what_local_processes_decide(tmp_path, ray_here):
    pytest.importorskip("faiss")
    from test_dedup_semantic import MODEL, plant, vectors

    from lenscap.dedup.semantic_pairs import ClusterJob

    src = plant(tmp_path / "in", vectors())
    options = DedupOptions(semantic=True, embed_model=MODEL, semantic_threshold=0.9, clusters=2, processes=2)
    assert run_dedup(src, tmp_path / "local", options, quiet=True, executor=LocalExecutor(2)).exit_code == 0

    class Recording(RayExecutor):
        buckets: list[int] = []

        def run(self, job, items, on_done, failed, **kwargs):
            if isinstance(job, ClusterJob):
                Recording.buckets = list(items)
            return super().run(job, items, on_done, failed, **kwargs)

    result = run_dedup(src, tmp_path / "ray", options, quiet=True, executor=Recording())
    assert result.exit_code == 0 and Recording.buckets == [0, 1]
    assert rows(tmp_path / "ray") == rows(tmp_path / "local")
    assert sum(r["dedup_status"] == "duplicate" for r in rows(tmp_path / "ray").values()) == 4
