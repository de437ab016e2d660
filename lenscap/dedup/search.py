"""Pass 2 of dedup, global: from every shard's signatures to one decision per duplicated sample.

Everything runs in one DuckDB connection under a memory limit, spilling to a temporary directory,
so the number of samples is bounded by disk, not memory:

1. the signatures of the input (source 0) and of each ``--against`` dataset become one table;
2. edges: samples with equal SHA-256 (exact), equal perceptual hash, perceptual hashes within the
   distance as they are or in their canonical orientations (``pigeonhole.near_pairs`` over every
   image's keys, ``phash.ImageHash.keys``), equal normalised captions; with ``--against``, only edges
   that touch an input sample. A hash match of a low-information image is an edge only once the pair's colour thumbnails
   agree (``thumbnails``): equal thumbnails group like equal hashes, and every candidate pair of the
   search with a low-quality side is checked before it becomes an edge; with ``--semantic``, pairs of
   embeddings within the cosine threshold inside a k-means cluster (``dedup.semantic``);
3. clusters: union-find over the edges (``unionfind.UnionFind``, memory per duplicated sample only);
4. a keeper per cluster: a sample of an earlier release if the cluster has one (new samples never
   replace released ones), else the first in input order or, with ``--keep largest``, the most
   pixels (then the first);
5. ``decisions.parquet`` (one row per input sample in a cluster, sorted by shard for pass 3), and the
   report: ``clusters.parquet`` and ``report.json``.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lenscap.core.commits import atomic_write_json
from lenscap.core.dataset import Dataset
from lenscap.core.errors import UsageError
from lenscap.core.job import Job
from lenscap.core.sql import literal, out_of_core
from lenscap.dedup.options import DedupOptions
from lenscap.dedup.phash import ALGORITHM, LOW_QUALITY
from lenscap.dedup.pigeonhole import PigeonholePlan, near_pairs
from lenscap.dedup.semantic import semantic_pairs
from lenscap.dedup.tables import split_near_pairs
from lenscap.dedup.thumbnails import MAX_THUMBNAIL_DIFFERENCE, thumbnail_differences
from lenscap.dedup.unionfind import UnionFind

__all__ = ["Source", "find_duplicates", "REASONS", "TIERS"]

# What matched (``dup_reason``), by edge code: a hash match of low-information images confirmed by
# their thumbnails is a ``phash`` match too (clusters.parquet's ``why`` says so); and the tier each
# reason belongs to (``dup_tier``). A sample joined by several tiers is reported by the first: an exact
# copy is ``exact`` even where it is semantic too.
REASONS = ("exact", "phash", "phash", "caption", "semantic")
TIERS = {"exact": "exact", "phash": "near", "caption": "caption", "semantic": "semantic"}
_EXACT, _PHASH, _THUMBNAIL, _CAPTION, _SEMANTIC = range(5)
_EDGE_BATCH = 1_000_000
_VERIFY_BATCH = 50_000
_KEY_ROWS = 16  # room for an image's keys: its hash and at most 8 orientations


@dataclass(frozen=True)
class Source:
    """One dataset's signatures: the input (index 0) or an ``--against`` release."""

    index: int
    label: str  # the dataset directory, as the user named it
    signatures: Dataset

    def files(self) -> list[str]:
        return [str(self.signatures.parquet_path(i)) for i in self.signatures.completed_ids()]


