"""The ``lenscap`` command line: ``app`` (``lenscap.cli.app``, generated from the commands' options
objects) and ``main``, which turns every way a command can end into one line, an exit code and, with
``--json``, exactly one JSON object on stdout."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import typer
import typer.main

from lenscap.cli.app import ALIASES, app, build_app, emit, last_summary, money
from lenscap.core.errors import LenscapError
from lenscap.core.progress import capture_warnings, log, log_file
from lenscap.core.result import EXIT_MEANINGS

__all__ = ["app", "build_app", "main", "fail", "money", "ALIASES"]


def _wants_json(argv: list[str]) -> bool:
    return "--json" in argv[: argv.index("--") if "--" in argv else len(argv)]


def fail(message: str, code: int, as_json: bool, summary: dict[str, Any] | None = None) -> int:
    """A run that ended in an error: one line on stderr and in the log, and with --json the one object on stdout."""
    print(f"lenscap: {message}", file=sys.stderr)
    log(message, to_stderr=False)
    if as_json:  # the object says what went wrong; "error: " is for people reading stderr
        emit({**(summary or {}), "exit_code": code, "error": message.removeprefix("error: ")}, True)
    return code


def _last_line(argv: list[str], code: int, seconds: float) -> str:
    """The log's last line for a run: how it ended, what it produced, how long it took, what it cost."""
    names = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    command = next((a for a in argv if a in names), "lenscap")
    s = last_summary
    meaning = EXIT_MEANINGS.get(code)
    parts = [f"{command}: exit {code}" + (f" ({meaning})" if meaning else "")]
    where = s.get("out_dir") or s.get("path") or s.get("release") or s.get("html") or s.get("work_dir")
    if s.get("ended"):  # a recipe's own words: the release it wrote, or why it wrote none
        parts.append(s["ended"])
    elif s.get("samples") is not None and where:
        parts.append(f"{s['samples']:,} samples in {where}")
    elif where:
        parts.append(f"wrote {where}")
    parts.append(f"{seconds:.1f} s")
    spent = s.get("spent_usd")
    if isinstance(spent, (int, float)):
        parts.append(f"${spent:.4f} spent")
    return "; ".join(parts)


def _run(argv: list[str], as_json: bool) -> int:
    """The command's exit code, however it ends: user mistakes are one line and exit code 2, never a traceback."""
    try:
        # Outside standalone mode Typer returns a command's exit code instead of exiting; it turns
        # Ctrl-C into 130 the same way.
        code = app(standalone_mode=False)
    except LenscapError as e:
        code = fail(f"error: {e}", e.exit_code, as_json, getattr(e, "summary", None))
    except typer.Exit as e:
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except Exception as e:  # noqa: BLE001
        # Typer's (vendored click) parse errors: bad flags and values, usage mistakes.
        if hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int):
            code = fail(f"error: {e.format_message()}", 2 if e.exit_code in (1, 2) else e.exit_code, as_json)
        else:
            if os.environ.get("LENSCAP_DEBUG"):
                raise
            code = fail(f"internal error: {type(e).__name__}: {e} (set LENSCAP_DEBUG=1 for a traceback)", 3, as_json)
    return code if isinstance(code, int) else 0


def main() -> None:
    """Entry point. With --json, stdout holds exactly one object however the command ends; with
    --log-file, the log ends with one line saying how it ended."""
    capture_warnings()  # a library's warnings go to the --log-file, never to stderr
    argv = sys.argv[1:]
    as_json = _wants_json(argv)
    started = time.monotonic()
    last_summary.clear()
    code = _run(argv, as_json)
    if code == 130:
        fail("interrupted; rerun the same command to resume", 130, as_json)
    if log_file() is not None:
        log(_last_line(argv, code, time.monotonic() - started), to_stderr=False)
    sys.exit(code)


if __name__ == "__main__":
    main()
