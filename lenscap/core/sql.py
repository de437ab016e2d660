"""DuckDB: out of core for the global steps (dedup's search, the shuffled export plan), sandboxed for
SQL a user wrote (``filter --where``, ``caption --redo``, ``estimate --where``), and one way to put a
value in a statement that takes no parameters.

DuckDB is imported where a connection is made, here and in the commands that use it: importing it
takes a quarter of a second, which every other command (and ``--help``) would otherwise pay."""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lenscap.core.errors import UsageError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "SqlLimits",
    "check_memory_limit",
    "check_condition",
    "literal",
    "out_of_core",
    "rows_where",
    "run_on_no_rows",
    "run_user_sql",
    "sandboxed",
    "user_expression",
]

# A connection that runs SQL a user typed (or a recipe carried) reads only the tables registered on
# it: no file, no URL, no extension, no ATTACH, no COPY ... TO, and no SET that would undo this.
_SANDBOX = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "lock_configuration": True,
}


_MEMORY_RE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B|B)$", re.IGNORECASE)


def check_memory_limit(value: str, flag: str = "--memory-limit") -> None:
    """A ``UsageError`` unless ``value`` is a size DuckDB's ``memory_limit`` takes (a number and a unit)."""
    if not _MEMORY_RE.match(value):
        raise UsageError(f"{flag} takes a size such as 2GB or 512MiB, not {value!r}")


def literal(value: str | Path) -> str:
    """An SQL string literal (paths and sizes go into statements such as SET and COPY ... TO)."""
    text = value.as_posix() if isinstance(value, Path) else value
    return "'" + text.replace("'", "''") + "'"


def out_of_core(memory_limit: str, spill_dir: Path, threads: int | None = None) -> Any:
    """A DuckDB connection held to ``memory_limit`` that spills to ``spill_dir`` beyond it."""
    import duckdb  # DuckDB takes a quarter second to import: only where a query runs

    spill_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute(f"SET memory_limit = {literal(memory_limit)}")
    con.execute(f"SET temp_directory = {literal(spill_dir)}")
    con.execute("SET preserve_insertion_order = false")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    return con


def sandboxed(limits: SqlLimits | None = None) -> Any:
    """An in-memory DuckDB connection for user SQL: only what is registered on it can be read, in at most
    ``limits.memory`` (nothing spills to disk)."""
    import duckdb  # DuckDB takes a quarter second to import: only where a query runs

    limits = limits or SqlLimits.from_env()
    return duckdb.connect(config={**_SANDBOX, "memory_limit": limits.memory, "temp_directory": ""})


@dataclass(frozen=True)
class SqlLimits:
    """What one query holding a user's SQL may take: ``timeout_s`` seconds and ``memory`` (a DuckDB size),
    per shard. Read from ``$LENSCAP_SQL_TIMEOUT`` and ``$LENSCAP_SQL_MEMORY`` in the main process, and
    carried to the workers with the stage, so a Ray worker holds the same limits."""

    timeout_s: float = 60.0
    memory: str = "2GB"

    @classmethod
    def from_env(cls) -> SqlLimits:
        timeout = os.environ.get("LENSCAP_SQL_TIMEOUT", "").strip()
        memory = os.environ.get("LENSCAP_SQL_MEMORY", "").strip()
        try:
            timeout_s = float(timeout) if timeout else cls.timeout_s
        except ValueError:
            timeout_s = 0.0
        if not timeout_s > 0:
            raise UsageError(f"LENSCAP_SQL_TIMEOUT takes a number of seconds above 0, not {timeout!r}")
        if memory:
            check_memory_limit(memory, "LENSCAP_SQL_MEMORY")
        return cls(timeout_s, memory or cls.memory)


