"""The dataset directory: the one place that knows its layout.

    out/
      00000.tar          KEY.jpg, KEY.txt, KEY.json for every successful sample
      00000.parquet      one row per input sample of the shard, failed ones included
      00000_stats.json   written last: its presence means the shard is complete
      lenscap.json       the manifest: stage, parameters, input, version, schema, counts, history
      _lenscap/          private working state of the stage that writes this directory

Every shard reaches its final names through ``Dataset.commit``: the finished files are first
written under temporary names, then a small journal naming the renames is written, then the renames
happen and ``_stats.json`` is written. A crash at any point leaves either no trace of the new shard
or a journal that ``Dataset.recover`` rolls forward, so no reader ever sees a half-written shard
that looks complete. "Crash" means the process dying (SIGKILL, out of memory, Ctrl-C); shard files
are not fsynced, so a power loss can still lose what the page cache held, as with img2dataset.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lenscap import __version__
from lenscap.errors import DatasetError
from lenscap.record import Sample

__all__ = ["Dataset", "ShardWriter", "shard_name", "shard_stats", "read_parquet", "atomic_write_bytes", "atomic_write_json",
           "claim_job"]

MANIFEST_NAME = "lenscap.json"
WORK_DIR_NAME = "_lenscap"
IMAGE_EXT = "jpg"
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


def claim_job(job_file: Path, job: dict[str, Any], output_exists: bool, out_dir: str | os.PathLike[str], what: str) -> bool:
    """Record the settings of the job writing an output directory, and hold later runs to them.

    Once the output holds results (``output_exists``), a rerun with other settings is refused
    (``DatasetError``, naming what changed): its results would mix with the earlier ones. Before
    that, new settings replace the old; returns True then, so the caller can drop state derived
    from the old ones.
    """
    job = json.loads(json.dumps(job, default=str))
    previous = json.loads(job_file.read_text()) if job_file.exists() else None
    if previous == job:
        return False
    if previous is not None and output_exists:
        changed = sorted(k for k in set(job) | set(previous) if previous.get(k) != job.get(k))
        raise DatasetError(f"{out_dir} was {what} with other {', '.join(changed) or 'settings'}; use a new output directory "
                           "(or delete this one)")
    job_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(job_file, job)
    return previous is not None


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
    """A dataset directory on the local filesystem."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> Dataset:
        """Open ``path`` for writing, creating it if needed."""
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise DatasetError(f"output directory {p} exists and is a file")
        try:
            (p / WORK_DIR_NAME).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatasetError(f"cannot create output directory {p}: {e.strerror}") from None
        return cls(p)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Dataset:
        """Open an existing dataset directory for reading."""
        p = Path(path)
        if not p.exists():
            raise DatasetError(f"dataset directory {p} does not exist")
        if not p.is_dir():
            raise DatasetError(f"{p} is a file, not a dataset directory")
        ds = cls(p)
        if not (p / MANIFEST_NAME).exists() and not ds.shard_ids():
            raise DatasetError(f"{p} is not a dataset directory (no shards and no {MANIFEST_NAME})")
        return ds

    # -- paths ----------------------------------------------------------------------------------

    @property
    def work_dir(self) -> Path:
        return self.path / WORK_DIR_NAME

    def tar_path(self, shard_id: int) -> Path:
        return self.path / f"{shard_name(shard_id)}.tar"

    def parquet_path(self, shard_id: int) -> Path:
        return self.path / f"{shard_name(shard_id)}.parquet"

    def stats_path(self, shard_id: int) -> Path:
        return self.path / f"{shard_name(shard_id)}_stats.json"

    def tmp_path(self, shard_id: int, ext: str) -> Path:
        return self.path / f".{shard_name(shard_id)}.{ext}.tmp"

    # -- listing --------------------------------------------------------------------------------

    def completed_ids(self) -> list[int]:
        """Shards whose ``_stats.json`` exists: complete, never to be redone."""
        ids = []
        for entry in os.scandir(self.path):
            m = _STATS_RE.match(entry.name)
            if m:
                ids.append(int(m.group(1)))
        return sorted(ids)

    def shard_ids(self) -> list[int]:
        """Every shard with any file present, complete or not."""
        ids = set(self.completed_ids())
        for entry in os.scandir(self.path):
            m = _SHARD_FILE_RE.match(entry.name)
            if m:
                ids.add(int(m.group(1)))
        return sorted(ids)

    def incomplete_ids(self, expected: Iterable[int] | None = None) -> list[int]:
        """Shards not complete: those expected (or present on disk) without ``_stats.json``."""
        done = set(self.completed_ids())
        candidates = set(self.shard_ids()) if expected is None else set(expected)
        return sorted(candidates - done)

    def is_complete(self, shard_id: int) -> bool:
        return self.stats_path(shard_id).exists()

    # -- reading --------------------------------------------------------------------------------

    def read_stats(self, shard_id: int) -> dict[str, Any]:
        return json.loads(self.stats_path(shard_id).read_text())

    def read_table(self, shard_id: int, columns: list[str] | None = None) -> pa.Table:
        path = self.parquet_path(shard_id)
        try:
            return read_parquet(path, columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"cannot read {path}: {e}") from None

    def iter_samples(self, shard_id: int) -> Iterator[Sample]:
        """Samples of one shard in parquet row order, images read one at a time from the tar."""
        table = self.read_table(shard_id)
        tar_path = self.tar_path(shard_id)
        members: dict[str, tarfile.TarInfo] = {}
        tar = tarfile.open(tar_path) if tar_path.exists() else None
        try:
            if tar is not None:
                for m in tar:
                    key, _, ext = m.name.partition(".")
                    if ext == IMAGE_EXT:
                        members[key] = m
            for batch in table.to_batches(max_chunksize=1024):
                for row in batch.to_pylist():
                    key = str(row["key"])
                    image = None
                    member = members.get(key)
                    if member is not None and tar is not None:
                        f = tar.extractfile(member)
                        image = f.read() if f is not None else None
                    yield Sample(key=key, row=row, image=image)
        finally:
            if tar is not None:
                tar.close()

    def read_manifest(self) -> dict[str, Any] | None:
        path = self.path / MANIFEST_NAME
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read {path}: {e}") from None

    # -- writing --------------------------------------------------------------------------------

    def writer(self, shard_id: int, schema: pa.Schema | None = None) -> ShardWriter:
        return ShardWriter(self, shard_id, schema)

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
        """Finish commits that a crash interrupted; remove stray temporary files. Returns commits finished."""
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
    ) -> dict[str, Any]:
        """Write ``lenscap.json`` from the shards on disk; ``history`` is the input's history."""
        completed = self.completed_ids()
        counts: Counter[str] = Counter()
        stage_counts: dict[str, Counter[str]] = {}
        samples = 0
        for shard_id in completed:
            stats = self.read_stats(shard_id)
            samples += int(stats.get("count", 0))
            counts.update(stats.get("status", {}))
            for column, outcome in stats.get("stage_status", {}).items():
                stage_counts.setdefault(column, Counter()).update(outcome)
        schema: list[dict[str, str]] = []
        if completed:
            pschema = pq.read_schema(self.parquet_path(completed[0]))
            schema = [{"name": f.name, "type": str(f.type)} for f in pschema]
        params = redact(parameters)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        entry = {"stage": stage, "parameters": params, "input": input_path, "lenscap_version": __version__, "at": now}
        manifest = {
            "lenscap_version": __version__,
            "stage": stage,
            "parameters": params,
            "input": input_path,
            "updated_at": now,
            "complete": expected_shards is not None and len(completed) >= expected_shards,
            "shards": {"expected": expected_shards, "completed": len(completed)},
            "counts": {"samples": samples, "status": dict(sorted(counts.items())),
                       **{column: dict(sorted(c.items())) for column, c in sorted(stage_counts.items())}},
            "schema": schema,
            "history": [*(history or []), entry],
        }
        atomic_write_json(self.path / MANIFEST_NAME, manifest)
        return manifest


