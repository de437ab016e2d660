"""``lenscap dedup``: exact, perceptual and caption duplicates across the whole dataset.

Three passes, each resumable on its own (kill it anywhere and rerun the same command):

1. per shard, in parallel: signatures (``dedup.signatures``) of the input and of every ``--against``
   dataset, under ``OUT/.lenscap/dedup/``; complete shards are never hashed again;
2. global: ``dedup.search.find_duplicates`` in DuckDB; its decisions are written atomically with a
   marker naming what they were computed from, so a finished pass 2 is not redone;
3. per shard, in parallel: ``DedupStage`` writes the output shards from the decisions.

A remote output (``s3://...``) works the same way from its local mirror (``Dataset.path``): passes 1
and 2 write their state into the mirror's ``.lenscap/dedup/``; pass 2's report files are written into
the mirror's ``dedup/``, then uploaded into the remote ``OUT/dedup/`` (each local copy removed once
uploaded); pass 3's shards are uploaded as they are committed (``runner.ShardJob``).

Every input row stays in the output parquet with ``dedup_status``: ``unique``, ``kept`` (the keeper
of a cluster), ``duplicate``, ``skipped`` (no image to compare: a failed download or a sample an
earlier stage dropped), or ``error`` (the image could not be decoded for a perceptual hash; it was
still compared by its bytes and caption, and is kept). A duplicate loses its image unless
``--mark-only`` (its offsets become null, so the export leaves it out); ``dup_of`` names its cluster's keeper (``dup_in`` the earlier release holding it),
``dup_reason`` / ``dup_distance`` the closest match that put it in the cluster.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa

from lenscap.core.commits import atomic_write_json
from lenscap.core.dataset import Dataset, read_parquet
from lenscap.core.errors import UsageError
from lenscap.core.executors import Executor, LocalExecutor
from lenscap.core.job import OwnedJob, owned_job, run_job, run_stage
from lenscap.core.progress import make_progress
from lenscap.core.result import JobResult
from lenscap.core.stage import Stage
from lenscap.core.storage import redact_url
from lenscap.core.uploads import put_and_remove
from lenscap.dedup.search import DedupOptions, Source, find_duplicates
from lenscap.dedup.signatures import SignatureStage

__all__ = ["DedupStage", "DedupResult", "run_dedup"]

UNIQUE, KEPT, DUPLICATE, SKIPPED, ERROR = "unique", "kept", "duplicate", "skipped", "error"
_DUP_COLUMNS = (
    pa.field("dup_of", pa.string()),
    pa.field("dup_in", pa.string()),
    pa.field("dup_reason", pa.string()),
    pa.field("dup_distance", pa.int32()),
    pa.field("dup_cluster", pa.int64()),
)


def work_dir(out: Dataset) -> Path:
    return out.work_dir / "dedup"


def report_dir(out: Dataset) -> Path:
    return out.path / "dedup"


# Uploaded in this order: report.json, which inspect reads, describes the clusters already there.
REPORT_FILES = ("clusters.parquet", "report.json")


@dataclass
class DedupStage(Stage):
    """Pass 3: one output shard from the input shard and the decisions of pass 2."""

    name = "dedup"
    options: DedupOptions = field(default_factory=DedupOptions)
    against: list[str] = field(default_factory=list)

    def parameters(self) -> dict[str, Any]:
        return self.options.identity() | {"against": [redact_url(a) for a in self.against]}

    def columns(self, input_schema: pa.Schema) -> list[pa.Field]:
        return list(_DUP_COLUMNS)

    def _decisions(self, dst: Dataset, shard_id: int) -> dict[str, dict[str, Any]]:
        import duckdb

        path = work_dir(dst) / "decisions.parquet"
        con = duckdb.connect()
        try:  # the file is sorted by shard, so DuckDB reads only this shard's row groups
            rel = con.execute("SELECT * EXCLUDE (shard) FROM read_parquet(?) WHERE shard = ?", [str(path), shard_id])
            names = [d[0] for d in rel.description]
            return {row[0]: dict(zip(names, row)) for row in rel.fetchall()}
        finally:
            con.close()

    def _hash_errors(self, dst: Dataset, shard_id: int) -> dict[str, str]:
        path = Dataset(work_dir(dst) / "signatures").parquet_path(shard_id)
        table = read_parquet(path, columns=["key", "error"])
        return {k: e for k, e in zip(table.column("key").to_pylist(), table.column("error").to_pylist()) if e}

    def run_shard(self, src: Dataset, dst: Dataset, shard_id: int) -> dict[str, Any]:
        decisions = self._decisions(dst, shard_id)
        errors = self._hash_errors(dst, shard_id)
        writer = self.writer(src, dst, shard_id)
        duplicates = 0
        try:
            for sample in src.iter_samples(shard_id):
                row = sample.row
                row.update({"dedup_status": None, "dedup_error": None, **{f.name: None for f in _DUP_COLUMNS}})
                decision = decisions.get(sample.key)
                if not sample.has_image:
                    row["dedup_status"] = SKIPPED
                elif decision is not None:
                    row.update(
                        dedup_status=decision["status"],
                        dup_of=decision["dup_of"],
                        dup_in=decision["dup_in"],
                        dup_reason=decision["dup_reason"],
                        dup_distance=decision["dup_distance"],
                        dup_cluster=decision["dup_cluster"],
                    )
                    if decision["status"] == DUPLICATE:
                        duplicates += 1
                        if not self.options.mark_only:
                            sample.image = None
                else:
                    row["dedup_status"] = ERROR if sample.key in errors else UNIQUE
                row["dedup_error"] = errors.get(sample.key)  # a keeper or duplicate may have no pHash too
                writer.write(sample)
                self.tick()
        except BaseException:
            writer.abort()
            raise
        return writer.commit({"stage": self.name, "duplicates": duplicates})


@dataclass
class DedupResult(JobResult):
    """Dedup's result: its report, and the shards of each input that could not be hashed (then nothing
    is written yet)."""

    report: dict[str, Any] = field(default_factory=dict)
    hashing_failed: dict[str, dict[int, str]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 1 if self.hashing_failed else super().exit_code


def _against_dir(dst: Dataset, resolved: str) -> Path:
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:12]
    return work_dir(dst) / "against" / f"{PurePosixPath(resolved).name}-{digest}"


def _fingerprint(sources: list[Source]) -> list[dict[str, Any]]:
    out = []
    for s in sources:
        ids = s.signatures.completed_ids()
        out.append({"source": s.index, "shards": len(ids), "rows": sum(s.signatures.read_stats(i)["count"] for i in ids)})
    return out


def run_dedup(
    stage: DedupStage,
    in_dir: str | Path,
    out_dir: str | Path,
    processes: int = 1,
    quiet: bool = False,
    executor: Executor | None = None,
    *,
    overwrite: bool = False,
    allow_incomplete: bool = False,
) -> DedupResult:
    # Any of them may be remote; the search runs on local files (a remote output's mirror).
    src = Dataset.open(in_dir)
    inputs = [Dataset.open(p) for p in stage.against]
    out_resolved = Dataset(out_dir).resolved
    for label, ds in zip(stage.against, inputs):
        if ds.resolved in (src.resolved, out_resolved):
            raise UsageError(
                f"--against {redact_url(label)} is the {'input' if ds.resolved == src.resolved else 'output'} itself"
            )
    with owned_job(stage, src, out_dir, overwrite=overwrite, allow_incomplete=allow_incomplete) as job:
        return _run_locked(job, inputs, redact_url(str(in_dir)), executor or LocalExecutor(processes), quiet)


def _run_locked(job: OwnedJob, inputs: list[Dataset], in_label: str, executor: Executor, quiet: bool) -> DedupResult:
    stage, src, dst = job.stage, job.src, job.dst
    assert isinstance(stage, DedupStage)
    # A remote output holding no manifest disowns its mirror at every recover (pass 3's included), which
    # would lose the signatures and decisions below: the manifest, written now, claims them.
    job.write_manifest()

    # Pass 1: signatures.
    failed: dict[str, dict[int, str]] = {}
    sources = []
    targets = [(src, work_dir(dst) / "signatures")] + [(d, _against_dir(dst, d.resolved)) for d in inputs]
    for index, (dataset, target) in enumerate(targets):
        label = in_label if index == 0 else redact_url(stage.against[index - 1])
        result = run_stage(
            SignatureStage(),
            dataset,
            target,
            progress=make_progress(f"dedup: hashing {label}", quiet),
            executor=executor,
            internal=True,
        )
        if result.failed_shards:
            failed[label] = result.failed_shards
        sources.append(Source(index, label, Dataset(target)))
    if failed:
        return DedupResult(dst.location, hashing_failed=failed)

    # Pass 2: decisions, unless already made from these same signatures.
    marker = work_dir(dst) / "decisions.json"
    fingerprint = {"options": stage.options.identity(), "sources": _fingerprint(sources)}
    done = json.loads(marker.read_text()) if marker.exists() else None
    if done is not None and done["fingerprint"] != fingerprint:
        if dst.completed_ids():
            raise UsageError(f"the input of {dst.location} changed since it was deduplicated; use a new output directory")
        done = None
    if done is None:
        p = make_progress("dedup: searching", quiet, unit="steps")  # its status numbers the steps
        p.start(1)
        try:
            report = find_duplicates(sources, stage.options, work_dir(dst), report_dir(dst), status=p.status, executor=executor)
            p.advance(shards=1)
        finally:
            p.finish()
        atomic_write_json(marker, {"fingerprint": fingerprint, "report": report})
    else:
        report = done["report"]
    # The report files pass 2 left in a remote output's mirror: just written, or not uploaded before a kill.
    put_and_remove(dst, dst.path, [f"dedup/{name}" for name in REPORT_FILES])

    # Pass 3: the output shards.
    result = run_job(job, executor, make_progress("dedup: writing", quiet))
    return DedupResult(**asdict(result), report=report)
