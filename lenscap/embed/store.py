"""Kept embeddings: one float16 sidecar Parquet file per shard, ``embeddings/NNNNN.parquet``.

Each file holds ``key`` (string) and ``embedding`` (fixed-size list of float16, unit length before
rounding), and names its model and dimension in the schema's metadata, so a reader never mixes
models. A sidecar lives in a subdirectory, where readers that glob ``*.parquet`` in the dataset
directory (Hugging Face ``datasets``, DuckDB) never mistake it for rows. It is written with the shard
(staged, then committed by ``Dataset.commit`` in the same crash-safe step as the shard's rows).

``KeptEmbeddings.find`` looks for a model's embeddings in a dataset and then in the datasets its
manifest names as input (filter, caption and dedup keep every row's key), so a stage downstream of the
one that embedded reuses them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lenscap.core.dataset import Dataset
from lenscap.core.errors import DatasetError
from lenscap.core.layout import shard_name

__all__ = ["EMBEDDINGS_DIR", "KeptEmbeddings", "embeddings_name", "write_embeddings", "embedding_schema"]

EMBEDDINGS_DIR = "embeddings"
_MODEL_KEY = b"lenscap.embedding_model"
_DIM_KEY = b"lenscap.embedding_dim"
_MAX_HOPS = 16  # how far up a chain of inputs to look


def embeddings_name(shard_id: int) -> str:
    """The sidecar's name in a dataset directory."""
    return f"{EMBEDDINGS_DIR}/{shard_name(shard_id)}.parquet"


def embedding_schema(model: str, dim: int) -> pa.Schema:
    return pa.schema(
        [pa.field("key", pa.string()), pa.field("embedding", pa.list_(pa.float16(), dim))],
        metadata={_MODEL_KEY: model.encode(), _DIM_KEY: str(dim).encode()},
    )


def write_embeddings(path: Path, keys: list[str], vectors: np.ndarray, model: str) -> None:
    """Write one shard's embeddings (``vectors``: one row per key) as float16 to ``path`` (a staging file)."""
    dim = int(vectors.shape[1]) if vectors.ndim == 2 else 0
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float16).ravel(), type=pa.float16())
    column = pa.FixedSizeListArray.from_arrays(flat, dim)
    table = pa.Table.from_arrays([pa.array(keys, pa.string()), column], schema=embedding_schema(model, dim))
    pq.write_table(table, path)


class KeptEmbeddings:
    """A model's kept embeddings in one dataset directory."""

    def __init__(self, dataset: Dataset, model: str, dim: int) -> None:
        self.dataset = dataset
        self.model = model
        self.dim = dim

    @classmethod
    def find(cls, dataset: Dataset, model: str) -> KeptEmbeddings | None:
        """``model``'s embeddings in ``dataset`` or the nearest of its inputs that has them, or None."""
        current: Dataset | None = dataset
        for _ in range(_MAX_HOPS):
            if current is None:
                return None
            kept = cls._in(current)
            if kept is not None and kept.model == model:
                return kept
            current = _input_of(current)
        return None

    @classmethod
    def _in(cls, dataset: Dataset) -> KeptEmbeddings | None:
        try:
            names = sorted(dataset.fs.ls(dataset.file(EMBEDDINGS_DIR), detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return None
        files = [n for n in names if n.endswith(".parquet") and not n.rsplit("/", 1)[-1].startswith(".")]
        if not files:
            return None
        with dataset.fs.open(files[0], "rb") as f:
            meta = pq.read_schema(f).metadata or {}
        if _MODEL_KEY not in meta:
            return None
        return cls(dataset, meta[_MODEL_KEY].decode(), int(meta[_DIM_KEY]))

    def shard(self, shard_id: int) -> dict[str, np.ndarray]:
        """``{key: float32 vector}`` for one shard (empty when that shard has no sidecar)."""
        keys, vectors = self.arrays(shard_id)
        return dict(zip(keys, vectors, strict=True))

    def arrays(self, shard_id: int) -> tuple[list[str], np.ndarray]:
        """One shard's keys and its float32 vectors, one row per key, in the sidecar's order (none
        when that shard has no sidecar)."""
        name = self.dataset.file(embeddings_name(shard_id))
        try:
            with self.dataset.fs.open(name, "rb") as f:
                table = pq.read_table(f)
        except FileNotFoundError:
            return [], np.zeros((0, self.dim), dtype=np.float32)
        keys = table.column("key").to_pylist()
        flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return keys, flat.astype(np.float32).reshape(len(keys), self.dim)


def _input_of(dataset: Dataset) -> Dataset | None:
    """The dataset ``dataset``'s manifest names as its input, if it still exists."""
    manifest = dataset.read_manifest() or {}
    source = manifest.get("input")
    if not isinstance(source, str) or not source:
        return None
    try:
        return Dataset.open(source, dataset.storage_options)
    except DatasetError:
        return None
