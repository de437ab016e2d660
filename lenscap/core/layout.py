"""The names in a dataset directory, and nothing else: which file is which shard's, and what marks one complete.

out/
  00000.tar          KEY.jpg, KEY.txt, KEY.json for every successful sample (only where images are held)
  00000.parquet      one row per input sample of the shard, failed ones included
  00000_stats.json   written last: its presence means the shard is complete
  lenscap.json       the manifest (``lenscap.core.manifest``)
  README.md          a card (where it is lenscap's: lenscap.core.card); an export adds shards.json,
                     sizes.json, data/train-*.parquet, dedup its dedup/ report, and
                     dedup --semantic and filter their embeddings/NNNNN.parquet (a sidecar of each shard)
  .lenscap/          private working state of the command that writes this directory: its lock,
                     claim, commit journals (``lenscap.core.commits``), journals of paid requests
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa

__all__ = [
    "MANIFEST_NAME",
    "WORK_DIR_NAME",
    "OLD_WORK_DIR_NAME",
    "LOCK_NAME",
    "LOCK_ENTRIES",
    "IMAGE_EXT",
    "IMAGE_OFFSET",
    "IMAGE_SIZE",
    "IMAGE_COLUMNS",
    "shard_name",
    "tar_name",
    "parquet_name",
    "stats_name",
    "completed_in",
    "written_by_lenscap",
    "OWN_FOLDERS",
    "SIDECAR_FOLDERS",
    "shards_in",
    "adopt_old_work_dir",
]

MANIFEST_NAME = "lenscap.json"
WORK_DIR_NAME = ".lenscap"
OLD_WORK_DIR_NAME = "_lenscap"  # lenscap before 0.2
LOCK_NAME = "lock"  # in the work directory: the lock of the command writing the dataset (lenscap.core.lock)
# The lock and what lenscap.core.lock keeps beside it (the registry of the owner's workers, the file held
# while a stale lock is broken): never cleared while the lock is held.
LOCK_ENTRIES = frozenset({LOCK_NAME, f"{LOCK_NAME}.procs", f"{LOCK_NAME}.break"})
IMAGE_EXT = "jpg"
# Where a row's image lies in its shard's tar, in the dataset holding the images.
IMAGE_OFFSET, IMAGE_SIZE = "image_offset", "image_size"
IMAGE_COLUMNS = (pa.field(IMAGE_OFFSET, pa.int64()), pa.field(IMAGE_SIZE, pa.int64()))
_STATS_RE = re.compile(r"^(\d+)_stats\.json$")
_SHARD_FILE_RE = re.compile(r"^(\d+)\.(tar|parquet)$")
# Besides its shards and manifest, the files lenscap writes in a dataset directory: an export's summary
# and open_clip's sizes, the parquet export's data files, dedup's report. Any other name there (a
# person's notes, a dataset put inside) is not lenscap's: ``--overwrite`` leaves it.
_OWN_FILES = frozenset({MANIFEST_NAME, "shards.json", "sizes.json"})
_OWN_IN_FOLDERS = {
    "data": re.compile(r"^train-\d+-of-\d+\.parquet$"),
    "dedup": re.compile(r"^(clusters\.parquet|report\.json)$"),
    "embeddings": re.compile(r"^\d+\.parquet$"),  # kept embeddings, a sidecar per shard (lenscap.embed.store)
}
OWN_FOLDERS = tuple(_OWN_IN_FOLDERS)
# Folders holding files of a shard beside its rows, committed with it (``embeddings/00000.parquet``).
SIDECAR_FOLDERS = ("embeddings",)
_TEMP_RE = re.compile(r"^\.(.+)\.tmp$")  # an atomic write cut short (lenscap.core.commits)


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def tar_name(shard_id: int) -> str:
    return f"{shard_name(shard_id)}.tar"


def parquet_name(shard_id: int) -> str:
    return f"{shard_name(shard_id)}.parquet"


def stats_name(shard_id: int) -> str:
    return f"{shard_name(shard_id)}_stats.json"


def completed_in(names: Iterable[str]) -> list[int]:
    """The shards that ``names`` (a directory's entries) mark complete: those with ``_stats.json``."""
    return sorted(int(m.group(1)) for name in names if (m := _STATS_RE.match(name)))


def written_by_lenscap(name: str) -> bool:
    """Whether ``name`` (``/``-separated, relative to a dataset directory) is a file lenscap writes there,
    by its name. (The card, ``README.md``, is told by its content.)"""
    folder, _, base = name.rpartition("/")
    if m := _TEMP_RE.match(base):
        base = m.group(1)
    if folder:
        return folder in _OWN_IN_FOLDERS and bool(_OWN_IN_FOLDERS[folder].match(base))
    return base in _OWN_FILES or bool(_STATS_RE.match(base) or _SHARD_FILE_RE.match(base))


def shards_in(names: Iterable[str]) -> list[int]:
    """Every shard with any file among ``names``, complete or not."""
    return sorted({int(m.group(1)) for name in names if (m := _STATS_RE.match(name) or _SHARD_FILE_RE.match(name))})


def adopt_old_work_dir(path: Path) -> None:
    """Rename the private directory of lenscap before 0.2 (``_lenscap/``: journals of paid requests,
    job state) to today's, so that an upgrade asks nothing again."""
    old = path / OLD_WORK_DIR_NAME
    if old.is_dir() and not (path / WORK_DIR_NAME).exists():
        os.rename(old, path / WORK_DIR_NAME)
