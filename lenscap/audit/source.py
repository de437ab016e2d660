"""What the audit reads: a lenscap dataset directory, or any local directory of Parquet files with a
caption column (a Hugging Face Parquet export, ``lenscap shard --format parquet``'s ``data/``,
another tool's output), each file read as one shard."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lenscap.core.dataset import Dataset
from lenscap.core.errors import DatasetError
from lenscap.core.schema import Column, check_shards

__all__ = ["ParquetFiles", "open_captioned"]

# What the audit reads of every shard (a key of any type: another tool's Parquet files are read too).
_READS = (Column("key", "any"), Column("caption", "string"))


class ParquetFiles:
    """Parquet files as the shards of a read-only dataset, with the reading methods the audit uses."""

    def __init__(self, root: Path, files: list[Path]) -> None:
        self.location = str(root)
        self.files = files

    def completed_ids(self) -> list[int]:
        return list(range(len(self.files)))

    def damaged_shards(self) -> dict[int, str]:
        return {}

    def incomplete_ids(self, expected: Any = None) -> list[int]:
        return []

    def read_manifest(self) -> dict[str, Any] | None:
        return None

    def read_schema(self, shard_id: int) -> pa.Schema:
        return self._file(shard_id).schema_arrow

    def read_table(self, shard_id: int, columns: list[str] | None = None) -> pa.Table:
        return self._file(shard_id).read(columns=columns)

    def iter_batches(self, shard_id: int, columns: list[str], batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
        yield from self._file(shard_id).iter_batches(batch_size=batch_size, columns=columns)

    def _file(self, shard_id: int) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(self.files[shard_id])
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"cannot read {self.files[shard_id]}: {e}") from None


def open_captioned(path: str | os.PathLike[str]) -> Dataset | ParquetFiles:
    """The dataset at ``path`` if it has complete, undamaged shards; else, for a local directory, its
    Parquet files (outside ``.lenscap``). Either way, one with a caption column, or a ``DatasetError``."""
    try:
        ds: Dataset | ParquetFiles | None = Dataset.open(path)
    except DatasetError:
        if not Path(path).is_dir():
            raise
        ds = None
    if ds is not None:
        damaged = ds.damaged_shards()  # the scan skips them too; inspect names them
        if not [i for i in ds.completed_ids() if i not in damaged]:
            ds = None if Path(path).is_dir() and not ds.shard_ids() else ds
    if ds is None:
        files = sorted(p for p in Path(path).rglob("*.parquet") if ".lenscap" not in p.parts)
        if not files:
            raise DatasetError(
                f"{path} has no complete shards and no Parquet files to audit (a WebDataset export: "
                "audit the dataset it was exported from)"
            )
        ds = ParquetFiles(Path(path), files)
    shards = [i for i in ds.completed_ids() if i not in ds.damaged_shards()]
    if not shards:
        raise DatasetError(
            f"{ds.location} has no complete shards to audit (an export's: audit the dataset it was "
            "exported from, or its Parquet export)"
        )
    schema = ds.read_schema(shards[0])
    if "caption" not in schema.names:
        raise DatasetError(f"{ds.location} has no caption column: nothing to audit")
    kind = schema.field("caption").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):  # null: no caption yet
        raise DatasetError(f"{ds.location}'s caption column holds {schema.field('caption').type}, not text")
    check_shards(ds, shards, _READS, "audit")  # every shard's, as the first one's: before any work
    return ds
