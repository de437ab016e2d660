"""Small dataset directories written directly (no download): fixtures for tests and benchmarks."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
from PIL import Image

from lenscap.core.dataset import Dataset
from lenscap.core.record import SUCCESS, Sample
from lenscap.demo.pictures import jpeg_bytes, scene, scene_caption

__all__ = ["write_image_dataset", "DOWNLOAD_SCHEMA"]

DOWNLOAD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
    ]
)


def _size(data: bytes) -> tuple[int | None, int | None]:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # noqa: BLE001 - a deliberately broken image in a fixture
        return None, None


def write_image_dataset(
    path: str | Path,
    n: int,
    per_shard: int = 100,
    size: tuple[int, int] = (320, 240),
    caption: Callable[[int], str] = scene_caption,
    image: Callable[[int], bytes] | None = None,
    failed: Callable[[int], bool] = lambda i: False,
) -> Dataset:
    """``n`` samples as a download stage would write them; ``failed(i)`` marks failed downloads."""
    ds = Dataset.create(path)
    make = image or (lambda i: jpeg_bytes(scene(i, size)))
    for shard_id, start in enumerate(range(0, n, per_shard)):
        writer = ds.writer(shard_id, DOWNLOAD_SCHEMA)
        for i in range(start, min(n, start + per_shard)):
            ok = not failed(i)
            data = make(i) if ok else None
            width, height = _size(data) if data is not None else (None, None)
            row = {
                "url": f"http://example.invalid/{i}.jpg",
                "caption": caption(i),
                "status": SUCCESS if ok else "failed_to_download",
                "error_message": None if ok else "HTTP Error 404: Not Found",
                "width": width,
                "height": height,
            }
            writer.write(Sample(f"{i:09d}", row, data))
        writer.commit({"stage": "download"})
    ds.write_manifest("download", {"generated": True}, None, expected_shards=(n + per_shard - 1) // per_shard)
    return ds