def _load(con: Any, sources: list[Source]) -> None:
    parts = []
    for s in sources:
        files = s.files()
        if not files:
            continue
        listing = "read_parquet([" + ", ".join(literal(f) for f in files) + "])"
        # A signatures directory written by another lenscap version (a job resumed after an upgrade).
        found = {
            a
            for (a,) in con.execute(
                f"SELECT DISTINCT phash_algorithm FROM {listing} WHERE phash_algorithm IS NOT NULL"
            ).fetchall()
        }
        if found - {ALGORITHM}:
            raise UsageError(
                f"the signatures of {s.label} in {s.signatures.location} were made with {sorted(found - {ALGORITHM})[0]}, "
                f"not {ALGORITHM}; delete that directory to hash again"
            )
        parts.append(f"""SELECT ({s.index}::BIGINT << 48) | (shard::BIGINT << 24) | "row" AS id, {s.index} AS src, shard, key,
            sha256, phash AS h, phash_degenerate AS degenerate, coalesce(phash_keys, [phash]) AS hv,
            coalesce(phash_quality < {LOW_QUALITY}, false) AS low, thumbnail AS thumb, caption_hash, pixels, error
            FROM {listing}""")
    if not parts:
        parts.append(
            "SELECT NULL::BIGINT id, 0 src, 0 shard, ''::VARCHAR key, NULL::BLOB sha256, NULL::UBIGINT h, "
            "NULL::BOOLEAN degenerate, NULL::UBIGINT[] hv, false low, NULL::BLOB thumb, NULL::BLOB caption_hash, "
            "NULL::BIGINT pixels, NULL::VARCHAR error WHERE false"
        )
    con.execute("CREATE TEMP TABLE sig AS " + " UNION ALL ".join(parts))


def _group_edges(con: Any, column: str, why: int, where: str, against: bool, distance: str = "0") -> None:
    """Edges from each member of a group of equal ``column`` values to the group's first sample;
    ``distance`` over the member ``s`` and the group ``g`` (its first sample's hash is ``g.rep_h``)."""
    new_only = " AND bool_or(src = 0)" if against else ""
    con.execute(f"""INSERT INTO edges
        WITH g AS (SELECT {column} AS v, min(id) AS rep, arg_min(h, id) AS rep_h FROM sig
                   WHERE {column} IS NOT NULL AND {where} GROUP BY {column} HAVING count(*) > 1{new_only})
        SELECT s.id, g.rep, {why}, {distance} FROM sig s JOIN g ON s.{column} = g.v WHERE s.id <> g.rep AND {where}""")


def find_duplicates(
    sources: list[Source],
    options: DedupOptions,
    work_dir: Path,
    report_dir: Path,
    status: Callable[[str], None] = lambda text: None,
    job: Job | None = None,
) -> dict[str, Any]:
    """Write ``work_dir/decisions.parquet`` and the report; return the report's summary.

    The near-duplicate search runs in this process, or with a distributed executor (Ray, ``job``'s), one
    task per pigeonhole table (``tables.split_near_pairs``); the pairs, and so the result, are the
    same. Local processes gain nothing over DuckDB's own threads here (see the README's figures).
    """
    started = time.monotonic()
    # The passes, numbered in what ``status`` says, so a long search shows where it is (a log line
    # every interval): "step 4/6: near duplicates, table 3/16".
    passes = [
        "loading signatures",
        *(["exact duplicates"] if options.exact else []),
        *(["equal perceptual hashes"] if options.phash else []),
        *(["near duplicates"] if options.phash else []),
        *(["caption duplicates"] if options.captions else []),
        *(["semantic duplicates"] if options.semantic else []),
        "clusters",
        "decisions and report",
    ]

    def step(text: str) -> None:
        name = text.split(":", 1)[0]
        number = passes.index(name) + 1 if name in passes else None
        status(f"step {number}/{len(passes)}: {text.replace(': ', ', ', 1)}" if number else text)

    con = out_of_core(options.memory_limit, work_dir / "spill", options.workers)
    try:
        step("loading signatures")
        _load(con, sources)
        against = len(sources) > 1
        con.execute("CREATE TEMP TABLE edges (a BIGINT, b BIGINT, why UTINYINT, d UTINYINT)")
        con.execute("CREATE TEMP TABLE sem (a BIGINT, b BIGINT, cos FLOAT)")  # the semantic edges' cosines
        plan = None
        if options.exact:
            step("exact duplicates")
            _group_edges(con, "sha256", _EXACT, "true", against)
        if options.phash:
            step("equal perceptual hashes")
            _group_edges(con, "h", _PHASH, f"{_USABLE_HASH} AND NOT low", against)
            # A low-information image's hash says little: equal thumbnails, not equal hashes, group it.
            _group_edges(con, "thumb", _THUMBNAIL, f"{_USABLE_HASH} AND low", against, "bit_count(xor(s.h, g.rep_h))")
            step("near duplicates")
            plan = _near_edges(con, options, against, work_dir, job, step)
        if options.captions:
            step("caption duplicates")
            _group_edges(con, "caption_hash", _CAPTION, "true", against)
        semantic = _semantic_edges(con, sources, options, work_dir, job, step) if options.semantic else None
        step("clusters")
        _cluster(con)
        _decide(con, options)
        step("decisions and report")
        summary = _write(con, sources, options, plan, work_dir, report_dir, started)
        if semantic is not None:
            summary["semantic"] = semantic
        shutil.rmtree(work_dir / "search", ignore_errors=True)  # kept until now for a rerun after a failure
        for bucket in (work_dir / "semantic").glob("bucket-*.bin"):  # a copy of every embedding; the rest is small
            bucket.unlink()
        return summary
    finally:
        con.close()
        shutil.rmtree(work_dir / "spill", ignore_errors=True)


