"""Crash-safe commits of a shard into a dataset, local or remote (``Dataset.commit``).

A shard's finished files are first written where the dataset stages them (``Dataset.staging_file``:
dot names beside a local dataset, its work directory for a remote one). Then a small journal naming
each file and where it comes from is written to ``.lenscap/pending/NNNNN.json``; then the shard's old
``_stats.json`` goes (so it never looks complete with a mix of old and new files), each file is put in
place (a rename locally, an upload to a store, a move inside the store for a file staged there), and
``_stats.json`` is written last, with each file's size and checksums (``lenscap.core.checksums``:
``Dataset.damaged_shards`` compares the cheap ones, ``lenscap verify`` all); then
the journal goes. A crash at any point leaves either no trace of the new shard or a journal that
``recover`` rolls forward, so no reader ever sees a half-written shard that looks complete. "Crash"
means the process dying (SIGKILL, out of memory, Ctrl-C); shard files are not fsynced, so a power loss
can still lose what the page cache held, as with img2dataset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lenscap.core.layout import shard_name, stats_name

if TYPE_CHECKING:
    from lenscap.core.dataset import Dataset

__all__ = ["atomic_write_bytes", "atomic_write_json", "commit", "recover", "recover_shard", "Source"]

# Where a committed file comes from: a local file (a Path), or a file of the dataset itself ("NAME",
# relative to it: a file img2dataset's Ray tasks staged in the store), moved in place.
Source = Path | str


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


def _journal(ds: Dataset, shard_id: int) -> Path:
    return ds.work_dir / "pending" / f"{shard_name(shard_id)}.json"


def commit(ds: Dataset, shard_id: int, files: dict[str, Source], stats: dict[str, Any]) -> dict[str, Any]:
    """Put ``files`` (final name -> where it is now) in place in ``ds`` and mark the shard complete,
    crash-safely; returns the stats written (``stats`` and the files' sizes and checksums)."""
    journal = _journal(ds, shard_id)
    journal.parent.mkdir(parents=True, exist_ok=True)
    # Each file's size and checksums (``lenscap.core.checksums``): a resume compares sizes and heads, so
    # a shard truncated, emptied or replaced since is not trusted; ``lenscap verify`` compares every byte.
    # By the name relative to the dataset: a sidecar (``embeddings/00000.parquet``) is not the shard's rows.
    digests = {name: ds.source_digest(source) for name, source in files.items()}
    stats = {
        **stats,
        "files": {**stats.get("files", {}), **{name: d.size for name, d in digests.items()}},
        "head_sha256": {**stats.get("head_sha256", {}), **{name: d.head_sha256 for name, d in digests.items()}},
        "sha256": {**stats.get("sha256", {}), **{name: d.sha256 for name, d in digests.items() if d.sha256 is not None}},
    }
    plan = [[name, ds.source_record(source)] for name, source in files.items()]
    atomic_write_json(journal, {"files": plan, "stats": stats})
    _roll_forward(ds, journal)
    return stats


def recover(ds: Dataset) -> int:
    """Finish the commits in ``ds`` that a crash interrupted. Returns the commits finished."""
    pending = ds.work_dir / "pending"
    journals = sorted(pending.glob("*.json")) if pending.is_dir() else []
    for journal in journals:
        _roll_forward(ds, journal)
    return len(journals)


def recover_shard(ds: Dataset, shard_id: int) -> bool:
    """Finish one shard's commit that a crash interrupted; True if there was one."""
    journal = _journal(ds, shard_id)
    if not journal.exists():
        return False
    _roll_forward(ds, journal)
    return True


def _roll_forward(ds: Dataset, journal: Path) -> None:
    plan = json.loads(journal.read_text())
    if "renames" in plan:  # written by lenscap before 0.4 into a local dataset: [staged file, final file], both local
        plan["files"] = [[os.path.relpath(Path(ds.root, dst), ds.root), {"local": src}] for src, dst in plan["renames"]]
    shard_id = int(journal.stem)
    ds.remove(stats_name(shard_id))  # the shard stops looking complete before any of its files change
    for name, record in plan["files"]:
        ds.move_in(record, name)
    ds.put_bytes(stats_name(shard_id), json.dumps(plan["stats"], indent=2, default=str).encode() + b"\n")
    journal.unlink()
    for _, record in plan["files"]:  # a local file uploaded to a store: its copy here goes once the shard is complete
        ds.forget_source(record)