def run_user_sql(con: Any, query: str, limits: SqlLimits, what: str) -> list[tuple[Any, ...]]:
    """``query`` (holding a user's SQL) on ``con`` (``sandboxed(limits)``), stopped after ``limits.timeout_s``:
    one that runs longer or needs more than ``limits.memory`` is a ``UsageError`` (``what: ...``) saying which
    limit and how to raise it. Any other DuckDB error is the caller's to word."""
    import duckdb  # DuckDB takes a quarter second to import: only where a query runs

    fired = threading.Event()

    def stop() -> None:
        fired.set()
        con.interrupt()

    timer = threading.Timer(limits.timeout_s, stop)
    timer.daemon = True
    timer.start()
    try:
        return con.execute(query).fetchall()
    except duckdb.InterruptException:
        if not fired.is_set():
            raise  # not our timer's (Ctrl-C): an interruption, exit code 130
        raise UsageError(
            f"{what}: stopped after {limits.timeout_s:g} s, the time limit of user SQL per shard "
            "(LENSCAP_SQL_TIMEOUT=SECONDS raises it)"
        ) from None
    except duckdb.OutOfMemoryException:
        raise UsageError(
            f"{what}: needs more than {limits.memory}, the memory limit of user SQL "
            "(LENSCAP_SQL_MEMORY=SIZE, e.g. 8GB, raises it)"
        ) from None
    finally:
        timer.cancel()


def user_expression(text: str, flag: str) -> str:
    """``text`` parsed as one SQL expression and written back by DuckDB, so nothing around it (a
    closing parenthesis, a second statement, a comment) can change the query it is put in. Anything
    else is a ``UsageError`` naming ``flag``."""
    import duckdb  # DuckDB takes a quarter second to import: only where a query runs

    try:
        return str(duckdb.SQLExpression(text))
    except duckdb.Error as e:
        raise UsageError(f"{flag} must be one SQL expression over the dataset's columns ({str(e).splitlines()[0]})") from None


def check_condition(text: str, flag: str, schema: pa.Schema, where: str, limits: SqlLimits | None = None) -> str:
    """``text`` (one SQL expression, ``user_expression``) as a row condition, null counting as false,
    run on no rows of ``schema`` first: an empty or bad expression, an unknown column or a file it
    would read is one ``UsageError`` here (naming the columns there are), before any work."""
    if not text.strip():
        raise UsageError(f"{flag} is empty; give an SQL expression over the dataset's columns, or leave it out")
    condition = f"coalesce(({user_expression(text, flag)}), false)"
    run_on_no_rows(f"SELECT key FROM t WHERE {condition}", schema.empty_table(), f"{flag} cannot run on {where}", limits)
    return condition


def run_on_no_rows(query: str, empty: pa.Table, what: str, limits: SqlLimits | None = None) -> None:
    """Run a query holding a user's SQL on ``empty`` (table ``t``, no rows), sandboxed: a bad expression,
    an unknown column or a file it would read is one ``UsageError`` (``what: why``, naming the columns
    there are) before any work. A subquery of its own still runs on no rows: under ``limits``."""
    import duckdb  # DuckDB takes a quarter second to import: only where a query runs

    limits = limits or SqlLimits.from_env()
    con = sandboxed(limits)
    try:
        con.register("t", empty)
        run_user_sql(con, query, limits, what)
    except duckdb.Error as e:
        message = str(e).splitlines()[0]
        if isinstance(e, duckdb.BinderException):
            message += f" (columns: {', '.join(empty.column_names)})"
        raise UsageError(f"{what}: {message}") from None
    finally:
        con.close()


def rows_where(
    table: pa.Table, condition: str, what: str, select: str = "key", limits: SqlLimits | None = None
) -> list[tuple[Any, ...]]:
    """``SELECT select FROM table WHERE condition`` on a connection of its own that can read nothing
    else, since the condition is a user's, under ``limits`` (``run_user_sql``, ``what`` naming it)."""
    limits = limits or SqlLimits.from_env()
    con = sandboxed(limits)
    try:
        con.register("t", table)
        return run_user_sql(con, f"SELECT {select} FROM t WHERE {condition}", limits, what)
    finally:
        con.close()
