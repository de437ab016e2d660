"""A remote dataset's local mirror: where its shards are written before they are uploaded.

A dataset at a URL (``s3://bucket/ds``) is the source of truth: listing, stats, the manifest and
every read go to it. Shard files are never written there in place: a stage commits a shard into
the dataset's mirror on this machine (``$LENSCAP_WORK_DIR/<sha256(url)[:16]>``, by default under
``~/.cache/lenscap/remote``), which also holds the private directory ``.lenscap/`` (the lock, the
claim, journals of paid requests), and ``upload_shard`` puts the tar and parquet, then
``_stats.json`` last, so a kill mid-upload leaves a shard that is incomplete remotely. A local
dataset is its own mirror: the same calls are no-ops there, so a stage has one code path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lenscap.core import commits as journal
from lenscap.core.errors import DatasetError
from lenscap.core.layout import WORK_DIR_NAME, completed_in, parquet_name, shard_name, shards_in, stats_name, tar_name

__all__ = ["mirror_dir", "upload_shard", "replace_shard", "recover", "staged"]


def mirror_dir(canonical_url: str) -> Path:
    """This machine's mirror of a remote dataset: ``$LENSCAP_WORK_DIR/<sha256(url)[:16]>``, else under
    ``$XDG_CACHE_HOME/lenscap/remote`` (``~/.cache/lenscap/remote``)."""
    base = os.environ.get("LENSCAP_WORK_DIR")
    if not base:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(cache, "lenscap", "remote")
    return Path(base) / hashlib.sha256(canonical_url.encode()).hexdigest()[:16]


def upload_shard(ds: Any, shard_id: int) -> dict[str, Any]:
    """Upload a shard committed in the mirror: tar and parquet, then ``_stats.json`` last (the completion
    marker); then remove the local copies. Returns the shard's stats. (Local: nothing to upload.)"""
    if not ds.remote:
        return ds.read_stats(shard_id)
    local = ds.path
    stats = (local / stats_name(shard_id)).read_bytes()
    for name in (tar_name(shard_id), parquet_name(shard_id)):
        if (local / name).exists():
            ds.fs.put_file(str(local / name), ds.file(name))
    ds.fs.pipe_file(ds.file(stats_name(shard_id)), stats)
    for name in (tar_name(shard_id), parquet_name(shard_id), stats_name(shard_id)):
        (local / name).unlink(missing_ok=True)
    return json.loads(stats)


def replace_shard(ds: Any, shard_id: int) -> None:
    """Put a shard rewritten in the mirror in place of the one at its remote location: its stats file goes
    first, so it is never complete with a mix of old and new files; a kill before the new one is up
    leaves the rewritten shard in the mirror, which ``recover`` keeps for the next upload. (Local: done.)"""
    if ds.remote:
        ds.fs.rm_file(ds.file(stats_name(shard_id)))
        upload_shard(ds, shard_id)


def recover(ds: Any) -> int:
    """Finish the commits a crash interrupted, in the mirror; there, drop the copies of shards already
    complete remotely (uploaded, then killed before they went). Returns the commits finished."""
    if not ds.remote:
        return journal.recover(ds.path)
    local = ds.path
    local.mkdir(parents=True, exist_ok=True)
    names = ds.names()
    if not any(n != WORK_DIR_NAME for n in names):
        # A new remote output (or one deleted since): nothing in the mirror belongs to it, but its lock.
        for entry in list(local.iterdir()):
            inner = list(entry.iterdir()) if entry.name == WORK_DIR_NAME and entry.is_dir() else [entry]
            for item in inner:
                if entry.name == WORK_DIR_NAME and item.name == "lock":
                    continue
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink(missing_ok=True)
        return 0
    finished = journal.recover(local)
    for shard_id in set(shards_in(os.listdir(local))) & set(completed_in(names)):
        for name in (tar_name(shard_id), parquet_name(shard_id), stats_name(shard_id)):
            (local / name).unlink(missing_ok=True)
    return finished


@contextmanager
def staged(ds: Any, shard_id: int) -> Iterator[Any]:
    """A local dataset holding this shard's files: ``ds`` itself when local; for a remote one a temporary
    copy (in ``$TMPDIR``), deleted on exit, so disk use is bounded by the shards in flight."""
    if not ds.remote:
        yield ds
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"lenscap-{shard_name(shard_id)}-"))
    try:
        for file in (parquet_name(shard_id), tar_name(shard_id), stats_name(shard_id)):
            try:
                ds.fs.get_file(ds.file(file), str(tmp / file))
            except FileNotFoundError:
                if file.endswith(".parquet"):
                    raise DatasetError(f"{ds.location}: shard {shard_name(shard_id)} has no parquet file") from None
        yield type(ds)(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
