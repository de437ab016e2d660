"""Crash-safe commits of a shard into a local directory (a dataset, or a remote dataset's mirror).

A shard's finished files are first written under temporary names; then a small journal naming the
renames is written to ``.lenscap/pending/NNNNN.json``; then the renames happen and ``_stats.json``
is written, with each file's size (``Dataset.damaged_shards`` compares them); then the journal goes. A crash at any point leaves either no trace of the new shard or a
journal that ``recover`` rolls forward, so no reader ever sees a half-written shard that looks
complete. "Crash" means the process dying (SIGKILL, out of memory, Ctrl-C); shard files are not
fsynced, so a power loss can still lose what the page cache held, as with img2dataset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lenscap.core.errors import DatasetError
from lenscap.core.layout import WORK_DIR_NAME, shard_name, stats_name

__all__ = ["atomic_write_bytes", "atomic_write_json", "commit", "recover", "recover_shard"]


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


def _journal_path(root: Path, shard_id: int) -> Path:
    return root / WORK_DIR_NAME / "pending" / f"{shard_name(shard_id)}.json"


def commit(root: Path, shard_id: int, renames: list[tuple[Path, Path]], stats: dict[str, Any]) -> dict[str, Any]:
    """Move finished files into place in ``root`` and mark the shard complete, crash-safely; returns
    the stats written (``stats`` and the files' sizes).

    ``renames`` are (finished temporary file, final name) pairs in ``root``.
    """
    journal = _journal_path(root, shard_id)
    journal.parent.mkdir(parents=True, exist_ok=True)
    # The size of each file, so a resume can tell a complete shard from one truncated or emptied since.
    stats = {**stats, "files": {**stats.get("files", {}), **{Path(d).name: os.path.getsize(s) for s, d in renames}}}
    # Paths relative to the dataset, so a crashed commit still rolls forward after the directory moves.
    rel = [[os.path.relpath(s, root), os.path.relpath(d, root)] for s, d in renames]
    atomic_write_json(journal, {"renames": rel, "stats": stats})
    _roll_forward(root, journal)
    return stats


def recover(root: Path) -> int:
    """Finish the commits in ``root`` that a crash interrupted; remove stray temporary files.
    Returns the commits finished."""
    finished = 0
    pending = root / WORK_DIR_NAME / "pending"
    if pending.is_dir():
        for journal in sorted(pending.glob("*.json")):
            _roll_forward(root, journal)
            finished += 1
    for stray in root.glob(".*.tmp"):
        stray.unlink(missing_ok=True)
    return finished


def recover_shard(root: Path, shard_id: int) -> bool:
    """Finish one shard's commit that a crash interrupted; True if there was one."""
    journal = _journal_path(root, shard_id)
    if not journal.exists():
        return False
    _roll_forward(root, journal)
    return True


def _roll_forward(root: Path, journal: Path) -> None:
    plan = json.loads(journal.read_text())
    shard_id = int(journal.stem)
    stats = root / stats_name(shard_id)
    # The shard stops looking complete before any of its files change.
    stats.unlink(missing_ok=True)
    for rel_src, rel_dst in plan["renames"]:
        src, dst = root / rel_src, root / rel_dst
        if os.path.exists(src):
            os.replace(src, dst)
        elif not os.path.exists(dst):
            raise DatasetError(f"cannot finish writing shard {shard_name(shard_id)}: {src} and {dst} are both missing")
    atomic_write_json(stats, plan["stats"])
    journal.unlink()
