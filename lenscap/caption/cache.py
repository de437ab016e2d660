"""A persistent response cache shared by every dataset a user captions.

Keyed by the image's SHA-256, backend, model, prompt hash, generation parameters and (when the
prompt uses it) the alt-text, so re-running a recipe over overlapping data never pays twice. SQLite
in WAL mode: several worker processes read and write it at once, one row per caption, nothing held
in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

__all__ = ["ResponseCache", "cache_key", "default_cache_dir", "CACHE_DIR_TEXT"]


# What --help says default_cache_dir() is (tests/test_help_defaults.py holds them to each other).
CACHE_DIR_TEXT = "$LENSCAP_CACHE_DIR, else $XDG_CACHE_HOME/lenscap, else ~/.cache/lenscap"


def default_cache_dir() -> Path:
    """``$LENSCAP_CACHE_DIR``, else ``$XDG_CACHE_HOME/lenscap``, else ``~/.cache/lenscap``."""
    if os.environ.get("LENSCAP_CACHE_DIR"):
        return Path(os.environ["LENSCAP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lenscap"


def cache_key(image_sha256: str, identity: dict[str, Any], alt_text: str | None) -> str:
    blob = json.dumps([image_sha256, identity, alt_text], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "captions.sqlite"
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: survives process crashes, not power loss
        self._db.execute("CREATE TABLE IF NOT EXISTS captions (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT value FROM captions WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO captions (key, value) VALUES (?, ?)", (key, json.dumps(value, ensure_ascii=False))
        )

    def close(self) -> None:
        self._db.close()