# Hashes a near-duplicate search may compare: a degenerate one (a flat image) matches everything.
_USABLE_HASH = "h IS NOT NULL AND NOT degenerate"


def _near_edges(
    con: Any, options: DedupOptions, against: bool, work_dir: Path, job: Job | None, step: Callable[[str], None]
) -> PigeonholePlan:
    """Add the pairs of images within ``--max-distance``, as they are or turned, to ``edges``: found in
    this process, or one task per pigeonhole table on a distributed executor (the pairs are the same),
    then those with a low-quality side verified by their thumbnails."""
    # One row per distinct hash, except that a low-quality image is one with its equal thumbnails only.
    # The keys and thumbnails are joined on afterwards: a GROUP BY carrying them does not fit a
    # small memory limit.
    con.execute(f"""CREATE TEMP TABLE uh AS
        WITH g AS (SELECT min(id) AS uid, bool_or(src = 0) AS has_new, bool_or(low) AS low FROM sig WHERE {_USABLE_HASH}
                   GROUP BY CASE WHEN low THEN NULL ELSE h END, CASE WHEN low THEN thumb END)
        SELECT g.*, s.hv, s.thumb FROM g JOIN sig s ON s.id = g.uid""")
    # Each image's keys, one row each (its hash as it is, then its canonical orientations), numbered
    # image * 16 + key: the search emits each pair of rows once, never a pair of one image's rows.
    con.execute(f"""CREATE TEMP TABLE uv AS SELECT uid * {_KEY_ROWS} + k AS uid, h, has_new
        FROM (SELECT uid, has_new, unnest(hv) AS h, unnest(range(len(hv))) AS k FROM uh)""")
    n = con.execute("SELECT count(*) FROM uv").fetchall()[0][0]
    plan = PigeonholePlan.for_size(max(n, 1), options.max_distance)
    restrict = f"a.uid // {_KEY_ROWS} <> b.uid // {_KEY_ROWS}" + (" AND (a.has_new OR b.has_new)" if against else "")
    on_table = lambda done, total: step(f"near duplicates: table {done}/{total}")  # noqa: E731
    if job is not None and job.executor.distributed:
        split_near_pairs(
            con, "uv", plan, options.bucket_cap, job, work_dir, options.memory_limit, options.workers, restrict, on_table
        )
    else:
        near_pairs(con, "uv", plan, options.bucket_cap, restrict, on_table)
    # A pair of images may match on several of their keys: its distance is the least.
    con.execute(f"""CREATE TEMP TABLE pairs AS SELECT a // {_KEY_ROWS} AS a, b // {_KEY_ROWS} AS b, min(d) AS d
        FROM near GROUP BY ALL""")
    _verify_low_quality(con, work_dir)
    con.execute(f"""INSERT INTO edges SELECT p.a, p.b, CASE WHEN x.low OR y.low THEN {_THUMBNAIL} ELSE {_PHASH} END, p.d
        FROM pairs p JOIN uh x ON x.uid = p.a JOIN uh y ON y.uid = p.b""")
    return plan


