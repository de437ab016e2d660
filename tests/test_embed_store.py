"""Kept embeddings: a float16 sidecar per shard, found from a dataset downstream of the one that holds it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lenscap.core.dataset import Dataset
from lenscap.embed.store import KeptEmbeddings, embeddings_name, write_embeddings


def _dataset(tmp_path, name, keys, input_path=None):
    import json

    root = tmp_path / name
    root.mkdir()
    manifest = {"format": "lenscap-dataset/1", "stage": "test", "input": input_path, "history": []}
    (root / "lenscap.json").write_text(json.dumps(manifest))
    return Dataset.open(root)


def test_a_sidecar_round_trips_as_float16_and_is_found_through_the_input_chain(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    keys = [f"{i:09d}" for i in range(5)]
    upstream = _dataset(tmp_path, "up", keys)
    path = upstream.path / embeddings_name(0)
    path.parent.mkdir()
    write_embeddings(path, keys, vectors, "tiny-clip")
    downstream = _dataset(tmp_path, "down", keys, input_path=str(upstream.path))

    kept = KeptEmbeddings.find(downstream, "tiny-clip")
    assert kept is not None and kept.dataset.path == upstream.path and kept.dim == 8
    got = kept.shard(0)
    assert list(got) == keys
    assert np.allclose(np.stack(list(got.values())), vectors, atol=1e-3)
    assert kept.shard(1) == {}
    assert KeptEmbeddings.find(downstream, "another-model") is None


def test_the_embedder_loads_a_local_tiny_clip_and_gives_unit_vectors(tmp_path):
    pytest.importorskip("torch")
    from lenscap.embed.model import ClipEmbedder
    from tests.tiny_models import build_tiny_clip

    embedder = ClipEmbedder(str(build_tiny_clip(tmp_path / "clip")))
    images = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 0, 255))]
    rows = embedder.embed_images(images)
    assert rows.shape == (2, embedder.dim) and embedder.image_calls == 1
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert embedder.embed_texts(["a red square"]).shape == (1, embedder.dim)
