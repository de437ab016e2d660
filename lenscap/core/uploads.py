"""Files of a remote output that are not dataset shards: dedup's report, an export's shards and index.

They are written to local disk (the output's mirror; a local output is its own) by the same code
for both, then put whole. One ``put_file`` is one object on an object store, which readers see entire or not at all, so a
kill mid-upload leaves the old object or none; on filesystems where a put can be partial, the caller
marks a file uploaded (or deletes its local copy) only after the put returns, so the rerun puts it again.
"""

from __future__ import annotations

from pathlib import Path

from lenscap.core.dataset import Dataset

__all__ = ["put_file", "put_and_remove", "uploaded_sizes"]


def put_file(ds: Dataset, local: Path, name: str) -> None:
    """Upload ``local`` as ``name`` (relative, ``/``-separated) in the remote dataset ``ds``."""
    ds.fs.put_file(str(local), ds.file(name))


def put_and_remove(ds: Dataset, local_dir: Path, names: list[str]) -> None:
    """Upload each of ``names`` that is in ``local_dir`` (``ds``'s mirror), in order, removing each local
    copy once it is up. A local ``ds`` is its own mirror: nothing to do.

    A local copy that is still there after a kill is one not known to be uploaded: the next call puts it again.
    """
    if not ds.remote:
        return
    for name in names:
        local = local_dir / name
        if local.exists():
            put_file(ds, local, name)
            local.unlink()


def uploaded_sizes(ds: Dataset) -> dict[str, int]:
    """Every file under the remote dataset ``ds``, by name relative to it, with its size in bytes."""
    ds.fs.invalidate_cache(ds.root)  # other processes upload here: never a stale listing
    try:
        found = ds.fs.find(ds.root, detail=True)
    except FileNotFoundError:
        return {}
    prefix = ds.root.rstrip("/") + "/"
    return {path[len(prefix) :]: int(info.get("size") or 0) for path, info in found.items() if path.startswith(prefix)}
