"""What a recipe's stage record is checked against on a rerun: fingerprints of what a stage read and
wrote (names, sizes and times, never bytes), and what changed in its command line."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lenscap.core.storage import is_remote
from lenscap.download.inputs import resolve_input_files

__all__ = ["fingerprint", "source_fingerprint", "changes"]


def fingerprint(path: str | os.PathLike[str]) -> str | None:
    """What identifies the content of ``path`` cheaply, without reading it: a digest of the relative
    name, size and modification time (ns) of every file (a dataset directory: its shards' ``.tar`` /
    ``.parquet`` / ``_stats.json``, its ``lenscap.json``, a report); names starting with a dot (a
    command's private ``.lenscap/`` state: lock, claim, journals) are left out. None if nothing is there.

    A directory written again (deleted and rebuilt, ``--overwrite``, a shard replaced) has another
    fingerprint even where its content is the same: a rebuilt dataset has a new manifest ``id``, which
    the datasets referring to its images check, so what was built from it is stale either way."""
    root = Path(path)
    try:
        st = root.stat()
    except OSError:
        return None
    digest = hashlib.sha256()
    if not root.is_dir():
        digest.update(f"{st.st_size} {st.st_mtime_ns}".encode())
        return digest.hexdigest()[:24]
    files = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            try:
                fst = os.stat(full)
            except OSError:  # removed while listed: another fingerprint than a whole directory's
                continue
            digest.update(f"{os.path.relpath(full, root)}\0{fst.st_size}\0{fst.st_mtime_ns}\n".encode())
            files += 1
    digest.update(f"files {files}".encode())
    return digest.hexdigest()[:24]


_HASHED_LIST_BYTES = 1 << 30  # a URL list file up to this size is known by its content, a larger one by its size and time


def _file_digest(path: str) -> str | None:
    """A URL list file's fingerprint: a digest of its bytes (rewritten with the same rows, it is the same
    list, and nothing is downloaded again); above ``_HASHED_LIST_BYTES``, its size and time."""
    try:
        size = os.path.getsize(path)
        if size > _HASHED_LIST_BYTES:
            return fingerprint(path)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:24]
    except OSError:
        return None


def source_fingerprint(source: str) -> str:
    """A URL list's fingerprint: its local files' names and contents (``_file_digest``); a remote one
    by its location."""
    if source == "-" or is_remote(source):
        return hashlib.sha256(source.encode()).hexdigest()[:24]
    try:
        files = resolve_input_files(source)
    except Exception:  # noqa: BLE001 - an unreadable input is the download's to report
        files = [source]
    return hashlib.sha256("\n".join(f"{f}\0{_file_digest(f)}" for f in files).encode()).hexdigest()[:24]


def _option_pairs(argv: list[str]) -> dict[str, list[str]]:
    """A command line's flags, as flag -> values ("" for a flag without a value), positionals under ""."""
    out: dict[str, list[str]] = {}
    key = ""
    for token in argv:
        if token.startswith("--"):
            key = token
            out.setdefault(key, [])
        elif key:
            out[key].append(token)
            key = ""
        else:
            out.setdefault("", []).append(token)
    return out


def _shown(values: list[str] | None) -> str:
    return "(not set)" if values is None else " ".join(v for v in values if v) or "(set)"


def changes(old: list[str], new: list[str]) -> str:
    """What differs between two command lines, for a person: ``--min-side 200 -> 256``."""
    before, after = _option_pairs(old[1:]), _option_pairs(new[1:])
    parts = []
    for flag in [*before, *(f for f in after if f not in before)]:
        a, b = before.get(flag), after.get(flag)
        if a == b:
            continue
        parts.append(f"{flag or 'arguments'} {_shown(a)} -> {_shown(b)}")
    return "; ".join(parts) or "the command line"