def _semantic_edges(
    con: Any, sources: list[Source], options: DedupOptions, work_dir: Path, job: Job | None, step: Callable[[str], None]
) -> dict[str, Any]:
    """Add the semantic tier's edges (``dedup.semantic``) to ``edges``, their cosines to ``sem``."""
    signatures = [(s.index, s.signatures) for s in sources]
    files, figures = semantic_pairs(signatures, options.model, options.threshold, options.clusters, work_dir, job, step)
    if files:
        con.execute(f"INSERT INTO sem SELECT a, b, cos FROM read_parquet([{', '.join(literal(f) for f in files)}])")
    con.execute(f"INSERT INTO edges SELECT a, b, {_SEMANTIC}, 0 FROM sem")
    return figures | {"model": options.model, "threshold": options.threshold}


def _verify_low_quality(con: Any, work_dir: Path) -> None:
    """Drop from ``pairs`` every pair with a low-quality side whose thumbnails disagree (or where one
    side has none: its quality is far from the other's), in batches; the rejected pairs go to a file
    as they are found, so memory holds one batch."""
    path = work_dir / "rejected.parquet"
    reader = con.sql("""SELECT p.a, p.b, x.thumb AS ta, y.thumb AS tb FROM pairs p JOIN uh x ON x.uid = p.a
        JOIN uh y ON y.uid = p.b WHERE x.low OR y.low""").to_arrow_reader(_VERIFY_BATCH)
    # The reader streams from the connection: nothing else runs on it until it is read.
    with pq.ParquetWriter(path, pa.schema([("a", pa.int64()), ("b", pa.int64())])) as rejected:
        for batch in reader:
            ta, tb = batch.column("ta").to_pylist(), batch.column("tb").to_pylist()
            both = np.array([x is not None and y is not None for x, y in zip(ta, tb)], dtype=bool)
            agree = np.zeros(len(ta), dtype=bool)
            if both.any():
                pick = np.flatnonzero(both)
                diff = thumbnail_differences([ta[i] for i in pick], [tb[i] for i in pick])
                agree[pick] = diff <= MAX_THUMBNAIL_DIFFERENCE
            if not agree.all():
                rejected.write_table(pa.table({"a": batch.column("a"), "b": batch.column("b")}).filter(pa.array(~agree)))
    con.execute(f"CREATE TEMP TABLE rejected AS SELECT * FROM read_parquet({literal(path)})")
    path.unlink()
    con.execute("DELETE FROM pairs USING rejected r WHERE pairs.a = r.a AND pairs.b = r.b")


def _cluster(con: Any) -> None:
    nodes = con.execute(
        "SELECT DISTINCT x FROM (SELECT a AS x FROM edges UNION ALL SELECT b FROM edges) ORDER BY x"
    ).fetchnumpy()["x"]
    uf = UnionFind(np.asarray(nodes, dtype=np.int64))
    reader = con.sql("SELECT a, b FROM edges").to_arrow_reader(_EDGE_BATCH)
    for batch in reader:
        uf.union(batch.column(0).to_numpy(), batch.column(1).to_numpy())
    members = pa.table({"id": uf.ids, "cluster": uf.components()})
    con.register("members_arrow", members)
    con.execute("CREATE TEMP TABLE members AS SELECT * FROM members_arrow")
    con.unregister("members_arrow")


