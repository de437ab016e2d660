"""The dataset directory: the one place that knows its layout.

    out/
      00000.tar          KEY.jpg, KEY.txt, KEY.json for every successful sample (only where images are held)
      00000.parquet      one row per input sample of the shard, failed ones included
      00000_stats.json   written last: its presence means the shard is complete
      lenscap.json       the manifest: stage, parameters, input, version, schema, counts, history,
                         and where the images live
      .lenscap/          private working state of the stage that writes this directory

Images are written once. A dataset either holds its images (``download``, an export, a stage run
with ``--copy-images``: its own tars) or refers to the dataset that does: its manifest's ``images``
names that dataset (a path relative to this one where both are local) and its ``id``, so a source
that was deleted or replaced is an error, never garbage. Either way each row's ``image_offset`` and
``image_size`` say where its image lies in shard ``NNNNN.tar`` of the dataset holding the images
(null: no image, e.g. a failed download or a sample a stage dropped), and ``iter_samples`` reads one
image by one ranged read, checking the tar header before it.

Every shard reaches its final names through ``Dataset.commit``: the finished files are first
written under temporary names, then a small journal naming the renames is written, then the renames
happen and ``_stats.json`` is written. A crash at any point leaves either no trace of the new shard
or a journal that ``Dataset.recover`` rolls forward, so no reader ever sees a half-written shard
that looks complete. "Crash" means the process dying (SIGKILL, out of memory, Ctrl-C); shard files
are not fsynced, so a power loss can still lose what the page cache held, as with img2dataset.

A dataset may also live at a URL on an fsspec filesystem (``s3://bucket/ds``, ``gs://...``,
``memory://ds``; see ``lenscap.storage``). The remote directory is the source of truth: the driver's
operations (listing shards, ``is_complete``, stats, manifest, ``read_table``) go to it. Shard files
are never written there in place: a stage writes a shard into the dataset's local mirror, and
``upload_shard`` puts the tar and parquet, then ``_stats.json`` last, so a kill mid-upload leaves a
shard that is incomplete remotely. A remote input shard is read from a local copy (``staged``).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from lenscap import __version__
from lenscap.errors import DatasetError
from lenscap.record import Sample
from lenscap.storage import is_remote, local_path, mirror_dir, redact_url, url_to_fs
from lenscap.tario import BLOCK, TarOut, member_name, scan_members

__all__ = ["Dataset", "ShardWriter", "shard_name", "shard_stats", "read_parquet", "atomic_write_bytes", "atomic_write_json",
           "moved_image", "add_sample", "IMAGE_OFFSET", "IMAGE_SIZE", "IMAGE_COLUMNS"]

MANIFEST_NAME = "lenscap.json"
WORK_DIR_NAME = ".lenscap"
IMAGE_EXT = "jpg"
# Where a row's image lies in its shard's tar, in the dataset holding the images.
IMAGE_OFFSET, IMAGE_SIZE = "image_offset", "image_size"
IMAGE_COLUMNS = (pa.field(IMAGE_OFFSET, pa.int64()), pa.field(IMAGE_SIZE, pa.int64()))
_STATS_RE = re.compile(r"^(\d+)_stats\.json$")
_SHARD_FILE_RE = re.compile(r"^(\d+)\.(tar|parquet)$")
# Parameter names whose values are never written anywhere (manifests, logs, summaries).
_SECRET_NAME_RE = re.compile(r"(api_?key|secret|password|authorization)", re.IGNORECASE)


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=False, default=str).encode() + b"\n")


def adopt_old_work_dir(path: Path) -> None:
    """Rename the private directory of lenscap before 0.2 (``_lenscap/``: journals of paid requests,
    job state) to today's, so that an upgrade asks nothing again."""
    old = path / "_lenscap"
    if old.is_dir() and not (path / WORK_DIR_NAME).exists():
        os.rename(old, path / WORK_DIR_NAME)


