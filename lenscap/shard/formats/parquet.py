"""Parquet: ``data/train-NNNNN-of-MMMMM.parquet`` (the Hugging Face Hub's naming), the image as the
``datasets`` ``Image`` struct ``{bytes, path}`` with the feature recorded in the schema metadata, so
``datasets.load_dataset`` decodes it; row groups of at most ``ROW_GROUP_BYTES``, so a reader never
holds more than that of one file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from lenscap.core.card import HF_DTYPES
from lenscap.core.layout import IMAGE_EXT
from lenscap.shard.formats.base import ExportFormat

if TYPE_CHECKING:
    from lenscap.core.dataset import Dataset

__all__ = ["ParquetShard", "ROW_GROUP_BYTES", "IMAGE_TYPE"]

ROW_GROUP_BYTES = 100_000_000
# The datasets library reads features from this schema metadata; the other columns it infers.
_HF_METADATA = {"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}})}
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


class ParquetShard(ExportFormat):
    name = "parquet"
    described = "parquet (data/train-*.parquet, the Hugging Face Image feature)"
    data_files = "data/train-*.parquet"
    hf_builder = "parquet"

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
        self._rows.append({**row, "key": key, "image": {"bytes": image, "path": f"{key}.{IMAGE_EXT}"}})
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

    @classmethod
    def card_features(cls, columns: pa.Schema) -> list[str] | None:
        if not all(f.type in HF_DTYPES for f in columns):  # a partial list would fail the load: all or none
            return None
        lines = ["  features:", "  - name: key", "    dtype: string", "  - name: image", "    dtype: image"]
        return lines + [line for f in columns for line in (f"  - name: {json.dumps(f.name)}", f"    dtype: {HF_DTYPES[f.type]}")]

    @classmethod
    def card_files(cls) -> list[str]:
        return [
            "`data/train-NNNNN-of-MMMMM.parquet`: one row per sample; `image` is the `datasets` Image feature "
            "(`{bytes, path}`), decoded on access.",
            "",
        ]

    @classmethod
    def card_columns(cls) -> list[str]:
        return ["| image | image |"]

    @classmethod
    def file_sizes(cls, ds: Dataset) -> dict[str, int]:
        prefix = ds.root.rstrip("/") + "/data/"
        try:
            found = ds.fs.find(ds.root.rstrip("/") + "/data", detail=True)
        except (FileNotFoundError, OSError):
            return {}
        return {
            "data/" + path[len(prefix) :]: int(info.get("size") or 0)
            for path, info in found.items()
            if path.startswith(prefix) and path.endswith(".parquet") and not path[len(prefix) :].startswith(".")
        }

    @classmethod
    def sample_locations(cls, path: Path) -> Iterator[tuple[str, Any]]:
        pf = pq.ParquetFile(path)
        for group in range(pf.num_row_groups):
            for row, key in enumerate(pf.read_row_group(group, columns=["key"]).column("key").to_pylist()):
                yield str(key), (group, row)

    @classmethod
    def read_sample(cls, path: Path, where: Any) -> tuple[bytes, dict[str, Any]]:
        group, row = where
        record = pq.ParquetFile(path).read_row_group(group).slice(row, 1).to_pylist()[0]
        image = (record.pop("image", None) or {}).get("bytes") or b""
        return image, record
