"""Whether a complete shard is still what its commit wrote (``lenscap.core.commits``, ``lenscap.core.checksums``).

Two depths. The cheap checks run on every resume, for every complete shard (``Dataset.damaged_shards``):
the stats file is one lenscap wrote for this shard (``{}``, or another shard's, is not), each file it
names has the size recorded, and each file's first 4 KiB hash to what was recorded (a shard written
before checksums were recorded: its tar's first header is a tar header). They read the stats file and a
few KiB of each file. The whole check (``lenscap verify``) reads every byte and compares the SHA-256.
"""

from __future__ import annotations

from typing import Any

from lenscap.core.checksums import HEAD_BYTES, FileDigest, head_digest
from lenscap.core.layout import parquet_name, shard_name, stats_name
from lenscap.core.tario import BLOCK, member_name

__all__ = ["stats_problem", "size_problem", "head_reads", "head_problem", "whole_problem", "recorded_files"]


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _names_map(stats: dict[str, Any], field: str, kind: type) -> bool:
    value = stats.get(field)
    return value is None or (isinstance(value, dict) and all(isinstance(v, kind) for v in value.values()))


def stats_problem(shard_id: int, stats: dict[str, Any]) -> str | None:
    """Why ``stats`` is not a stats file lenscap wrote for shard ``shard_id``, or None. Every commit
    records the shard's name and its row count; ``{}`` or another shard's file is no proof of anything."""
    name = stats_name(shard_id)
    if not _is_size(stats.get("count")):
        return f"{name} has no row count: it is not a stats file lenscap wrote"
    if "shard" in stats and stats["shard"] != shard_name(shard_id):
        return f"{name} is the stats file of shard {stats['shard']}, not of {shard_name(shard_id)}"
    files = stats.get("files")
    if files is not None and not (isinstance(files, dict) and all(_is_size(v) for v in files.values())):
        return f"{name} has no valid file sizes: it is not a stats file lenscap wrote"
    if not (_names_map(stats, "sha256", str) and _names_map(stats, "head_sha256", str)):
        return f"{name} has checksums that are not strings: it is not a stats file lenscap wrote"
    return None


def recorded_files(shard_id: int, stats: dict[str, Any]) -> dict[str, int | None]:
    """The files a shard's stats vouch for, with their sizes; a shard written before sizes were
    recorded (lenscap before 0.4) vouches for its parquet file only, of a size unknown."""
    files = stats.get("files")
    return dict(files) if isinstance(files, dict) else {parquet_name(shard_id): None}


def size_problem(shard_id: int, stats: dict[str, Any], sizes: dict[str, int]) -> str | None:
    """Why the shard's files, by ``sizes`` (a listing), are not those its stats recorded, or None."""
    for name, size in recorded_files(shard_id, stats).items():
        got = sizes.get(name)
        if got is None or (size is None and got == 0):
            return f"{name} is {'missing' if got is None else 'empty'}"
        if size is not None and got != size:
            return f"{name} has {got} bytes, not the {size} written"
    return None


def head_reads(shard_id: int, stats: dict[str, Any]) -> dict[str, int]:
    """The files whose first bytes the cheap checks read, and how many bytes of each."""
    heads = stats.get("head_sha256") or {}
    reads = {}
    for name, size in recorded_files(shard_id, stats).items():
        if name in heads:
            reads[name] = min(HEAD_BYTES, size if size is not None else HEAD_BYTES)
        elif name.endswith(".tar") and (size is None or size >= BLOCK):
            reads[name] = BLOCK  # written before checksums: at least its first header must be one
    return reads


def head_problem(stats: dict[str, Any], heads: dict[str, bytes]) -> str | None:
    """Why the files' first bytes (``heads``, from ``head_reads``) are not those the commit wrote, or None."""
    recorded = stats.get("head_sha256") or {}
    for name, head in heads.items():
        if name in recorded:
            if head_digest(head) != recorded[name]:
                return f"{name} does not begin with the bytes written (replaced or overwritten since)"
        elif head != bytes(BLOCK) and member_name(head) is None:  # an empty archive is all zeros
            return f"{name} does not begin with a tar header"
    return None


def whole_problem(stats: dict[str, Any], name: str, digest: FileDigest) -> str | None:
    """Why file ``name``, read whole (``digest``), is not what the commit wrote, or None; a file whose
    SHA-256 was not recorded is checked by what was (its size, its head)."""
    size = (stats.get("files") or {}).get(name)
    if size is not None and digest.size != size:
        return f"{name} has {digest.size} bytes, not the {size} written"
    head = (stats.get("head_sha256") or {}).get(name)
    if head is not None and digest.head_sha256 != head:
        return f"{name} does not begin with the bytes written (replaced or overwritten since)"
    whole = (stats.get("sha256") or {}).get(name)
    if whole is not None and digest.sha256 != whole:
        return f"{name} does not have the SHA-256 written: its bytes changed since"
    return None
