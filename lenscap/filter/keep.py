"""The image embeddings a filter's annotators used, kept with its output so a later pass (``dedup
--semantic``, another filter) reads them instead of running CLIP's image tower again.

One model per dataset directory (``lenscap.embed.store``'s layout holds one): the stage keeps the
vectors of one model, and this collects them for one shard, computed or reused from upstream alike,
so the output's sidecar covers every sample the filter embedded (``KeptEmbeddings.find`` stops at the
nearest dataset with that model's sidecars). The sidecar is staged here and committed with the
shard's rows (``ShardWriter.commit``), so a kill never leaves one without the other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lenscap.core.dataset import Dataset
from lenscap.embed.store import embeddings_name, write_embeddings

__all__ = ["ShardEmbeddingKeeper"]


class ShardEmbeddingKeeper:
    """One shard's image embeddings of ``model``, by key (the first recorded for a key wins)."""

    def __init__(self, model: str) -> None:
        self.model = model
        # float16 already: what the sidecar keeps, at half the memory of the shard's float32 vectors.
        self.vectors: dict[str, np.ndarray] = {}

    def add(self, key: str, vector: np.ndarray) -> None:
        self.vectors.setdefault(key, np.asarray(vector, dtype=np.float16))

    def stage(self, dst: Dataset, shard_id: int) -> dict[str, Path]:
        """The shard's sidecar, staged in ``dst``: ``{name: staged file}`` for ``ShardWriter.commit``
        (nothing when no sample was embedded)."""
        if not self.vectors:
            return {}
        name = embeddings_name(shard_id)
        staged = dst.staging_file(name)
        write_embeddings(staged, list(self.vectors), np.stack(list(self.vectors.values())), self.model)
        return {name: staged}