def _decide(con: Any, options: DedupOptions) -> None:
    size_order = "s.pixels DESC NULLS LAST, " if options.keep == "largest" else ""
    con.execute(f"""CREATE TEMP TABLE ranked AS
        WITH best AS (SELECT x, min(why::INTEGER * 256 + d) AS code FROM
                        (SELECT a AS x, why, d FROM edges UNION ALL SELECT b, why, d FROM edges) GROUP BY x),
             closest AS (SELECT x, max(cos) AS cos FROM (SELECT a AS x, cos FROM sem UNION ALL SELECT b, cos FROM sem) GROUP BY x)
        SELECT m.cluster, s.id, s.src, s.shard, s.key, s.pixels, best.code // 256 AS why, best.code % 256 AS d, closest.cos,
               count(*) OVER (PARTITION BY m.cluster) AS size,
               row_number() OVER (PARTITION BY m.cluster ORDER BY (s.src <> 0) DESC, {size_order}s.id) AS rank
        FROM members m JOIN sig s USING (id) JOIN best ON best.x = m.id LEFT JOIN closest ON closest.x = m.id""")
    con.execute("""CREATE TEMP TABLE keepers AS SELECT cluster, src AS keeper_src, key AS keeper_key,
                   pixels AS keeper_pixels FROM ranked WHERE rank = 1""")


def _sql_list(values: list[str]) -> str:
    return "[" + ", ".join(literal(v) for v in values) + "]"