def read_parquet(path: str | os.PathLike[str], columns: list[str] | None = None) -> pa.Table:
    """Read one parquet file. ``pq.read_table`` would import pyarrow.dataset and pandas (0.3 s of CPU
    in every process that reads a shard); one file needs neither."""
    return pq.ParquetFile(path).read(columns=columns)


def shard_stats(shard_id: int, table: pa.Table) -> dict[str, Any]:
    """The ``_stats.json`` content for a shard holding ``table``: counts per status and per error."""
    names = table.column_names
    status = Counter(str(s) for s in table.column("status").to_pylist()) if "status" in names else Counter()
    errors = Counter(e for e in table.column("error_message").to_pylist() if e) if "error_message" in names else Counter()
    stage_status = {
        name: dict(sorted(Counter(str(s) for s in table.column(name).to_pylist()).items()))
        for name in names if name.endswith("_status") and name != "status"
    }
    return {
        "shard": shard_name(shard_id),
        "count": table.num_rows,
        "successes": status.get("success", 0),
        "status": dict(sorted(status.items())),
        "stage_status": stage_status,
        "errors": dict(errors.most_common(20)),
    }


def redact(parameters: dict[str, Any]) -> dict[str, Any]:
    """Drop parameters that could hold secrets, at any depth; by name, so no value's shape matters."""
    return {k: redact(v) if isinstance(v, dict) else v for k, v in parameters.items() if not _SECRET_NAME_RE.search(k)}


