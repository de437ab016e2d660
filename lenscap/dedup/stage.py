"""``lenscap dedup``: exact, perceptual and caption duplicates across the whole dataset.

Three passes, each resumable on its own (kill it anywhere and rerun the same command):

1. per shard, in parallel: signatures (``dedup.signatures``) of the input and of every ``--against``
   dataset, under ``OUT/.lenscap/dedup/``; complete shards are never hashed again;
2. global: ``dedup.search.find_duplicates`` in DuckDB; its decisions are written atomically with a
   marker naming what they were computed from, so a finished pass 2 is not redone;
3. per shard, in parallel: ``DedupStage`` writes the output shards from the decisions.

Passes 1 and 2 keep their state in the output's work directory (``.lenscap/dedup/``, on this
machine's disk for a remote output too); pass 2's report files are written there, then put in the
output's ``dedup/`` (``Dataset.put``); pass 3's shards are committed like any stage's.

Every input row stays in the output parquet with ``dedup_status``: ``unique``, ``kept`` (the keeper
of a cluster), ``duplicate``, ``skipped`` (no image to compare: a failed download or a sample an
earlier stage dropped), or ``error`` (the image could not be decoded for a perceptual hash; it was
still compared by its bytes and caption, and is kept). A duplicate loses its image unless
``--mark-only`` (its offsets become null, so the export leaves it out); ``dup_of`` names its cluster's keeper (``dup_in`` the earlier release holding it),
``dup_tier`` which tier merged it (``exact``, ``near``, ``caption`` or ``semantic``), ``dup_reason`` /
``dup_distance`` (pHash bits) / ``dup_cosine`` (semantic) the closest match that put it in the
cluster. With ``--semantic`` each output shard is committed with its embeddings
(``embeddings/NNNNN.parquet``, pass 1's sidecar of that shard), named in the manifest.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from lenscap.core.dataset import Dataset, read_parquet
from lenscap.core.stage import Stage
from lenscap.core.storage import redact_url
from lenscap.dedup.options import DedupOptions
from lenscap.embed.store import EMBEDDINGS_DIR, embeddings_name

__all__ = ["DedupStage", "work_dir", "report_dir", "REPORT_FILES"]

UNIQUE, KEPT, DUPLICATE, SKIPPED, ERROR = "unique", "kept", "duplicate", "skipped", "error"
_DUP_COLUMNS = (
    pa.field("dup_of", pa.string()),
    pa.field("dup_in", pa.string()),
    pa.field("dup_reason", pa.string()),
    pa.field("dup_tier", pa.string()),  # exact, near, caption or semantic: the tier that joined it
    pa.field("dup_distance", pa.int32()),
    pa.field("dup_cosine", pa.float32()),  # semantic: the cosine similarity of its closest match
    pa.field("dup_cluster", pa.int64()),
)


def work_dir(out: Dataset) -> Path:
    return out.work_dir / "dedup"


def report_dir(out: Dataset) -> Path:
    """Where pass 2 writes the report files before they are put in the output's ``dedup/``."""
    return out.work_dir / "dedup" / "report"


# Put in this order: report.json, which inspect reads, describes the clusters already there.
REPORT_FILES = ("clusters.parquet", "report.json")


@dataclass
class DedupStage(Stage):
    """Pass 3: one output shard from the input shard and the decisions of pass 2."""

    name = "dedup"
    options: DedupOptions = field(default_factory=DedupOptions)
    embedding_dim: int | None = None  # --semantic: known once pass 1 has embedded

    def __post_init__(self) -> None:
        self.copy_images = self.options.copy_images

    @property
    def against(self) -> list[str]:
        return list(self.options.against or [])

    def parameters(self) -> dict[str, Any]:
        return self.options.identity() | {"against": [redact_url(a) for a in self.against]}

    def manifest_entries(self) -> dict[str, Any]:
        if not self.options.semantic or self.embedding_dim is None:
            return {}
        return {"embeddings": {"model": self.options.model, "dim": self.embedding_dim, "dtype": "float16", "dir": EMBEDDINGS_DIR}}

    def _sidecars(self, dst: Dataset, shard_id: int) -> dict[str, Path]:
        """Pass 1's embeddings of the shard, staged (a copy: pass 1's stay for a rewrite of the shard)."""
        kept = work_dir(dst) / "signatures" / embeddings_name(shard_id)
        if not self.options.semantic or not kept.exists():
            return {}
        staged = dst.staging_file(embeddings_name(shard_id))
        shutil.copyfile(kept, staged)
        return {embeddings_name(shard_id): staged}

    def columns(self, input_schema: pa.Schema) -> list[pa.Field]:
        return list(_DUP_COLUMNS)

    def _decisions(self, dst: Dataset, shard_id: int) -> dict[str, dict[str, Any]]:
        import duckdb  # DuckDB takes a quarter second to import: only where a query runs

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
                        dup_tier=decision["dup_tier"],
                        dup_distance=decision["dup_distance"],
                        dup_cosine=decision["dup_cosine"],
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
            sidecars = self._sidecars(dst, shard_id)
        except BaseException:
            writer.abort()
            raise
        return writer.commit({"stage": self.name, "duplicates": duplicates}, sidecars)