def _rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema | None) -> pa.Table:
    """Rows to a table: the schema's columns first, with its types; any other column a row has, after."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    typed = schema.names if schema is not None else []
    names = typed + [n for n in names if n not in typed]
    arrays = [
        pa.array([r.get(n) for r in rows], type=schema.field(n).type if n in typed else None)  # type: ignore[union-attr]
        for n in names
    ]
    return pa.Table.from_arrays(arrays, names=names)


class ShardWriter:
    """Writes one shard under temporary names; ``commit`` makes it visible and complete.

    Memory holds the shard's parquet rows (no image bytes): bounded by the shard size, not the dataset.
    """

    def __init__(self, dataset: Dataset, shard_id: int, schema: pa.Schema | None = None) -> None:
        self.dataset = dataset
        self.shard_id = shard_id
        self.schema = schema
        self.rows: list[dict[str, Any]] = []
        self._tar_tmp = dataset.tmp_path(shard_id, "tar")
        self._parquet_tmp = dataset.tmp_path(shard_id, "parquet")
        self._tar = tarfile.open(self._tar_tmp, "w", format=tarfile.USTAR_FORMAT)

    def write(self, sample: Sample) -> None:
        row = {**sample.row, "key": sample.key}
        self.rows.append(row)
        if sample.ok:
            self._add(f"{sample.key}.{IMAGE_EXT}", sample.image)
            self._add(f"{sample.key}.txt", (sample.caption or "").encode())
            self._add(f"{sample.key}.json", json.dumps(sample.metadata(), default=str).encode())

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0  # identical input gives byte-identical shards
        self._tar.addfile(info, io.BytesIO(data))

    def commit(self, extra_stats: dict[str, Any] | None = None) -> dict[str, Any]:
        self._tar.close()
        table = _rows_to_table(self.rows, self.schema)
        pq.write_table(table, self._parquet_tmp)
        stats = shard_stats(self.shard_id, table) | (extra_stats or {})
        d = self.dataset
        d.commit(
            self.shard_id,
            [(self._tar_tmp, d.tar_path(self.shard_id)), (self._parquet_tmp, d.parquet_path(self.shard_id))],
            stats,
        )
        return stats

    def abort(self) -> None:
        self._tar.close()
        self._tar_tmp.unlink(missing_ok=True)
        self._parquet_tmp.unlink(missing_ok=True)
