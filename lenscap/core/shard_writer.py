"""Writing one shard of a dataset: its rows (and, where the dataset holds its images, a tar of them),
staged, then committed whole (``Dataset.commit``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from lenscap.core.commits import Source
from lenscap.core.image_source import add_sample
from lenscap.core.layout import IMAGE_COLUMNS, IMAGE_OFFSET, IMAGE_SIZE, parquet_name, tar_name
from lenscap.core.manifest import shard_stats
from lenscap.core.record import Sample
from lenscap.core.tario import TarOut

if TYPE_CHECKING:
    from lenscap.core.dataset import Dataset

__all__ = ["ShardWriter"]


def _rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema | None) -> pa.Table:
    """Rows to a table: the schema's columns first, with its types; any other column a row has, after."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    typed = schema.names if schema is not None else []
    names = typed + [n for n in names if n not in typed]
    types = {f.name: f.type for f in IMAGE_COLUMNS} | ({f.name: f.type for f in schema} if schema is not None else {})
    arrays = [pa.array([r.get(n) for r in rows], type=types.get(n)) for n in names]
    return pa.Table.from_arrays(arrays, names=names)


class ShardWriter:
    """Writes one shard under temporary names; ``commit`` makes it visible and complete.

    With ``copy_images`` the shard holds its images (a tar of KEY.jpg, KEY.txt, KEY.json per sample
    with an image, as img2dataset writes) and each row's offsets point into it; without, no tar is
    written and a row keeps the offsets it came with (into the dataset holding the images), or
    loses them where the sample lost its image. Memory holds the shard's parquet rows (no image
    bytes): bounded by the shard size, not the dataset.
    """

    def __init__(self, dataset: Dataset, shard_id: int, schema: pa.Schema | None = None, copy_images: bool = True) -> None:
        self.dataset = dataset
        self.shard_id = shard_id
        self.schema = schema
        self.rows: list[dict[str, Any]] = []
        self._tar_tmp = dataset.staging_file(tar_name(shard_id))
        self._parquet_tmp = dataset.staging_file(parquet_name(shard_id))
        self._tar = TarOut(self._tar_tmp) if copy_images else None
        if copy_images and schema is not None and IMAGE_OFFSET not in schema.names:
            self.schema = pa.schema([*schema, *IMAGE_COLUMNS])

    def write(self, sample: Sample) -> None:
        row = {**sample.row, "key": sample.key}
        if not sample.ok:
            if self._tar is not None or IMAGE_OFFSET in row:  # rows of samples, not a stage's own records
                row[IMAGE_OFFSET] = row[IMAGE_SIZE] = None
        elif self._tar is not None:
            image = sample.image
            assert image is not None
            row[IMAGE_OFFSET], row[IMAGE_SIZE] = add_sample(self._tar, sample.key, image, sample.row)
        elif row.get(IMAGE_OFFSET) is None:  # a lenscap bug, never a user's: new image bytes need a copy
            raise RuntimeError(f"sample {sample.key} has an image but no offset; a stage that makes images writes a copy")
        self.rows.append(row)

    def commit(self, extra_stats: dict[str, Any] | None = None, sidecars: dict[str, Source] | None = None) -> dict[str, Any]:
        """Commit the shard; ``sidecars``: more files of it (name -> staged file), committed in the same step."""
        table = _rows_to_table(self.rows, self.schema)
        pq.write_table(table, self._parquet_tmp)
        stats = shard_stats(self.shard_id, table) | (extra_stats or {})
        files: dict[str, Source] = dict(sidecars or {})
        if self._tar is not None:
            self._tar.close()
            files[tar_name(self.shard_id)] = self._tar_tmp
        files[parquet_name(self.shard_id)] = self._parquet_tmp
        return self.dataset.commit(self.shard_id, files, stats)

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._tar_tmp.unlink(missing_ok=True)
        self._parquet_tmp.unlink(missing_ok=True)