def _write(
    con: Any,
    sources: list[Source],
    options: DedupOptions,
    plan: PigeonholePlan | None,
    work_dir: Path,
    report_dir: Path,
    started: float,
) -> dict[str, Any]:
    labels = _sql_list([s.label for s in sources])
    reasons = _sql_list(list(REASONS))
    tiers = _sql_list([TIERS[r] for r in REASONS])  # one entry per edge code, as reasons
    keep_why = "'largest (' || k.keeper_pixels || ' pixels)'" if options.keep == "largest" else "'first in input order'"
    con.execute(f"""CREATE TEMP TABLE decided AS
        SELECT r.cluster, r.id, r.src, {labels}[r.src + 1] AS source, r.shard, r.key, r.size, r.rank = 1 AS kept,
               CASE WHEN r.rank = 1 THEN NULL ELSE k.keeper_key END AS dup_of,
               CASE WHEN r.rank = 1 OR k.keeper_src = 0 THEN NULL ELSE {labels}[k.keeper_src + 1] END AS dup_in,
               CASE WHEN r.rank = 1 THEN NULL ELSE {reasons}[r.why + 1] END AS dup_reason,
               CASE WHEN r.rank = 1 THEN NULL ELSE {tiers}[r.why + 1] END AS dup_tier,
               CASE WHEN r.rank = 1 OR r.why NOT IN ({_PHASH}, {_THUMBNAIL}) THEN NULL ELSE r.d END::INTEGER AS dup_distance,
               CASE WHEN r.rank = 1 OR r.why <> {_SEMANTIC} THEN NULL ELSE r.cos END::FLOAT AS dup_cosine,
               CASE WHEN r.rank > 1 THEN CASE r.why WHEN {_EXACT} THEN 'exact copy' WHEN {_PHASH} THEN 'pHash distance ' || r.d
                                                    WHEN {_THUMBNAIL} THEN 'pHash distance ' || r.d || ', thumbnails agree'
                                                    WHEN {_CAPTION} THEN 'same caption' ELSE 'cosine ' || round(r.cos, 4) END
                    WHEN r.src <> 0 THEN 'in an earlier release' ELSE {keep_why} END AS why
        FROM ranked r JOIN keepers k USING (cluster)""")
    decisions = work_dir / "decisions.parquet"
    tmp = work_dir / ".decisions.parquet.tmp"
    con.execute(f"""COPY (SELECT shard, key, CASE WHEN kept THEN 'kept' ELSE 'duplicate' END AS status, dup_of, dup_in,
                    dup_reason, dup_tier, dup_distance, dup_cosine, cluster AS dup_cluster FROM decided WHERE src = 0 ORDER BY shard, key)
                    TO {literal(tmp)} (FORMAT parquet)""")
    report_dir.mkdir(parents=True, exist_ok=True)
    clusters_tmp = report_dir / ".clusters.parquet.tmp"
    con.execute(f"""COPY (SELECT cluster, size, source, shard, key, kept, why FROM decided ORDER BY cluster, NOT kept, id)
                    TO {literal(clusters_tmp)} (FORMAT parquet)""")

    def one(sql: str) -> Any:
        return con.execute(sql).fetchall()[0][0]

    per_source = dict(con.execute("SELECT src, count(*) FROM sig GROUP BY src").fetchall())
    by_reason: dict[str, int] = {}
    for w, n in con.execute("SELECT why, count(*) FROM ranked WHERE src = 0 AND rank > 1 GROUP BY why ORDER BY why").fetchall():
        by_reason[REASONS[w]] = by_reason.get(REASONS[w], 0) + n
    sizes = con.execute("""SELECT CASE WHEN size = 2 THEN '2' WHEN size <= 5 THEN '3-5' WHEN size <= 10 THEN '6-10'
                           WHEN size <= 100 THEN '11-100' ELSE '>100' END AS bucket, count(*)
                           FROM (SELECT DISTINCT cluster, size FROM ranked) GROUP BY bucket""").fetchall()
    largest = con.execute("""SELECT source, key, size FROM decided WHERE kept ORDER BY size DESC, id LIMIT 10""").fetchall()
    capped = con.execute("SELECT count(*), max(n) FROM capped").fetchall()[0] if plan is not None else (0, None)
    summary: dict[str, Any] = {
        "options": options.identity(),
        "sources": [
            {
                "dataset": s.label,
                "role": "input" if s.index == 0 else "against",
                "samples_with_images": per_source.get(s.index, 0),
            }
            for s in sources
        ],
        "duplicates": one("SELECT count(*) FROM decided WHERE src = 0 AND NOT kept"),
        "duplicates_of_earlier_releases": one("SELECT count(*) FROM decided WHERE src = 0 AND NOT kept AND dup_in IS NOT NULL"),
        "duplicates_by_reason": by_reason,
        "duplicates_by_tier": {t: sum(n for r, n in by_reason.items() if TIERS[r] == t) for t in dict.fromkeys(TIERS.values())},
        "clusters": one("SELECT count(*) FROM keepers"),
        "cluster_sizes": {b: n for b, n in sorted(sizes, key=lambda x: ["2", "3-5", "6-10", "11-100", ">100"].index(x[0]))},
        "largest_clusters": [{"kept": {"dataset": src, "key": key}, "size": size} for src, key, size in largest],
        "degenerate_images": one("SELECT count(*) FROM sig WHERE src = 0 AND degenerate"),
        "unhashable_images": one("SELECT count(*) FROM sig WHERE src = 0 AND error IS NOT NULL"),
        "low_quality_images": one("SELECT count(*) FROM sig WHERE src = 0 AND low AND NOT degenerate"),
        "pairs_rejected_by_thumbnail": one("SELECT count(*) FROM rejected") if plan is not None else 0,
        "capped_buckets": {"count": capped[0], "largest": capped[1], "cap": options.bucket_cap},
        "plan": None
        if plan is None
        else {"blocks": len(plan.blocks), "tables": len(plan.tables), "partitions": 1 << plan.partition_bits},
        "seconds": round(time.monotonic() - started, 2),
    }
    os.replace(tmp, decisions)
    os.replace(clusters_tmp, report_dir / "clusters.parquet")
    atomic_write_json(report_dir / "report.json", summary)
    return summary
