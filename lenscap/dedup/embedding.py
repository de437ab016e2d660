"""Pass 1's embeddings for ``dedup --semantic``: one CLIP embedding per image, in the same read of the
shard as its hashes, kept as a float16 sidecar beside the shard's signatures (``embeddings/NNNNN.parquet``
in the signatures directory, ``lenscap.embed.store``'s format).

An image whose embedding the dataset (or one of its inputs) already keeps, of the same model, is not
embedded again: its kept vector is copied. The model is loaded only when a shard has an image without
one, so a dataset embedded before never loads it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from lenscap.core.dataset import Dataset
from lenscap.core.record import Sample
from lenscap.embed.model import ClipEmbedder
from lenscap.embed.store import KeptEmbeddings, embeddings_name, write_embeddings

__all__ = ["EmbeddingPlan", "ShardEmbeddings"]

_BATCH = 32  # images per forward pass: a CPU's throughput flattens out well before this


@dataclass
class EmbeddingPlan:
    """What pass 1 embeds with (``model``) and what it may reuse (``kept``: the source's kept embeddings)."""

    model: str
    kept: KeptEmbeddings | None = None
    _embedder: ClipEmbedder | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_embedder": None}  # each worker loads its own, when it first needs it

    def embedder(self) -> ClipEmbedder:
        if self._embedder is None:
            self._embedder = ClipEmbedder(self.model)
        return self._embedder

    def start(self, shard_id: int) -> ShardEmbeddings:
        return ShardEmbeddings(self, self.kept.shard(shard_id) if self.kept is not None else {})


class ShardEmbeddings:
    """One shard's embeddings as its samples go by: kept ones copied, the others embedded a batch at a time."""

    def __init__(self, plan: EmbeddingPlan, kept: dict[str, np.ndarray]) -> None:
        self.plan = plan
        self.kept = kept
        self.keys: list[str] = []
        self.vectors: list[np.ndarray] = []
        self.pending: list[tuple[str, Image.Image]] = []
        self.reused = 0
        self.computed = 0
        self.calls = 0

    def add(self, sample: Sample) -> None:
        vector = self.kept.get(sample.key)
        if vector is not None:
            self.keys.append(sample.key)
            self.vectors.append(vector[None, :])
            self.reused += 1
            return
        try:
            image = Image.open(io.BytesIO(sample.image or b"")).convert("RGB")
        except Exception:  # noqa: BLE001 - an image that cannot be decoded has no embedding; its hashes say so
            return
        self.pending.append((sample.key, image))
        if len(self.pending) >= _BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        embedder = self.plan.embedder()
        before = embedder.image_calls
        rows = embedder.embed_images([image for _, image in self.pending])
        self.calls += embedder.image_calls - before
        self.keys.extend(key for key, _ in self.pending)
        self.vectors.append(rows)
        self.computed += len(self.pending)
        self.pending = []

    def finish(self, dst: Dataset, shard_id: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Stage the sidecar in ``dst``: (files for ``ShardWriter.commit``, the shard's embedding stats).
        A shard without any embedding has no sidecar."""
        self._flush()
        stats = {
            "embeddings": {"model": self.plan.model, "reused": self.reused, "computed": self.computed, "model_calls": self.calls}
        }
        if not self.keys:
            return {}, stats
        name = embeddings_name(shard_id)
        staged = dst.staging_file(name)
        write_embeddings(staged, self.keys, np.concatenate(self.vectors), self.plan.model)
        return {name: staged}, stats
