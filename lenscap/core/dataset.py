"""A dataset directory, read and written through one filesystem interface.

A dataset is a local path or a URL on an fsspec filesystem (``s3://bucket/ds``, ``gs://...``,
``memory://ds``; see ``lenscap.core.storage``); either way ``fs`` and ``root`` name it (a local path is
fsspec's local filesystem, as datatrove's DataFolder does it), so every read (listing, stats, the
manifest, parquet rows, one image by a ranged read) has one code path. Its parts live in small
modules: the names of its files (``lenscap.core.layout``), crash-safe commits (``lenscap.core.commits``), the
manifest and shard stats (``lenscap.core.manifest``), where its images are (``lenscap.core.image_source``), and the
local mirror a remote dataset's shards are written to before upload (``lenscap.core.mirror``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from lenscap.core import commits as journal
from lenscap.core import mirror
from lenscap.core.errors import DatasetError
from lenscap.core.image_source import TarReader, add_sample, image_locations, images_ref, open_image_source, with_locations
from lenscap.core.layout import (
    IMAGE_COLUMNS,
    IMAGE_OFFSET,
    IMAGE_SIZE,
    MANIFEST_NAME,
    WORK_DIR_NAME,
    adopt_old_work_dir,
    completed_in,
    parquet_name,
    shard_name,
    shards_in,
    stats_name,
    tar_name,
)
from lenscap.core.manifest import build_manifest, shard_stats
from lenscap.core.record import Sample
from lenscap.core.storage import is_remote, local_path, redact_url, url_to_fs
from lenscap.core.tario import TarOut

__all__ = ["Dataset", "ShardWriter", "read_parquet"]


def read_parquet(path: str | os.PathLike[str], columns: list[str] | None = None) -> pa.Table:
    """Read one local parquet file. ``pq.read_table`` would import pyarrow.dataset and pandas (0.3 s of
    CPU in every process that reads a shard); one file needs neither."""
    return pq.ParquetFile(path).read(columns=columns)


def _local_fs() -> Any:
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem()


class Dataset:
    """A dataset directory on a filesystem: ``fs`` and ``root`` (the path on it).

    ``remote``: on a filesystem other than the local one. ``path`` is the local directory that shards
    are committed into and that holds the private work directory ``.lenscap/``: the dataset itself,
    or a remote dataset's mirror (``lenscap.core.mirror``). ``location`` is what to show and record (a URL
    without credentials); ``storage_options`` are passed to fsspec and never recorded.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        mirror_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self._spec = os.fspath(path)
        self.storage_options = dict(storage_options or {})
        self.remote = is_remote(self._spec)
        if self.remote:
            self.fs, self.root = url_to_fs(self._spec, self.storage_options)
            self.location = redact_url(self._spec).rstrip("/")
            self.path = Path(mirror_path) if mirror_path is not None else mirror.mirror_dir(self.resolved)
        else:
            self.path = Path(local_path(self._spec))
            self.fs, self.root = _local_fs(), os.path.abspath(self.path)
            self.location = str(self.path)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (to worker processes, Ray tasks) as what it was opened from, not as an open filesystem;
        # with the mirror the driver chose, so all workers of a run agree on it (LENSCAP_WORK_DIR may
        # be set only where the command was typed).
        return (Dataset, (self._spec, self.storage_options, self.path if self.remote else None))

    @property
    def resolved(self) -> str:
        """One name per dataset, to tell two apart: the absolute path (links resolved), or the canonical URL."""
        if not self.remote:
            return str(self.path.resolve())
        return redact_url(self.fs.unstrip_protocol(self.root))

    def mirror(self) -> Dataset:
        """The local dataset that shards of this one are committed into: itself when local. (On a node of
        a cluster other than the driver's, a remote dataset's mirror is created here.)"""
        if not self.remote:
            return self
        (self.path / WORK_DIR_NAME).mkdir(parents=True, exist_ok=True)
        return Dataset(self.path)

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str] | Dataset, storage_options: dict[str, Any] | None = None) -> Dataset:
        """Open ``path`` for writing, creating it (and a remote one's mirror) if needed."""
        if isinstance(path, Dataset):
            path, storage_options = path._spec, path.storage_options
        ds = cls(path, storage_options)
        try:
            if ds.fs.isfile(ds.root):
                raise DatasetError(f"output directory {ds.location} exists and is a file")
            ds.fs.makedirs(ds.root, exist_ok=True)
        except OSError as e:
            raise DatasetError(f"cannot create output directory {ds.location}: {e.strerror or e}") from None
        p = ds.path
        if p.exists() and not p.is_dir():
            raise DatasetError(f"output directory {p} exists and is a file")
        adopt_old_work_dir(p)
        try:
            (p / WORK_DIR_NAME).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatasetError(f"cannot create output directory {p}: {e.strerror}") from None
        return ds

    @classmethod
    def open(cls, path: str | os.PathLike[str] | Dataset, storage_options: dict[str, Any] | None = None) -> Dataset:
        """Open an existing dataset directory for reading."""
        if isinstance(path, Dataset):
            path, storage_options = path._spec, path.storage_options
        ds = cls(path, storage_options)
        try:
            if not ds.fs.exists(ds.root):
                raise DatasetError(f"dataset directory {ds.location} does not exist")
            if ds.fs.isfile(ds.root):
                raise DatasetError(f"{ds.location} is a file, not a dataset directory")
            if not ds.fs.exists(ds.file(MANIFEST_NAME)) and not ds.shard_ids():
                raise DatasetError(f"{ds.location} is not a dataset directory (no shards and no {MANIFEST_NAME})")
        except OSError as e:
            raise DatasetError(f"cannot read {ds.location}: {e.strerror or e}") from None
        return ds

    # -- paths ----------------------------------------------------------------------------------

    def file(self, name: str) -> str:
        """A file of the dataset (``name`` relative to it, ``/``-separated), as its filesystem names it."""
        return f"{self.root.rstrip('/')}/{name}"

    @property
    def work_dir(self) -> Path:
        return self.path / WORK_DIR_NAME

    def _local(self) -> Path:
        if self.remote:  # a bug in lenscap: remote shards are written to the mirror, and read through fs
            raise RuntimeError(f"{self.location} is remote: write its shards to Dataset.mirror()")
        return self.path

    def tar_path(self, shard_id: int) -> Path:
        return self._local() / tar_name(shard_id)

    def parquet_path(self, shard_id: int) -> Path:
        return self._local() / parquet_name(shard_id)

    def stats_path(self, shard_id: int) -> Path:
        return self._local() / stats_name(shard_id)

    def tmp_path(self, shard_id: int, ext: str) -> Path:
        return self._local() / f".{shard_name(shard_id)}.{ext}.tmp"

    # -- listing --------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The names in the dataset directory (not below it)."""
        self.fs.invalidate_cache(self.root)  # other processes write here: never a stale listing
        try:
            return [_basename(p) for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []

    def completed_ids(self) -> list[int]:
        """Shards whose ``_stats.json`` exists: complete, never to be redone."""
        return completed_in(self.names())

    def shard_ids(self) -> list[int]:
        """Every shard with any file present, complete or not."""
        return shards_in(self.names())

    def incomplete_ids(self, expected: Iterable[int] | None = None) -> list[int]:
        """Shards not complete: those expected (or present) without ``_stats.json``."""
        done = set(self.completed_ids())
        candidates = set(self.shard_ids()) if expected is None else set(expected)
        return sorted(candidates - done)

    def is_complete(self, shard_id: int) -> bool:
        self.fs.invalidate_cache(self.root)
        return bool(self.fs.exists(self.file(stats_name(shard_id))))

    # -- reading --------------------------------------------------------------------------------

    def read_stats(self, shard_id: int) -> dict[str, Any]:
        return self._parse_stats(shard_id, self.fs.cat_file(self.file(stats_name(shard_id))))

    def _parse_stats(self, shard_id: int, blob: bytes) -> dict[str, Any]:
        try:
            stats = json.loads(blob)
        except ValueError:
            stats = None
        if not isinstance(stats, dict):
            raise DatasetError(
                f"{self.location}/{stats_name(shard_id)} is not a stats file lenscap wrote ({len(blob)} bytes); "
                "delete it to have the stage that wrote the shard write it again"
            )
        return stats

    def _stats_blobs(self, ids: list[int]) -> list[bytes]:
        """The raw stats files of shards ``ids``, in order: one call (concurrent on object stores)."""
        if not ids:
            return []
        by_name = {_basename(p): b for p, b in self.fs.cat([self.file(stats_name(i)) for i in ids]).items()}
        return [by_name[stats_name(i)] for i in ids]

    def read_all_stats(self, ids: list[int]) -> list[dict[str, Any]]:
        """The stats of shards ``ids``, in order."""
        return [self._parse_stats(i, blob) for i, blob in zip(ids, self._stats_blobs(ids), strict=True)]

    def file_sizes(self) -> dict[str, int]:
        """The size of each file in the dataset directory (not below it), by name: one listing."""
        self.fs.invalidate_cache(self.root)
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return {}
        return {_basename(e["name"]): int(e.get("size") or 0) for e in entries if e.get("type") != "directory"}

    def damaged_shards(self, ids: list[int] | None = None) -> dict[int, str]:
        """Completed shards (``ids``, default all) that are not what their stats recorded: a file missing,
        or of another size (truncated, emptied, replaced since), or a stats file that is not one; id: why.
        A shard written before sizes were recorded needs a non-empty parquet file."""
        ids = self.completed_ids() if ids is None else ids
        if not ids:
            return {}
        sizes = self.file_sizes()
        damaged: dict[int, str] = {}
        for shard_id, blob in zip(ids, self._stats_blobs(ids), strict=True):
            try:
                stats = self._parse_stats(shard_id, blob)
            except DatasetError:
                damaged[shard_id] = f"{stats_name(shard_id)} is not a stats file lenscap wrote"
                continue
            files = stats.get("files")
            if not isinstance(files, dict):
                files = {parquet_name(shard_id): None}
            for name, size in files.items():
                got = sizes.get(name)
                if got is None or (size is None and got == 0):
                    damaged[shard_id] = f"{name} is {'missing' if got is None else 'empty'}"
                    break
                if size is not None and got != size:
                    damaged[shard_id] = f"{name} has {got} bytes, not the {size} written"
                    break
        return damaged

    def discard(self, shard_id: int) -> None:
        """Make a completed shard incomplete (its stats file goes), so that it is written again."""
        self.fs.rm_file(self.file(stats_name(shard_id)))

    def open_shard_file(self, name: str) -> IO[bytes]:
        """One of the dataset's files, for reading (``FileNotFoundError`` if missing)."""
        return self.fs.open(self.file(name), "rb")

    def open_tar(self, shard_id: int) -> IO[bytes]:
        """The shard's tar, for reading by offset (a remote one by ranges, not whole: images are read in
        key order, which is near the tar's order but not it, so a small read-ahead, not the filesystem's
        default block of tens of MB for every jump)."""
        return self.fs.open(self.file(tar_name(shard_id)), "rb", block_size=2**21, cache_type="readahead")

    def _parquet(self, shard_id: int) -> pq.ParquetFile:
        # Through pyarrow's own filesystem for a local path (memory-mapped reads, no Python in the loop).
        return pq.ParquetFile(self.file(parquet_name(shard_id)), filesystem=self.fs)

    def read_table(self, shard_id: int, columns: list[str] | None = None) -> pa.Table:
        try:
            return self._parquet(shard_id).read(columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"cannot read {self.location}/{parquet_name(shard_id)}: {e}") from None

    def iter_batches(self, shard_id: int, columns: list[str], batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
        """The shard's rows ``batch_size`` at a time (memory holds one batch, not the shard)."""
        try:
            yield from self._parquet(shard_id).iter_batches(batch_size=batch_size, columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"cannot read {self.location}/{parquet_name(shard_id)}: {e}") from None

    def read_metadata(self, shard_id: int) -> pq.FileMetaData:
        """The shard's parquet footer: row count and schema, without reading any data."""
        try:
            return self._parquet(shard_id).metadata
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"cannot read {self.location}/{parquet_name(shard_id)}: {e}") from None

    def read_schema(self, shard_id: int) -> pa.Schema:
        return self.read_metadata(shard_id).schema.to_arrow_schema()

    def read_json(self, name: str) -> Any:
        """A JSON file of the dataset (``name`` relative to it), or None if there is none."""
        try:
            return json.loads(self.fs.cat_file(self.file(name)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read {self.location}/{name}: {e}") from None

    def read_manifest(self) -> dict[str, Any] | None:
        return self.read_json(MANIFEST_NAME)

    def disk_usage(self) -> tuple[int, int]:
        """Bytes in shard files, and in all (a local dataset's private work directory included)."""
        shard_bytes = total = 0
        self.fs.invalidate_cache(self.root)
        prefix = self.root.rstrip("/") + "/"
        for path, info in self.fs.find(self.root, detail=True).items():
            size = int(info.get("size") or 0)
            total += size
            rel = path[len(prefix) :] if path.startswith(prefix) else path
            if "/" not in rel and rel.endswith((".tar", ".parquet", "_stats.json")):
                shard_bytes += size
        return shard_bytes, total

    # -- images ---------------------------------------------------------------------------------

    def image_source(self) -> Dataset:
        """The dataset whose tars hold this dataset's images: itself, or the one its manifest names
        (checked: ``lenscap.core.image_source.open_image_source``)."""
        cached = self.__dict__.get("_image_source")
        if cached is None:
            cached = self.__dict__["_image_source"] = open_image_source(self, (self.read_manifest() or {}).get("images"))
        return cached

    def images_ref(self, out: Dataset) -> dict[str, Any]:
        """What ``out``'s manifest records to read its images from this dataset's image source."""
        return images_ref(self.image_source(), out)

    def image_locations(self, shard_id: int, table: pa.Table) -> tuple[list[int | None], list[int | None]]:
        """(offsets, sizes) of the images of ``table`` (shard ``shard_id``'s rows), in row order, in
        the image source's tar; None where a row has no image."""
        tar = TarReader(self.image_source(), shard_id)
        try:
            return image_locations(table, tar)
        finally:
            tar.close()

    def with_image_locations(self, shard_id: int, table: pa.Table) -> pa.Table:
        """``table`` (shard ``shard_id``'s rows) with ``image_offset``/``image_size``, found in the tar's
        headers where the rows do not have them yet (a shard as img2dataset writes it)."""
        if IMAGE_OFFSET in table.column_names:
            return table
        return with_locations(table, *self.image_locations(shard_id, table))

    def read_image(self, shard_id: int, key: str, offset: int, size: int) -> bytes:
        """One image, by where its row says it lies."""
        tar = TarReader(self.image_source(), shard_id)
        try:
            return tar.read(key, offset, size)
        finally:
            tar.close()

    def iter_samples(self, shard_id: int) -> Iterator[Sample]:
        """Samples of one shard in parquet row order; each image is read from the image source's tar
        only when a stage asks for it, by the offset in its row."""
        table = self.read_table(shard_id)
        tar = TarReader(self.image_source(), shard_id)
        try:
            offsets, sizes = image_locations(table, tar)
            if IMAGE_OFFSET not in table.column_names:
                table = with_locations(table, offsets, sizes)
            i = 0
            for batch in table.to_batches(max_chunksize=1024):
                for row in batch.to_pylist():
                    key, offset, size = str(row["key"]), offsets[i], sizes[i]
                    i += 1
                    load = None if offset is None else tar.loader(key, offset, size)
                    yield Sample(key=key, row=row, load=load)
        finally:
            tar.close()

    # -- writing --------------------------------------------------------------------------------

    def writer(self, shard_id: int, schema: pa.Schema | None = None, copy_images: bool = True) -> ShardWriter:
        return ShardWriter(self, shard_id, schema, copy_images)

    def commit(self, shard_id: int, renames: list[tuple[Path, Path]], stats: dict[str, Any]) -> dict[str, Any]:
        """Move finished files into place and mark the shard complete, crash-safely (``lenscap.core.commits``);
        returns the stats written."""
        return journal.commit(self._local(), shard_id, renames, stats)

    def recover(self) -> int:
        """Finish commits that a crash interrupted; remove stray temporary files. Returns commits finished."""
        return mirror.recover(self)

    def recover_shard(self, shard_id: int) -> bool:
        """Finish one shard's commit that a crash interrupted; True if there was one."""
        return journal.recover_shard(self.path, shard_id)

    def upload_shard(self, shard_id: int) -> dict[str, Any]:
        """Put a shard committed in the mirror where it belongs; its stats (``lenscap.core.mirror``)."""
        return mirror.upload_shard(self, shard_id)

    def put_bytes(self, name: str, data: bytes) -> None:
        """Write a small file of the dataset whole: readers see the old one or the new one."""
        if self.remote:
            self.fs.pipe_file(self.file(name), data)  # one object: whole or not at all
        else:
            journal.atomic_write_bytes(self.path / name, data)

    def write_manifest(
        self,
        stage: str,
        parameters: dict[str, Any],
        input_path: str | None,
        *,
        expected_shards: int | None = None,
        history: list[dict[str, Any]] | None = None,
        images: dict[str, Any] | None = None,
        input_incomplete: list[int] | None = None,
    ) -> dict[str, Any]:
        """Write ``lenscap.json`` from the shards present (``lenscap.core.manifest``)."""
        completed = self.completed_ids()
        manifest = build_manifest(
            self.read_manifest() or {},
            stage,
            parameters,
            input_path,
            completed=len(completed),
            stats=self.read_all_stats(completed),
            schema=self.read_schema(completed[0]) if completed else None,
            expected_shards=expected_shards,
            history=history,
            images=images,
            input_incomplete=input_incomplete,
        )
        self.__dict__.pop("_image_source", None)
        self.put_bytes(MANIFEST_NAME, json.dumps(manifest, indent=2, default=str).encode() + b"\n")
        return manifest


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


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
        self._tar_tmp = dataset.tmp_path(shard_id, "tar")
        self._parquet_tmp = dataset.tmp_path(shard_id, "parquet")
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

    def commit(self, extra_stats: dict[str, Any] | None = None) -> dict[str, Any]:
        table = _rows_to_table(self.rows, self.schema)
        pq.write_table(table, self._parquet_tmp)
        stats = shard_stats(self.shard_id, table) | (extra_stats or {})
        d = self.dataset
        renames = [(self._parquet_tmp, d.parquet_path(self.shard_id))]
        if self._tar is not None:
            self._tar.close()
            renames.insert(0, (self._tar_tmp, d.tar_path(self.shard_id)))
        return d.commit(self.shard_id, renames, stats)

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._tar_tmp.unlink(missing_ok=True)
        self._parquet_tmp.unlink(missing_ok=True)