class Dataset:
    """A dataset directory: a local path, or a URL on an fsspec filesystem (``remote``).

    ``path`` is the local directory: the dataset itself, or a remote dataset's local mirror, which
    holds its private work directory ``.lenscap/`` and the shards being written before upload.
    ``location`` is what to show and record (a URL without credentials); ``storage_options`` are
    passed to fsspec and never recorded.
    """

    def __init__(self, path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None,
                 mirror: str | os.PathLike[str] | None = None) -> None:
        self._spec = os.fspath(path)
        self.storage_options = dict(storage_options or {})
        self.fs: Any = None
        self.root = ""
        if is_remote(self._spec):
            self.fs, self.root = url_to_fs(self._spec, self.storage_options)
            self.location = redact_url(self._spec).rstrip("/")
            self.path = Path(mirror) if mirror is not None else mirror_dir(self.resolved)
        else:
            self.path = Path(local_path(self._spec))
            self.location = str(self.path)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (to worker processes, Ray tasks) as what it was opened from, not as an open filesystem;
        # with the mirror the driver chose, so all workers of a run agree on it (LENSCAP_WORK_DIR may
        # be set only where the command was typed).
        return (Dataset, (self._spec, self.storage_options, self.path if self.fs is not None else None))

    @property
    def remote(self) -> bool:
        return self.fs is not None

    @property
    def resolved(self) -> str:
        """One name per dataset, to tell two apart: the absolute path, or the canonical URL."""
        if self.fs is None:
            return str(self.path.resolve())
        return redact_url(self.fs.unstrip_protocol(self.root))

    def mirror(self) -> Dataset:
        """The local directory that shards of this dataset are written to: itself when local. (On a
        node of a cluster other than the driver's, a remote dataset's mirror is created here.)"""
        if self.fs is None:
            return self
        (self.path / WORK_DIR_NAME).mkdir(parents=True, exist_ok=True)
        return Dataset(self.path)

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str] | Dataset, storage_options: dict[str, Any] | None = None) -> Dataset:
        """Open ``path`` for writing, creating it if needed."""
        if isinstance(path, Dataset):
            path, storage_options = path._spec, path.storage_options
        ds = cls(path, storage_options)
        if ds.fs is not None:
            try:
                if ds.fs.isfile(ds.root):
                    raise DatasetError(f"output {ds.location} exists and is a file")
                ds.fs.makedirs(ds.root, exist_ok=True)
            except OSError as e:
                raise DatasetError(f"cannot create output {ds.location}: {e}") from None
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
        if ds.fs is not None:
            try:
                if not ds.fs.exists(ds.root):
                    raise DatasetError(f"dataset {ds.location} does not exist")
                if ds.fs.isfile(ds.root):
                    raise DatasetError(f"{ds.location} is a file, not a dataset directory")
            except OSError as e:
                raise DatasetError(f"cannot read {ds.location}: {e}") from None
            if not ds.fs.exists(ds.remote_path(MANIFEST_NAME)) and not ds.shard_ids():
                raise DatasetError(f"{ds.location} is not a dataset directory (no shards and no {MANIFEST_NAME})")
            return ds
        p = ds.path
        if not p.exists():
            raise DatasetError(f"dataset directory {p} does not exist")
        if not p.is_dir():
            raise DatasetError(f"{p} is a file, not a dataset directory")
        if not (p / MANIFEST_NAME).exists() and not ds.shard_ids():
            raise DatasetError(f"{p} is not a dataset directory (no shards and no {MANIFEST_NAME})")
        return ds

    # -- paths ----------------------------------------------------------------------------------

    @property
    def work_dir(self) -> Path:
        return self.path / WORK_DIR_NAME

    def _local(self) -> Path:
        if self.fs is not None:  # a bug in lenscap: remote shard files are read through a local copy
            raise RuntimeError(f"{self.location} is remote: read its shards through Dataset.staged, write them to Dataset.mirror")
        return self.path

    def tar_path(self, shard_id: int) -> Path:
        return self._local() / f"{shard_name(shard_id)}.tar"

    def parquet_path(self, shard_id: int) -> Path:
        return self._local() / f"{shard_name(shard_id)}.parquet"

    def stats_path(self, shard_id: int) -> Path:
        return self._local() / f"{shard_name(shard_id)}_stats.json"

    def tmp_path(self, shard_id: int, ext: str) -> Path:
        return self._local() / f".{shard_name(shard_id)}.{ext}.tmp"

    def remote_path(self, name: str) -> str:
        """A file of a remote dataset (``name`` relative to it, ``/``-separated), as its filesystem names it."""
        return f"{self.root}/{name}"

    # -- listing --------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The names in the dataset directory (not below it)."""
        if self.fs is None:
            return [entry.name for entry in os.scandir(self.path)]
        self.fs.invalidate_cache(self.root)  # other processes write here: never a stale listing
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []

    def completed_ids(self) -> list[int]:
        """Shards whose ``_stats.json`` exists: complete, never to be redone."""
        return sorted(int(m.group(1)) for name in self.names() if (m := _STATS_RE.match(name)))

    def shard_ids(self) -> list[int]:
        """Every shard with any file present, complete or not."""
        ids = set()
        for name in self.names():
            m = _STATS_RE.match(name) or _SHARD_FILE_RE.match(name)
            if m:
                ids.add(int(m.group(1)))
        return sorted(ids)

    def incomplete_ids(self, expected: Iterable[int] | None = None) -> list[int]:
        """Shards not complete: those expected (or present on disk) without ``_stats.json``."""
        done = set(self.completed_ids())
        candidates = set(self.shard_ids()) if expected is None else set(expected)
        return sorted(candidates - done)

    def is_complete(self, shard_id: int) -> bool:
        if self.fs is None:
            return self.stats_path(shard_id).exists()
        self.fs.invalidate_cache(self.root)
        return bool(self.fs.exists(self.remote_path(f"{shard_name(shard_id)}_stats.json")))

    # -- reading --------------------------------------------------------------------------------

    def read_stats(self, shard_id: int) -> dict[str, Any]:
        if self.fs is None:
            return json.loads(self.stats_path(shard_id).read_text())
        return json.loads(self.fs.cat_file(self.remote_path(f"{shard_name(shard_id)}_stats.json")))

    def _read_all_stats(self, ids: list[int]) -> list[dict[str, Any]]:
        if self.fs is None or not ids:
            return [self.read_stats(i) for i in ids]
        paths = [self.remote_path(f"{shard_name(i)}_stats.json") for i in ids]
        blobs = self.fs.cat(paths)  # concurrent on object stores
        by_name = {p.rstrip("/").rsplit("/", 1)[-1]: b for p, b in blobs.items()}
        return [json.loads(by_name[p.rsplit("/", 1)[-1]]) for p in paths]

    def open_shard_file(self, name: str) -> IO[bytes]:
        """One of the dataset's files, for reading (``FileNotFoundError`` if missing)."""
        if self.fs is None:
            return open(self.path / name, "rb")  # noqa: SIM115 - the caller closes it
        return self.fs.open(self.remote_path(name), "rb")

    def open_tar(self, shard_id: int) -> IO[bytes]:
        """The shard's tar, for reading by offset (a remote one is read by ranges, not whole: images are
        read in key order, which is near the tar's order but not it, so a small read-ahead, not the
        filesystem's default block of tens of MB for every jump)."""
        name = f"{shard_name(shard_id)}.tar"
        if self.fs is None:
            return self.open_shard_file(name)
        return self.fs.open(self.remote_path(name), "rb", block_size=2**21, cache_type="readahead")

    def read_table(self, shard_id: int, columns: list[str] | None = None) -> pa.Table:
        if self.fs is None:
            path = self.parquet_path(shard_id)
            try:
                return read_parquet(path, columns=columns)
            except (OSError, pa.ArrowException) as e:
                raise DatasetError(f"cannot read {path}: {e}") from None
        name = f"{shard_name(shard_id)}.parquet"
        try:
            with self.open_shard_file(name) as f:
                return pq.ParquetFile(f).read(columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"cannot read {self.location}/{name}: {e}") from None

    def read_metadata(self, shard_id: int) -> pq.FileMetaData:
        """The shard's parquet footer: row count and schema, without reading any data."""
        if self.fs is None:
            return pq.read_metadata(self.parquet_path(shard_id))
        with self.open_shard_file(f"{shard_name(shard_id)}.parquet") as f:
            return pq.read_metadata(f)

    def read_schema(self, shard_id: int) -> pa.Schema:
        if self.fs is None:
            return pq.read_schema(self.parquet_path(shard_id))
        with self.open_shard_file(f"{shard_name(shard_id)}.parquet") as f:
            return pq.read_schema(f)

    def read_json(self, name: str) -> Any:
        """A JSON file of the dataset (``name`` relative to it), or None if there is none."""
        try:
            if self.fs is None:
                return json.loads((self.path / name).read_text())
            return json.loads(self.fs.cat_file(self.remote_path(name)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read {self.location}/{name}: {e}") from None

    def disk_usage(self) -> tuple[int, int]:
        """Bytes in shard files, and in all (a local dataset's private work directory included)."""
        shard_bytes = total = 0
        if self.fs is None:
            for root, _, files in os.walk(self.path):
                for name in files:
                    size = os.path.getsize(os.path.join(root, name))
                    total += size
                    if root == str(self.path) and name.endswith((".tar", ".parquet", "_stats.json")):
                        shard_bytes += size
            return shard_bytes, total
        self.fs.invalidate_cache(self.root)
        for path, info in self.fs.find(self.root, detail=True).items():
            size = int(info.get("size") or 0)
            total += size
            rel = path[len(self.root.rstrip("/")) + 1:] if path.startswith(self.root) else path
            if "/" not in rel and rel.endswith((".tar", ".parquet", "_stats.json")):
                shard_bytes += size
        return shard_bytes, total

    @contextmanager
    def staged(self, shard_id: int) -> Iterator[Dataset]:
        """A local dataset holding this shard: itself when local; for a remote dataset a temporary
        copy of the shard's files (in ``$TMPDIR``), deleted on exit, so disk use is bounded by the
        shards in flight, not the dataset."""
        if self.fs is None:
            yield self
            return
        name = shard_name(shard_id)
        tmp = Path(tempfile.mkdtemp(prefix=f"lenscap-{name}-"))
        try:
            for file in (f"{name}.parquet", f"{name}.tar", f"{name}_stats.json"):
                try:
                    self.fs.get_file(self.remote_path(file), str(tmp / file))
                except FileNotFoundError:
                    if file.endswith(".parquet"):
                        raise DatasetError(f"{self.location}: shard {name} has no parquet file") from None
            yield Dataset(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- images ---------------------------------------------------------------------------------

    def image_source(self) -> Dataset:
        """The dataset whose tars hold this dataset's images: itself, or the one its manifest names.

        A source that is missing, or was replaced since (another ``id``), is a ``DatasetError`` naming
        it and what to do: reading its tars would give other images than the rows describe.
        """
        cached = self.__dict__.get("_image_source")
        if cached is not None:
            return cached
        ref = (self.read_manifest() or {}).get("images")
        if ref and not (isinstance(ref, dict) and isinstance(ref.get("location"), str)):
            raise DatasetError(f"{self.location}/{MANIFEST_NAME}: its \"images\" entry is not one lenscap wrote ({ref!r})")
        source = self if not ref else self._open_image_source(ref)
        self.__dict__["_image_source"] = source
        return source

    def _open_image_source(self, ref: dict[str, Any]) -> Dataset:
        location = str(ref["location"])
        if not is_remote(location) and not os.path.isabs(location):  # relative to this dataset, wherever it is now
            if self.fs is None:
                location = os.path.normpath(self.path / location)
            else:
                location = self.fs.unstrip_protocol(posixpath.normpath(f"{self.root}/{location}"))
        source = Dataset(location, self.storage_options if is_remote(location) else None)
        advice = (f"restore it, or rerun the stage that wrote {self.location} with --copy-images from an input that "
                  "holds its images")
        try:
            manifest = source.read_manifest() if source.fs is not None or source.path.is_dir() else None
        except DatasetError:
            manifest = None
        if manifest is None:
            raise DatasetError(f"the images of {self.location} live in {source.location}, which is missing; {advice}")
        if ref.get("id") is not None and manifest.get("id") != ref["id"]:
            raise DatasetError(f"the images of {self.location} live in {source.location}, which was replaced since "
                               f"(dataset id {manifest.get('id')}, not {ref['id']}); {advice}")
        return source

    def images_ref(self, out: Dataset) -> dict[str, Any]:
        """What ``out``'s manifest records to read its images from this dataset's image source: a
        relative path where both are local, or in one bucket (the two may move together), else the URL."""
        source = self.image_source()
        if source.fs is None and out.fs is None:
            location = os.path.relpath(source.path.resolve(), out.path.resolve())
        elif source.fs is not None and out.fs is not None and type(source.fs) is type(out.fs) and _bucket(source) == _bucket(out):
            location = posixpath.relpath(source.root, out.root)  # one bucket: a prefix moved whole still reads
        else:
            location = source.location
        return {"location": location, "id": (source.read_manifest() or {}).get("id")}

    def image_locations(self, shard_id: int, table: pa.Table) -> tuple[list[int | None], list[int | None]]:
        """(offsets, sizes) of the images of ``table`` (shard ``shard_id``'s rows), in row order, in
        the image source's tar; None where a row has no image."""
        tar = _TarReader(self.image_source(), shard_id)
        try:
            return self._image_locations(table, tar)
        finally:
            tar.close()

    @staticmethod
    def _image_locations(table: pa.Table, tar: _TarReader) -> tuple[list[int | None], list[int | None]]:
        if IMAGE_OFFSET in table.column_names:
            return table.column(IMAGE_OFFSET).to_pylist(), table.column(IMAGE_SIZE).to_pylist()
        if table.num_rows == 0:
            return [], []
        # Written by img2dataset itself, or by lenscap before offsets were recorded: the tar's headers say.
        members = tar.scan()
        located = [members.get(str(k), (None, None)) for k in table.column("key").to_pylist()]
        return [o for o, _ in located], [n for _, n in located]

    def with_image_locations(self, shard_id: int, table: pa.Table) -> pa.Table:
        """``table`` (shard ``shard_id``'s rows) with ``image_offset``/``image_size``, found in the tar's
        headers where the rows do not have them yet (a shard as img2dataset writes it)."""
        if IMAGE_OFFSET in table.column_names:
            return table
        offsets, sizes = self.image_locations(shard_id, table)
        return _with_locations(table, offsets, sizes)

    def read_image(self, shard_id: int, key: str, offset: int, size: int) -> bytes:
        """One image, by where its row says it lies."""
        tar = _TarReader(self.image_source(), shard_id)
        try:
            return tar.read(key, offset, size)
        finally:
            tar.close()

    def iter_samples(self, shard_id: int) -> Iterator[Sample]:
        """Samples of one shard in parquet row order; each image is read from the image source's tar
        only when a stage asks for it, by the offset in its row."""
        table = self.read_table(shard_id)
        tar = _TarReader(self.image_source(), shard_id)
        try:
            offsets, sizes = self._image_locations(table, tar)
            if IMAGE_OFFSET not in table.column_names:
                table = _with_locations(table, offsets, sizes)
            i = 0
            for batch in table.to_batches(max_chunksize=1024):
                for row in batch.to_pylist():
                    key, offset, size = str(row["key"]), offsets[i], sizes[i]
                    i += 1
                    load = None if offset is None else tar.loader(key, offset, size)
                    yield Sample(key=key, row=row, load=load)
        finally:
            tar.close()

    def read_manifest(self) -> dict[str, Any] | None:
        if self.fs is not None:
            return self.read_json(MANIFEST_NAME)
        path = self.path / MANIFEST_NAME
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read {path}: {e}") from None

    # -- a remote dataset's shards ----------------------------------------------------------------

    def upload_shard(self, shard_id: int) -> dict[str, Any]:
        """Upload a shard committed in the local mirror: tar and parquet, then ``_stats.json`` last
        (the completion marker); then remove the local copies. Returns the shard's stats."""
        local = self.mirror()
        stats_file = local.stats_path(shard_id)
        stats = stats_file.read_bytes()
        for path in (local.tar_path(shard_id), local.parquet_path(shard_id)):
            if path.exists():
                self.fs.put_file(str(path), self.remote_path(path.name))
        self.fs.pipe_file(self.remote_path(stats_file.name), stats)
        for path in (local.tar_path(shard_id), local.parquet_path(shard_id), stats_file):
            path.unlink(missing_ok=True)
        return json.loads(stats)

    def _recover_remote(self) -> int:
        local = self.mirror()
        names = self.names()
        if MANIFEST_NAME not in names and not any(_STATS_RE.match(n) or _SHARD_FILE_RE.match(n) for n in names):
            # A new remote output (or one deleted since): nothing in the mirror belongs to it, but its lock.
            for entry in list(local.path.iterdir()) if local.path.is_dir() else []:
                inner = list(entry.iterdir()) if entry.name == WORK_DIR_NAME and entry.is_dir() else [entry]
                for item in inner:
                    if entry.name == WORK_DIR_NAME and item.name == "lock":
                        continue
                    if item.is_dir() and not item.is_symlink():
                        shutil.rmtree(item)
                    else:
                        item.unlink(missing_ok=True)
            return 0
        finished = local.recover()
        done = {int(m.group(1)) for n in names if (m := _STATS_RE.match(n))}
        for shard_id in set(local.shard_ids()) & done:  # uploaded, then killed before the local copies went
            for path in (local.tar_path(shard_id), local.parquet_path(shard_id), local.stats_path(shard_id)):
                path.unlink(missing_ok=True)
        return finished

    # -- writing --------------------------------------------------------------------------------

    def writer(self, shard_id: int, schema: pa.Schema | None = None, copy_images: bool = True) -> ShardWriter:
        return ShardWriter(self, shard_id, schema, copy_images)

    def commit(self, shard_id: int, renames: list[tuple[Path, Path]], stats: dict[str, Any]) -> None:
        """Move finished files into place and mark the shard complete, crash-safely.

        ``renames`` are (finished temporary file, final name) pairs on this filesystem.
        """
        journal = self._journal_path(shard_id)
        journal.parent.mkdir(parents=True, exist_ok=True)
        # Paths relative to the dataset, so a crashed commit still rolls forward after the directory moves.
        rel = [[os.path.relpath(s, self.path), os.path.relpath(d, self.path)] for s, d in renames]
        atomic_write_json(journal, {"renames": rel, "stats": stats})
        self._roll_forward(journal)

    def recover(self) -> int:
        """Finish commits that a crash interrupted; remove stray temporary files. Returns commits finished.

        Remote: the same in the local mirror, whose copies of shards complete remotely go.
        """
        if self.fs is not None:
            return self._recover_remote()
        finished = 0
        pending = self.work_dir / "pending"
        if pending.is_dir():
            for journal in sorted(pending.glob("*.json")):
                self._roll_forward(journal)
                finished += 1
        for stray in self.path.glob(".*.tmp"):
            stray.unlink(missing_ok=True)
        return finished

    def recover_shard(self, shard_id: int) -> bool:
        """Finish one shard's commit that a crash interrupted; True if there was one."""
        journal = self._journal_path(shard_id)
        if not journal.exists():
            return False
        self._roll_forward(journal)
        return True

    def _journal_path(self, shard_id: int) -> Path:
        return self.work_dir / "pending" / f"{shard_name(shard_id)}.json"

    def _roll_forward(self, journal: Path) -> None:
        plan = json.loads(journal.read_text())
        shard_id = int(journal.stem)
        # The shard stops looking complete before any of its files change.
        self.stats_path(shard_id).unlink(missing_ok=True)
        for rel_src, rel_dst in plan["renames"]:
            src, dst = self.path / rel_src, self.path / rel_dst
            if os.path.exists(src):
                os.replace(src, dst)
            elif not os.path.exists(dst):
                raise DatasetError(f"cannot finish writing shard {shard_name(shard_id)}: {src} and {dst} are both missing")
        atomic_write_json(self.stats_path(shard_id), plan["stats"])
        journal.unlink()

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
        """Write ``lenscap.json`` from the shards on disk; ``history`` is the input's history, ``images``
        where the images live (``images_ref``; None: in this dataset); ``input_incomplete`` the input
        shards left out (``--allow-incomplete``). The dataset's ``id`` is made
        at its first manifest and kept after, so a dataset referring to this one's images can tell
        it from another written in its place."""
        previous = self.read_manifest() or {}
        completed = self.completed_ids()
        counts: Counter[str] = Counter()
        stage_counts: dict[str, Counter[str]] = {}
        samples = 0
        for stats in self._read_all_stats(completed):
            samples += int(stats.get("count", 0))
            counts.update(stats.get("status", {}))
            for column, outcome in stats.get("stage_status", {}).items():
                stage_counts.setdefault(column, Counter()).update(outcome)
        schema: list[dict[str, str]] = []
        if completed:
            pschema = self.read_schema(completed[0])
            schema = [{"name": f.name, "type": str(f.type)} for f in pschema]
        params = redact(parameters)
        input_path = redact_url(input_path) if input_path is not None else None  # never credentials in a URL
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        entry = {"stage": stage, "parameters": params, "input": input_path, "lenscap_version": __version__, "at": now}
        manifest = {
            "lenscap_version": __version__,
            "id": previous.get("id") or uuid.uuid4().hex,
            "stage": stage,
            "parameters": params,
            "input": input_path,
            "updated_at": now,
            "complete": expected_shards is not None and len(completed) >= expected_shards,
            "shards": {"expected": expected_shards, "completed": len(completed)},
            "counts": {"samples": samples, "status": dict(sorted(counts.items())),
                       **{column: dict(sorted(c.items())) for column, c in sorted(stage_counts.items())}},
            "schema": schema,
            "images": images,
            "input_incomplete_shards": [shard_name(i) for i in input_incomplete or []],
            "history": [*(history or []), entry],
        }
        self.__dict__.pop("_image_source", None)
        if self.fs is not None:
            self.fs.pipe_file(self.remote_path(MANIFEST_NAME), json.dumps(manifest, indent=2, default=str).encode() + b"\n")
        else:
            atomic_write_json(self.path / MANIFEST_NAME, manifest)
        return manifest


def _with_locations(table: pa.Table, offsets: list[int | None], sizes: list[int | None]) -> pa.Table:
    return table.append_column(IMAGE_COLUMNS[0], pa.array(offsets, pa.int64())).append_column(
        IMAGE_COLUMNS[1], pa.array(sizes, pa.int64()))


def add_sample(tar: TarOut, key: str, image: bytes, row: dict[str, Any]) -> tuple[int, int]:
    """Add a sample's members as img2dataset writes them (KEY.jpg, KEY.txt with its caption, KEY.json
    with its row but the row's own offsets); returns where its image lies: (offset, size)."""
    offset = tar.add(f"{key}.{IMAGE_EXT}", image)
    tar.add(f"{key}.txt", (row.get("caption") or "").encode())
    metadata = {"key": key, **{k: v for k, v in row.items() if k not in ("key", IMAGE_OFFSET, IMAGE_SIZE)}}
    tar.add(f"{key}.json", json.dumps(metadata, default=str).encode())
    return offset, len(image)


def _bucket(ds: Dataset) -> str:
    return ds.root.lstrip("/").split("/", 1)[0]


def moved_image(source: Dataset, shard_id: int, key: str, offset: int) -> DatasetError:
    """The error for a tar that no longer holds an image where a row says it is."""
    return DatasetError(f"{source.location}/{shard_name(shard_id)}.tar does not hold the image of {key} at byte {offset}: "
                        "the dataset holding the images was changed since the rows were written; rerun the stages after it")


class _TarReader:
    """One shard's image tar, opened at the first image asked for; each image checked against the
    member header just before it, so a tar that was rewritten since is an error, not another image."""

    def __init__(self, source: Dataset, shard_id: int) -> None:
        self.source = source
        self.shard_id = shard_id
        self._f: IO[bytes] | None = None

    def _file(self) -> IO[bytes]:
        if self._f is None:
            try:
                self._f = self.source.open_tar(self.shard_id)
            except FileNotFoundError:
                raise DatasetError(f"{self.source.location}: shard {shard_name(self.shard_id)} has no tar; its images "
                                   "are missing (restore the directory, or download again into a new one)") from None
        return self._f

    def scan(self) -> dict[str, tuple[int, int]]:
        try:
            return scan_members(self._file(), IMAGE_EXT)
        except DatasetError:
            return {}  # a shard without images (every download failed)

    def loader(self, key: str, offset: int, size: int) -> Any:
        return lambda: self.read(key, offset, size)

    def read(self, key: str, offset: int, size: int) -> bytes:
        f = self._file()
        f.seek(offset - BLOCK)
        data = f.read(BLOCK + size)
        if member_name(data[:BLOCK]) != f"{key}.{IMAGE_EXT}" or len(data) != BLOCK + size:
            raise moved_image(self.source, self.shard_id, key, offset)
        return data[BLOCK:]

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


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
        d.commit(self.shard_id, renames, stats)
        return stats

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._tar_tmp.unlink(missing_ok=True)
        self._parquet_tmp.unlink(missing_ok=True)
