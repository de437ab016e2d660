"""DuckDB for the global steps (dedup's search, the shuffled export plan): one way to open it out of
core, and one way to put a value in a statement that takes no parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["literal", "out_of_core"]


def literal(value: str | Path) -> str:
    """An SQL string literal (paths and sizes go into statements such as SET and COPY ... TO)."""
    text = value.as_posix() if isinstance(value, Path) else value
    return "'" + text.replace("'", "''") + "'"


def out_of_core(memory_limit: str, spill_dir: Path, threads: int | None = None) -> Any:
    """A DuckDB connection held to ``memory_limit`` that spills to ``spill_dir`` beyond it."""
    import duckdb

    spill_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute(f"SET memory_limit = {literal(memory_limit)}")
    con.execute(f"SET temp_directory = {literal(spill_dir)}")
    con.execute("SET preserve_insertion_order = false")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    return con
