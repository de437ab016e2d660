"""DuckDB: out of core for the global steps (dedup's search, the shuffled export plan), sandboxed for
SQL a user wrote (``filter --where``), and one way to put a value in a statement that takes no parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["literal", "out_of_core", "sandboxed", "user_expression"]

# A connection that runs SQL a user typed (or a recipe carried) reads only the tables registered on
# it: no file, no URL, no extension, no ATTACH, no COPY ... TO, and no SET that would undo this.
_SANDBOX = {"enable_external_access": False, "autoinstall_known_extensions": False,
            "autoload_known_extensions": False, "lock_configuration": True}


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


def sandboxed() -> Any:
    """An in-memory DuckDB connection for user SQL: only what is registered on it can be read."""
    import duckdb

    return duckdb.connect(config=dict(_SANDBOX))


def user_expression(text: str, flag: str) -> str:
    """``text`` parsed as one SQL expression and written back by DuckDB, so nothing around it (a
    closing parenthesis, a second statement, a comment) can change the query it is put in. Anything
    else is a ``UsageError`` naming ``flag``."""
    import duckdb

    from lenscap.errors import UsageError

    try:
        return str(duckdb.SQLExpression(text))
    except duckdb.Error as e:
        raise UsageError(f"{flag} must be one SQL expression over the dataset's columns ({str(e).splitlines()[0]})") from None
