"""The semantic tier's pairwise search, one executor task per bucket of k-means clusters.

A bucket file (``bucket-B.bin``, written by ``dedup.semantic``) holds fixed-size records: a sample's id
(as pass 2 numbers samples), its cluster, its float16 embedding. A task reads its one bucket, and
within each cluster of it compares every embedding with every other (a block of rows at a time, so a
cluster of n embeddings needs n x 256 similarities at once, not n x n). Embeddings of different clusters
are never compared: that is SemDeDup's approximation, and what makes the search linear in the dataset
instead of quadratic.

A pair at or above the threshold joins its two samples. A task writes, per cluster, the edges that
say the same as all its pairs: each sample's edge to its closest match (with the cosine, which
``dup_cosine`` reports) and an edge from each sample to the first of its component (no cosine), at
most two per sample however many pairs there are. With ``--against``, a pair of two samples of
earlier releases is no pair. The output is ``pairs-B.parquet`` (``a``, ``b``, ``cos``) then
``pairs-B.done``: a rerun, or Ray running a task again after its worker died, skips a done bucket.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lenscap.core.commits import atomic_write_json
from lenscap.dedup.unionfind import UnionFind

__all__ = ["ClusterJob", "record_type", "cluster_edges", "SOURCE_SHIFT"]

SOURCE_SHIFT = 48  # a sample's id: (source << 48) | (shard << 24) | row, as dedup.search numbers them
_BLOCK = 256  # rows of similarities computed at once


def record_type(dim: int) -> np.dtype:
    return np.dtype([("id", "<i8"), ("cluster", "<i4"), ("v", "<f2", (dim,))])


def cluster_edges(ids: np.ndarray, vectors: np.ndarray, threshold: float, against: bool) -> tuple[np.ndarray, ...]:
    """Edges ``(a, b, cos)`` joining the samples of one cluster (``ids``, their unit ``vectors``) whose
    cosine is at least ``threshold``; ``against``: a pair of two ids of earlier releases does not count."""
    n = len(ids)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if n < 2:
        return empty
    old = (ids >> SOURCE_SHIFT) != 0 if against else np.zeros(n, dtype=bool)
    uf = UnionFind(np.arange(n, dtype=np.int64))
    best = np.full(n, -1, dtype=np.int64)
    best_cos = np.full(n, -np.inf, dtype=np.float32)
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        sims = vectors[start:stop] @ vectors.T
        rows = np.arange(start, stop)
        sims[rows - start, rows] = -np.inf  # not a pair with itself
        if old[start:stop].any():
            sims[np.ix_(old[start:stop], old)] = -np.inf
        best[start:stop] = sims.argmax(axis=1)
        best_cos[start:stop] = sims[rows - start, best[start:stop]]
        r, c = np.nonzero(sims >= threshold)
        r += start
        upper = c > r  # each pair once
        uf.union(r[upper], c[upper])
    root = uf.components()
    joined = best_cos >= threshold
    star = root != np.arange(n)
    a = np.concatenate([ids[joined], ids[star]])
    b = np.concatenate([ids[best[joined]], ids[root[star]]])
    closest = np.minimum(best_cos[joined], 1.0)  # a float32 dot product of unit vectors may pass 1
    cos = np.concatenate([closest, np.full(int(star.sum()), np.nan, dtype=np.float32)])
    return a, b, cos


@dataclass(frozen=True)
class ClusterJob:
    """An executor job whose item is a bucket number; everything it needs is in ``dir``."""

    dir: str
    dim: int
    threshold: float
    against: bool

    def setup(self) -> None:
        pass

    def bucket(self, number: int) -> Path:
        return Path(self.dir) / f"bucket-{number}.bin"

    def pairs(self, number: int) -> Path:
        return Path(self.dir) / f"pairs-{number}.parquet"

    def marker(self, number: int) -> Path:
        return Path(self.dir) / f"pairs-{number}.done"

    def run(self, number: int) -> dict[str, Any]:
        if self.marker(number).exists():  # done by an attempt whose worker died before reporting
            return json.loads(self.marker(number).read_text())
        records = np.fromfile(self.bucket(number), dtype=record_type(self.dim))
        records = records[np.lexsort((records["id"], records["cluster"]))]
        starts = np.flatnonzero(np.diff(records["cluster"], prepend=-1, append=-1))
        parts: list[tuple[np.ndarray, ...]] = []
        for lo, hi in zip(starts[:-1], starts[1:]):
            vectors = records["v"][lo:hi].astype(np.float32)
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # float16 rounding
            parts.append(cluster_edges(records["id"][lo:hi], vectors, self.threshold, self.against))
        a, b, cos = (np.concatenate([p[i] for p in parts]) if parts else np.zeros(0) for i in range(3))
        table = pa.table(
            {"a": pa.array(a, pa.int64()), "b": pa.array(b, pa.int64()), "cos": pa.array(cos, pa.float32(), from_pandas=True)}
        )
        tmp = self.pairs(number).with_name(f".{self.pairs(number).name}.{os.getpid()}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.pairs(number))
        counts = {"samples": len(records), "clusters": len(parts), "edges": len(a)}
        atomic_write_json(self.marker(number), counts)
        return counts
