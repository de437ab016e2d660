"""The semantic tier of pass 2 (``dedup --semantic``), SemDeDup's search, out of core.

From the embeddings pass 1 kept (a float16 sidecar per signature shard, of the input and of each
``--against`` dataset):

1. k-means (faiss, spherical, seeded) on a sample: up to 256 embeddings per cluster (faiss's own
   default), at most ``SAMPLE_CAP`` in all, drawn shard by shard with a seed per shard, so the sample
   is the same on every run and its memory is bounded whatever the dataset's size. The number of
   clusters is ``--clusters``, or one per ``CLUSTER_SIZE`` embeddings (SemDeDup split LAION-440M into
   50,000 clusters, about 8,800 each);
2. every embedding assigned to its nearest centroid, shard by shard: ``assignment.parquet`` (key,
   source, shard, row, cluster), and the embedding appended to its cluster's bucket file (a bucket
   holds every cluster whose number is the same modulo ``MAX_BUCKETS``);
3. the pairwise search within each cluster, one executor task per bucket (``semantic_pairs``);
   a task reads only its bucket.

Nothing holds all the embeddings at once: step 1 holds the sample, step 2 one shard, a task its
bucket. Steps 1-2 are redone whole unless ``prepared.json`` says they finished from these same
embeddings; a done bucket is never searched again.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lenscap.core.commits import atomic_write_json
from lenscap.core.dataset import Dataset, read_parquet
from lenscap.core.errors import LenscapError, MissingDependency
from lenscap.core.install import install_hint
from lenscap.core.job import Job
from lenscap.dedup.semantic_pairs import SOURCE_SHIFT, ClusterJob, record_type
from lenscap.embed.store import KeptEmbeddings, embeddings_name

__all__ = ["semantic_pairs", "cluster_count", "CLUSTER_SIZE", "SAMPLE_CAP"]

CLUSTER_SIZE = 10_000
SAMPLE_PER_CLUSTER = 256
SAMPLE_CAP = 500_000  # 1 GB of float32 at 512 dimensions
MAX_BUCKETS = 1024
SEED = 31
_ITERATIONS = 20

_ASSIGNMENT = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("source", pa.int32()),
        pa.field("shard", pa.int32()),
        pa.field("row", pa.int32()),
        pa.field("cluster", pa.int32()),
    ]
)


@dataclass(frozen=True)
class _Shard:
    source: int
    shard: int
    rows: int
    kept: KeptEmbeddings


def cluster_count(embeddings: int, clusters: int | None) -> int:
    """``--clusters``, or one per ``CLUSTER_SIZE`` embeddings; never more than there are embeddings."""
    wanted = clusters if clusters is not None else math.ceil(embeddings / CLUSTER_SIZE)
    return max(1, min(wanted, embeddings))


def _inventory(signatures: list[tuple[int, Dataset]], model: str) -> list[_Shard]:
    """Every signature shard with embeddings, with its row count (from its sidecar's footer)."""
    shards = []
    for source, ds in signatures:
        kept = KeptEmbeddings.find(ds, model)
        if kept is None or kept.dataset.resolved != ds.resolved:
            continue
        for shard_id in ds.completed_ids():
            path = ds.path / embeddings_name(shard_id)
            if path.exists():
                shards.append(_Shard(source, shard_id, pq.ParquetFile(path).metadata.num_rows, kept))
    return shards


def _sample(shards: list[_Shard], total: int, size: int) -> np.ndarray:
    """About ``size`` embeddings drawn evenly from every shard, the same on every run."""
    share = size / total
    parts = []
    for s in shards:
        _, vectors = s.kept.arrays(s.shard)
        pick = np.random.default_rng([SEED, s.source, s.shard]).random(len(vectors)) < share
        parts.append(vectors[pick])
    return np.concatenate(parts) if parts else np.zeros((0, shards[0].kept.dim), np.float32)


def _train(sample: np.ndarray, k: int) -> np.ndarray:
    try:
        import faiss  # optional (the semantic extra)
    except ImportError:
        raise MissingDependency(f"dedup --semantic needs faiss: {install_hint('semantic')}") from None
    if k == 1:  # nothing to learn: one centroid, which every embedding is nearest to
        return np.ones((1, sample.shape[1]), dtype=np.float32)
    kmeans = faiss.Kmeans(
        sample.shape[1],
        k,
        niter=_ITERATIONS,
        seed=SEED,
        spherical=True,
        min_points_per_centroid=1,  # fewer is fine for a small dataset; no warning on stderr
        max_points_per_centroid=SAMPLE_PER_CLUSTER,
        verbose=False,
    )
    kmeans.train(np.ascontiguousarray(sample, dtype=np.float32))
    return np.asarray(kmeans.centroids, dtype=np.float32)


def _partition(shards: list[_Shard], signatures: dict[int, Dataset], centroids: np.ndarray, folder: Path) -> int:
    """Assign every embedding to its nearest centroid, shard by shard: ``assignment.parquet``, and the
    bucket files. Returns the number of buckets."""
    k, dim = centroids.shape
    buckets = min(k, MAX_BUCKETS)
    rtype = record_type(dim)
    with pq.ParquetWriter(folder / "assignment.parquet", _ASSIGNMENT) as assignment:
        for s in shards:
            keys, vectors = s.kept.arrays(s.shard)
            sig = read_parquet(signatures[s.source].parquet_path(s.shard), columns=["key", "row"])
            row_of = dict(zip(sig.column("key").to_pylist(), sig.column("row").to_pylist()))
            rows = np.array([row_of[key] for key in keys], dtype=np.int64)
            cluster = (vectors @ centroids.T).argmax(axis=1).astype(np.int32) if k > 1 else np.zeros(len(keys), np.int32)
            assignment.write_table(
                pa.table(
                    {
                        "key": keys,
                        "source": [s.source] * len(keys),
                        "shard": [s.shard] * len(keys),
                        "row": rows,
                        "cluster": cluster,
                    },
                    schema=_ASSIGNMENT,
                )
            )
            records = np.empty(len(keys), dtype=rtype)
            records["id"] = (s.source << SOURCE_SHIFT) | (s.shard << 24) | rows
            records["cluster"] = cluster
            records["v"] = vectors
            bucket = cluster % buckets
            for b in np.unique(bucket):
                with open(folder / f"bucket-{b}.bin", "ab") as f:
                    records[bucket == b].tofile(f)
    return buckets


def _prepare(
    shards: list[_Shard], signatures: dict[int, Dataset], clusters: int | None, threshold: float, folder: Path
) -> dict[str, Any]:
    """Steps 1 and 2, unless ``prepared.json`` says they were done from these same embeddings (and for
    this threshold: the buckets' done markers are its)."""
    total = sum(s.rows for s in shards)
    k = cluster_count(total, clusters)
    ident = {
        "shards": [[s.source, s.shard, s.rows] for s in shards],
        "clusters": k,
        "dim": shards[0].kept.dim,
        "threshold": threshold,
    }
    marker = folder / "prepared.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        if done["ident"] == ident:
            return done
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sample = _sample(shards, total, min(total, SAMPLE_PER_CLUSTER * k, SAMPLE_CAP))
    k = max(1, min(k, len(sample)))
    centroids = _train(sample, k)
    del sample
    np.save(folder / "centroids.npy", centroids)
    buckets = _partition(shards, signatures, centroids, folder)
    done = {"ident": ident, "clusters": k, "buckets": buckets, "embeddings": total}
    atomic_write_json(marker, done)
    return done


def semantic_pairs(
    signatures: list[tuple[int, Dataset]],
    model: str,
    threshold: float,
    clusters: int | None,
    work_dir: Path,
    job: Job | None,
    status: Callable[[str], None] = lambda text: None,
) -> tuple[list[Path], dict[str, Any]]:
    """The semantic tier's edge files (``a``, ``b``, ``cos``) over ``signatures`` (source number, its
    signatures directory), and its figures for the report. ``job``'s executor runs the buckets
    (none: this process)."""
    shards = _inventory(signatures, model)
    if not shards or not sum(s.rows for s in shards):
        return [], {"embeddings": 0, "clusters": 0}
    folder = work_dir / "semantic"
    status("semantic duplicates: k-means and assignment")
    prepared = _prepare(shards, dict(signatures), clusters, threshold, folder)
    task = ClusterJob(str(folder), prepared["ident"]["dim"], threshold, len(signatures) > 1)
    numbers = [b for b in range(prepared["buckets"]) if task.bucket(b).exists()]
    todo = [b for b in numbers if not task.marker(b).exists()]
    done = len(numbers) - len(todo)

    def on_done(number: int, result: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        status(f"semantic duplicates: bucket {done}/{len(numbers)}")

    if job is None:
        for b in todo:
            on_done(b, task.run(b))
    else:
        failed = job.map(task, todo, on_done)
        if failed:
            first = min(failed)
            raise LenscapError(
                f"the semantic search failed on {len(failed)} of {len(numbers)} buckets "
                f"(bucket {first}: {failed[first]}); rerun to retry them"
            )
    figures = {"embeddings": prepared["embeddings"], "clusters": prepared["clusters"], "tasks": len(numbers)}
    return [task.pairs(b) for b in numbers], figures
