"""A dataset directory, read and written through one filesystem interface.

A dataset is a local path or a URL on an fsspec filesystem (``s3://bucket/ds``, ``gs://...``,
``memory://ds``; see ``lenscap.core.storage``); either way ``fs`` and ``root`` name it (a local path is
fsspec's local filesystem, as datatrove's DataFolder does it), so every read (listing, stats, the
manifest, parquet rows, one image by a ranged read) and every write (a staged file committed or put)
has one code path. Its parts live in small modules: the names of its files (``lenscap.core.layout``),
crash-safe commits (``lenscap.core.commits``), the manifest and shard stats (``lenscap.core.manifest``),
where its images are (``lenscap.core.image_source``), and the writer of one shard (``ShardWriter``).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from lenscap.core import commits, integrity
from lenscap.core.card import CARD_NAME, is_lenscap_card
from lenscap.core.checksums import HEAD_BYTES, FileDigest, digest_stream, head_digest
from lenscap.core.errors import DatasetError, disk_full
from lenscap.core.image_source import TarReader, image_locations, images_ref, open_image_source, with_locations
from lenscap.core.layout import (
    IMAGE_OFFSET,
    LOCK_ENTRIES,
    LOCK_NAME,
    MANIFEST_NAME,
    OWN_FOLDERS,
    SIDECAR_FOLDERS,
    WORK_DIR_NAME,
    adopt_old_work_dir,
    completed_in,
    parquet_name,
    shards_in,
    stats_name,
    tar_name,
    written_by_lenscap,
)
from lenscap.core.manifest import build_manifest
from lenscap.core.record import Sample
from lenscap.core.shard_writer import ShardWriter
from lenscap.core.storage import is_remote, local_path, redact_url, url_to_fs

__all__ = ["Dataset", "ShardWriter", "read_parquet"]


def read_parquet(path: str | os.PathLike[str], columns: list[str] | None = None) -> pa.Table:
    """Read one local parquet file. ``pq.read_table`` would import pyarrow.dataset and pandas (0.3 s of
    CPU in every process that reads a shard); one file needs neither."""
    return pq.ParquetFile(path).read(columns=columns)


def state_dir(canonical_url: str) -> Path:
    """The work directory (``.lenscap/``) of a remote dataset on this machine: under
    ``$LENSCAP_WORK_DIR/<sha256(url)[:16]>``, else ``$XDG_CACHE_HOME/lenscap/remote`` (``~/.cache/lenscap/remote``)."""
    base = os.environ.get("LENSCAP_WORK_DIR")
    if not base:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(cache, "lenscap", "remote")
    return Path(base) / hashlib.sha256(canonical_url.encode()).hexdigest()[:16] / WORK_DIR_NAME


class Dataset:
    """A dataset directory on a filesystem: ``fs`` and ``root`` (the path on it).

    ``location`` is what to show and record (a URL without credentials); ``storage_options`` are passed
    to fsspec and never recorded. ``work_dir`` is the private directory of the command that writes it
    (``.lenscap/``: its lock, claim, commit journals, journals of paid requests), always on this
    machine's disk: inside a local dataset, and for a remote one (``remote``) under
    ``$LENSCAP_WORK_DIR`` (``state_dir``), since an object store has no locks and no appends.

    Files are written through the dataset: staged locally (``staging_file``), then committed as a
    shard (``commit``) or put whole (``put``), which renames a local file into place and uploads a
    remote one; this module is the only place that tells the two apart.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        work_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._spec = os.fspath(path)
        self.storage_options = dict(storage_options or {})
        self.remote = is_remote(self._spec)
        if self.remote:
            self.fs, self.root = url_to_fs(self._spec, self.storage_options)
            self.location = redact_url(self._spec).rstrip("/")
            self.work_dir = Path(work_dir) if work_dir is not None else state_dir(self.resolved)
        else:
            local = Path(local_path(self._spec))
            self.fs, self.root = LocalFileSystem(), os.path.abspath(local)
            self.location = str(local)
            self.work_dir = local / WORK_DIR_NAME

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (to worker processes, Ray tasks) as what it was opened from, not as an open filesystem;
        # with the work directory the driver chose, so all workers of a run agree on it (LENSCAP_WORK_DIR
        # may be set only where the command was typed).
        return (Dataset, (self._spec, self.storage_options, self.work_dir if self.remote else None))

    @property
    def resolved(self) -> str:
        """One name per dataset, to tell two apart: the absolute path (links resolved), or the canonical URL."""
        if not self.remote:
            return str(Path(self.root).resolve())
        return redact_url(self.fs.unstrip_protocol(self.root))

    @property
    def url(self) -> str:
        """Where readers find it: the absolute path, or the URL (without credentials)."""
        return self.location if self.remote else self.root

    def relative_location(self, other: Dataset) -> str | None:
        """Where this dataset is, relative to ``other``, when both are on one filesystem that keeps
        relative places (local, or one bucket: the two may move together); else None."""
        if type(self.fs) is not type(other.fs) or (self.remote and _bucket(self) != _bucket(other)):
            return None
        return posixpath.relpath(self.root, other.root)

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str] | Dataset, storage_options: dict[str, Any] | None = None) -> Dataset:
        """Open ``path`` for writing, creating it (and its work directory) if needed."""
        if isinstance(path, Dataset):
            path, storage_options = path._spec, path.storage_options
        ds = cls(path, storage_options)
        try:
            if ds.fs.isfile(ds.root):
                raise DatasetError(f"output directory {ds.location} exists and is a file")
            ds.fs.makedirs(ds.root, exist_ok=True)
        except OSError as e:
            raise DatasetError(f"cannot create output directory {ds.location}: {e.strerror or e}") from None
        if not ds.remote:
            adopt_old_work_dir(Path(ds.root))
        try:
            ds.work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatasetError(f"cannot create output directory {ds.location}: {e.strerror}") from None
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

    def local_file(self, name: str) -> Path:
        """A file of a local dataset as a path (for DuckDB and pyarrow, which read local files faster)."""
        if self.remote:  # a bug in lenscap: a remote dataset's files are read through fs
            raise RuntimeError(f"{self.location} is remote: read {name} through Dataset.fs")
        return Path(self.root, name)

    @property
    def path(self) -> Path:
        """A local dataset's directory, as it was given."""
        if self.remote:  # a bug in lenscap: a remote dataset is reached through fs
            raise RuntimeError(f"{self.location} is remote: it has no local path")
        return Path(self.location)

    def tar_path(self, shard_id: int) -> Path:
        return self.local_file(tar_name(shard_id))

    def parquet_path(self, shard_id: int) -> Path:
        return self.local_file(parquet_name(shard_id))

    def stats_path(self, shard_id: int) -> Path:
        return self.local_file(stats_name(shard_id))

    def lock_file(self) -> Path:
        """The lock of the command that writes this dataset (``lenscap.core.lock``), in its work directory.
        A local dataset's private directory of lenscap before 0.2 (``_lenscap/``: journals of paid
        requests, job state) is renamed first, so nothing is asked again."""
        if not self.remote:
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise DatasetError(f"output directory {self.location} exists and is a file")
            adopt_old_work_dir(Path(self.root))
        return self.work_dir / LOCK_NAME

    def shared_dir(self, name: str) -> Path | str:
        """A directory every node of a cluster can write, for ``name``: the work directory's own for a
        local dataset (on a cluster, a shared filesystem), else a URL beside the dataset in its store."""
        if self.remote:
            return f"{self.fs.unstrip_protocol(self.root)}/{WORK_DIR_NAME}/{name}"
        return self.work_dir / name

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
        """The size of each file in the dataset directory, and in its folders of shard sidecars
        (``SIDECAR_FOLDERS``: ``embeddings/00000.parquet``), by name: one listing, and one a folder."""
        self.fs.invalidate_cache(self.root)
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return {}
        sizes = {_basename(e["name"]): int(e.get("size") or 0) for e in entries if e.get("type") != "directory"}
        for e in entries:
            folder = _basename(e["name"])
            if e.get("type") == "directory" and folder in SIDECAR_FOLDERS:
                inside = self.fs.ls(e["name"], detail=True)
                sizes |= {
                    f"{folder}/{_basename(f['name'])}": int(f.get("size") or 0) for f in inside if f.get("type") != "directory"
                }
        return sizes

    def tree_sizes(self) -> dict[str, int]:
        """Every file under the dataset directory, by name relative to it (``data/x.parquet``), with its size."""
        self.fs.invalidate_cache(self.root)  # other processes write here: never a stale listing
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        prefix = self.root.rstrip("/") + "/"
        return {path[len(prefix) :]: int(info.get("size") or 0) for path, info in found.items() if path.startswith(prefix)}

    def damaged_shards(self, ids: list[int] | None = None) -> dict[int, str]:
        """Completed shards (``ids``, default all) that are not what their commit wrote, by the cheap
        checks of ``lenscap.core.integrity`` (a stats file that is not this shard's, a file missing, of
        another size, or beginning with other bytes); id: why. One listing, the stats files, and a few
        KiB of each file, read concurrently from a store."""
        ids = self.completed_ids() if ids is None else ids
        if not ids:
            return {}
        sizes = self.file_sizes()
        damaged: dict[int, str] = {}
        sound: list[tuple[int, dict[str, Any]]] = []
        for shard_id, blob in zip(ids, self._stats_blobs(ids), strict=True):
            try:
                stats = self._parse_stats(shard_id, blob)
            except DatasetError:
                damaged[shard_id] = f"{stats_name(shard_id)} is not a stats file lenscap wrote"
                continue
            why = integrity.stats_problem(shard_id, stats) or integrity.size_problem(shard_id, stats, sizes)
            if why is not None:
                damaged[shard_id] = why
            else:
                sound.append((shard_id, stats))
        reads = [(shard_id, name, n) for shard_id, stats in sound for name, n in integrity.head_reads(shard_id, stats).items()]
        heads = self._read_heads([(name, n) for _, name, n in reads])
        by_shard: dict[int, dict[str, bytes]] = {}
        for (shard_id, name, _), head in zip(reads, heads, strict=True):
            by_shard.setdefault(shard_id, {})[name] = head
        for shard_id, stats in sound:
            why = integrity.head_problem(stats, by_shard.get(shard_id, {}))
            if why is not None:
                damaged[shard_id] = why
        return damaged

    def _read_heads(self, reads: list[tuple[str, int]]) -> list[bytes]:
        """The first ``n`` bytes of each file ``name`` of ``reads``: one call (concurrent on object
        stores); a file gone since the listing reads as empty (it then fails its check)."""
        if not reads:
            return []
        paths = [self.file(name) for name, _ in reads]
        got = self.fs.cat_ranges(paths, [0] * len(reads), [n for _, n in reads], on_error="return")
        return [b if isinstance(b, bytes) else b"" for b in got]

    def digest_file(self, name: str) -> FileDigest:
        """Size and checksums of file ``name`` of the dataset, read whole once (``lenscap verify``)."""
        with self.fs.open(self.file(name), "rb", block_size=2**22) as f:
            return digest_stream(f)

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

    def staging_file(self, name: str) -> Path:
        """Where file ``name`` (relative, ``/``-separated) is written before it is committed or put: a dot
        name beside it in a local dataset (a rename then puts it in place), the work directory's
        ``staging/`` for a remote one (an upload then does)."""
        if self.remote:
            path = self.work_dir / "staging" / name
        else:
            head, _, base = name.rpartition("/")
            path = Path(self.root, head, f".{base}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, shard_id: int, files: dict[str, commits.Source], stats: dict[str, Any]) -> dict[str, Any]:
        """Put ``files`` (final name -> a staged local file, or a file of this dataset to move) in place
        and mark the shard complete, crash-safely (``lenscap.core.commits``); returns the stats written."""
        return commits.commit(self, shard_id, files, stats)

    def recover(self) -> int:
        """Finish the commits a crash interrupted and remove stray staged files; returns the commits
        finished. A remote dataset that holds nothing (new, or deleted since) owns nothing of its work
        directory here but the lock: the rest is an earlier output's, and goes."""
        if self.remote and not any(n != WORK_DIR_NAME for n in self.names()):
            self.clear_work_dir(keep=LOCK_ENTRIES)
            return 0
        finished = commits.recover(self)
        if self.remote:  # what no journal names: a write a crash cut short
            shutil.rmtree(self.work_dir / "staging", ignore_errors=True)
        else:
            for stray in [*Path(self.root).glob(".*.tmp"), *Path(self.root).glob("*/.*.tmp")]:
                stray.unlink(missing_ok=True)
        return finished

    def recover_shard(self, shard_id: int) -> bool:
        """Finish one shard's commit that a crash interrupted; True if there was one."""
        return commits.recover_shard(self, shard_id)

    # What commits.py needs to know of a source and to move one in; only this module tells local from remote.

    def source_record(self, source: commits.Source) -> dict[str, str]:
        if isinstance(source, Path):  # relative, so a crashed commit still rolls forward after the directory moves
            return {"local": os.path.relpath(source, self.work_dir if self.remote else self.root)}
        return {"here": source}

    def _source_path(self, record: dict[str, str]) -> Path:
        return Path(self.work_dir if self.remote else self.root, record["local"])

    def source_digest(self, source: commits.Source) -> FileDigest:
        """Size and checksums of a commit's source: a staged local file read whole (just written: from
        the page cache); a file moved inside the store (img2dataset's on Ray) never passes through this
        machine, so only its size and first bytes are recorded."""
        if isinstance(source, Path):
            with open(source, "rb") as f:
                return digest_stream(f)
        path = self.file(source)
        head = self.fs.cat_file(path, start=0, end=HEAD_BYTES)
        return FileDigest(int(self.fs.size(path)), head_digest(head), None)

    def move_in(self, record: dict[str, str], name: str) -> None:
        """Put a commit's source in place as ``name``, unless it already is (a commit rolled forward again)."""
        target = self.file(name)
        if "here" in record:
            source = self.file(record["here"])
            if self.fs.exists(source):
                self.fs.mv(source, target)
                return
        else:
            local = self._source_path(record)
            if local.exists():
                if self.remote:
                    self.fs.put_file(str(local), target)  # kept until the shard is complete: a rerun puts it again
                else:
                    Path(target).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(local, target)
                return
        if not self.fs.exists(target):
            raise DatasetError(f"cannot finish writing {self.location}/{name}: its new file is missing")

    def forget_source(self, record: dict[str, str]) -> None:
        if "local" in record:
            self._source_path(record).unlink(missing_ok=True)

    def put(self, local: Path, name: str) -> None:
        """Put the finished local file ``local`` (from ``staging_file``) in place as ``name``, whole: a
        rename, or one upload (an object store shows the old object or the new one)."""
        if self.remote:
            self.fs.put_file(str(local), self.file(name))
            local.unlink()
        else:
            target = Path(self.root, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local, target)

    def put_bytes(self, name: str, data: bytes) -> None:
        """Write a small file of the dataset whole: readers see the old one or the new one."""
        if self.remote:
            self.fs.pipe_file(self.file(name), data)  # one object: whole or not at all
        else:
            try:
                commits.atomic_write_bytes(Path(self.root, name), data)
            except OSError as e:  # the manifest, a card: on a full disk as much as a shard is
                raise disk_full(e, Path(self.root, name)) or e from None

    def remove(self, name: str) -> None:
        """Remove a file or directory of the dataset, if it is there."""
        path = self.file(name)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def clear(self, keep: Iterable[str] = ()) -> None:
        """Remove what lenscap wrote in the dataset, stats files first (no shard stays complete), and of its
        work directory everything but ``keep`` (the lock). Only lenscap's files go (``written_by_lenscap``,
        and the card where it is lenscap's): a person's notes, or a dataset put inside, stay."""
        names = self.names()
        doomed = [name for name in names if written_by_lenscap(name)]
        for folder in OWN_FOLDERS:
            if folder in names and self.fs.isdir(self.file(folder)):
                inside = (f"{folder}/{_basename(p)}" for p in self.fs.ls(self.file(folder), detail=False))
                doomed += [name for name in inside if written_by_lenscap(name)]
        if CARD_NAME in names and is_lenscap_card(self.fs.cat_file(self.file(CARD_NAME)).decode("utf-8", "replace")):
            doomed.append(CARD_NAME)
        for name in sorted(doomed, key=lambda n: not n.endswith("_stats.json")):
            self.fs.rm(self.file(name))
        for folder in OWN_FOLDERS:  # left where something else is in it (an object store has no folders)
            if not self.remote and folder in names and os.path.isdir(self.file(folder)) and not os.listdir(self.file(folder)):
                os.rmdir(self.file(folder))
        if self.remote and WORK_DIR_NAME in names:  # the store's staging (--executor ray): lenscap's own
            self.fs.rm(self.file(WORK_DIR_NAME), recursive=True)
        self.clear_work_dir(keep)

    def clear_work_dir(self, keep: Iterable[str] = ()) -> None:
        keep = set(keep)
        for entry in os.scandir(self.work_dir) if self.work_dir.is_dir() else []:
            if entry.name not in keep:
                shutil.rmtree(entry.path) if entry.is_dir() and not entry.is_symlink() else os.unlink(entry.path)
        self.__dict__.pop("_image_source", None)

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


def _bucket(ds: Dataset) -> str:
    return ds.root.lstrip("/").split("/", 1)[0]
