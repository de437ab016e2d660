"""The two export formats, one writer class each, and what a sample costs in each.

WebDataset: ``NNNNN.tar`` with ``KEY.jpg``, ``KEY.txt`` (the caption) and ``KEY.json`` (the other
columns), as img2dataset and webdataset expect. Parquet: ``data/train-NNNNN-of-MMMMM.parquet`` (the
Hugging Face Hub's naming), the image as the ``datasets`` ``Image`` struct ``{bytes, path}`` with
the feature recorded in the schema metadata, so ``datasets.load_dataset`` decodes it; row groups of
at most ``ROW_GROUP_BYTES``, so a reader never holds more than that of one file.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from lenscap.core.tario import TarOut

__all__ = ["FORMATS", "ShardFile", "WebDatasetShard", "ParquetShard", "metadata_json"]

ROW_GROUP_BYTES = 100_000_000
_BLOCK = 512
# The datasets library reads features from this schema metadata; the other columns it infers.
_HF_METADATA = {"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}})}
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def metadata_json(key: str, row: dict[str, Any]) -> bytes:
    """``KEY.json``: the key and every exported column but the caption (which is ``KEY.txt``)."""
    return json.dumps({"key": key, **{k: v for k, v in row.items() if k not in ("key", "caption")}}, default=str).encode()


def _padded(n: int) -> int:
    return -(-n // _BLOCK) * _BLOCK


class ShardFile(ABC):
    """One output shard, written under a temporary name; ``close`` returns its size in bytes."""

    name: ClassVar[str]

    def __init__(self, path: Path, columns: pa.Schema) -> None:
        self.path = path
        self.columns = columns  # the exported columns, caption included, key and image not

    @staticmethod
    @abstractmethod
    def file_name(shard_id: int, shards: int) -> str: ...

    @staticmethod
    @abstractmethod
    def planned_bytes(image: int, caption: int, metadata: int) -> int:
        """What one sample adds to a shard: used to cut shards to the target size before writing."""

    @abstractmethod
    def write(self, key: str, row: dict[str, Any], src: BinaryIO, offset: int, size: int) -> None:
        """Add a sample whose image is ``size`` bytes of ``src`` (an input tar) at ``offset``."""

    @abstractmethod
    def close(self) -> int: ...

    @abstractmethod
    def abort(self) -> None: ...


class WebDatasetShard(ShardFile):
    name = "webdataset"

    def __init__(self, path: Path, columns: pa.Schema) -> None:
        super().__init__(path, columns)
        self._tar = TarOut(path)

    @staticmethod
    def file_name(shard_id: int, shards: int) -> str:
        return f"{shard_id:05d}.tar"

    @staticmethod
    def planned_bytes(image: int, caption: int, metadata: int) -> int:
        return 3 * _BLOCK + _padded(image) + _padded(caption) + _padded(metadata)

    def write(self, key: str, row: dict[str, Any], src: BinaryIO, offset: int, size: int) -> None:
        self._tar.add_from(f"{key}.jpg", src, offset, size)
        self._tar.add(f"{key}.txt", (row.get("caption") or "").encode())
        self._tar.add(f"{key}.json", metadata_json(key, row))

    def close(self) -> int:
        self._tar.close()
        return self.path.stat().st_size

    def abort(self) -> None:
        self._tar.close()
        self.path.unlink(missing_ok=True)


class ParquetShard(ShardFile):
    name = "parquet"

    def __init__(self, path: Path, columns: pa.Schema) -> None:
        super().__init__(path, columns)
        self.schema = pa.schema([pa.field("key", pa.string()), pa.field("image", IMAGE_TYPE), *columns], metadata=_HF_METADATA)
        # JPEG bytes do not compress: spend zstd on the text columns only.
        compression = {f.name: "zstd" for f in columns} | {"key": "zstd", "image.bytes": "none", "image.path": "zstd"}
        self._writer = pq.ParquetWriter(path, self.schema, compression=compression)
        self._rows: list[dict[str, Any]] = []
        self._pending = 0

    @staticmethod
    def file_name(shard_id: int, shards: int) -> str:
        return f"data/train-{shard_id:05d}-of-{shards:05d}.parquet"

    @staticmethod
    def planned_bytes(image: int, caption: int, metadata: int) -> int:
        return image + caption + metadata // 4  # images do not compress; text does, by about 4

    def write(self, key: str, row: dict[str, Any], src: BinaryIO, offset: int, size: int) -> None:
        src.seek(offset)
        image = src.read(size)
        self._rows.append({**row, "key": key, "image": {"bytes": image, "path": f"{key}.jpg"}})
        self._pending += len(image) + len(row.get("caption") or "")
        if self._pending >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
        self._rows, self._pending = [], 0

    def close(self) -> int:
        self._flush()
        self._writer.close()
        return self.path.stat().st_size

    def abort(self) -> None:
        self._writer.close()
        self.path.unlink(missing_ok=True)


FORMATS: dict[str, type[ShardFile]] = {cls.name: cls for cls in (WebDatasetShard, ParquetShard)}
