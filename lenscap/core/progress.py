"""Progress for long work: a rich bar on a terminal, plain timestamped log lines elsewhere (cron).

Both write to stderr: stdout is kept for ``--json`` summaries. Every line goes through the stdlib
``logging`` logger ``lenscap``: one handler writes to stderr (unless the line is quiet), and
``--log-file`` adds a file handler that gets every line, quiet or not (a cron job's log is its record).
A program that embeds lenscap can add its own handlers to that logger; it does not propagate to the
root logger, so a ``logging.basicConfig()`` does not print each line twice.

Rates exclude start-up: samples per second are measured from the first sample done (img2dataset's
imports, a model's loading and the first shard's latency are not work done), and the ETA is the
samples left at that rate where the total is known, else the shards left at the time per shard.
"""

from __future__ import annotations

import inspect
import logging
import logging.handlers
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from lenscap.core.errors import UsageError

__all__ = [
    "Progress",
    "make_progress",
    "log",
    "say",
    "set_log_file",
    "log_file",
    "capture_warnings",
    "logger",
    "LogProgress",
    "RichProgress",
    "accepts",
    "start_progress",
]

LINE_FORMAT = "%(asctime)s lenscap: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_TO_STDERR = "lenscap_to_stderr"  # a record's attribute: False for a line meant for the log file only

logger = logging.getLogger("lenscap")
logger.setLevel(logging.INFO)
logger.propagate = False


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (pytest's capture, a redirected stream)."""

    lenscap_handler = "stderr"

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass

    def handleError(self, record: logging.LogRecord) -> None:
        pass  # a closed or broken stderr (a pipe to `head`) must not end the run, nor print a traceback


class _LogFileHandler(logging.handlers.WatchedFileHandler):
    """``--log-file``: appended to, one flushed line at a time; reopened if the file was rotated or
    removed (logrotate), as the earlier open-per-line writer did."""

    lenscap_handler = "file"

    def handleError(self, record: logging.LogRecord) -> None:
        pass  # a full disk under the log must not stop a download, nor print a traceback


def _wants_stderr(record: logging.LogRecord) -> bool:
    return bool(getattr(record, _TO_STDERR, True))


def _formatter() -> logging.Formatter:
    return logging.Formatter(LINE_FORMAT, DATE_FORMAT)


def _install_stderr_handler() -> logging.Handler:
    for h in list(logger.handlers):  # a reload of this module: one stderr handler, not two
        if getattr(h, "lenscap_handler", None) == "stderr":
            logger.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(_formatter())
    handler.addFilter(_wants_stderr)
    logger.addHandler(handler)
    return handler


_stderr_handler = _install_stderr_handler()
_file_handler: _LogFileHandler | None = None
_file_path: str | None = None


def set_log_file(path: str | None) -> None:
    """Also append every log line (progress, notes, quiet ones too) to ``path``: ``--log-file``.

    A new path replaces the earlier one; ``None`` removes it. One file handler at most, however
    many times this is called (tests run many commands in one process)."""
    global _file_handler, _file_path
    new: _LogFileHandler | None = None
    if path is not None:
        try:
            new = _LogFileHandler(path, mode="a", encoding="utf-8")
        except OSError as e:
            raise UsageError(f"--log-file {path}: {e.strerror}") from None
        new.setFormatter(_formatter())
    old = _file_handler
    for h in list(logger.handlers):
        if getattr(h, "lenscap_handler", None) == "file":
            logger.removeHandler(h)
            h.close()
    if old is not None:
        old.close()
    _file_handler, _file_path = new, path
    if new is not None:
        logger.addHandler(new)


def log_file() -> str | None:
    """The path given to ``set_log_file`` (``--log-file``), or None."""
    return _file_path


def log(message: str, to_stderr: bool = True) -> None:
    """A plain timestamped line on stderr (and in the --log-file): what cron mails and log files keep.
    ``to_stderr=False``: the log file only (progress under --quiet)."""
    logger.info(message, extra={_TO_STDERR: to_stderr})


def say(message: str) -> None:
    """A note a person must read whatever the flags (--quiet, --json): ``lenscap: MESSAGE`` on stderr, as
    it happens, and in the --log-file. ``message`` starts with what it is: ``note:``, ``warning:``."""
    print(f"lenscap: {message}", file=sys.stderr, flush=True)
    log(message, to_stderr=False)


class _WarningsToLogFile(logging.Handler):
    """Python warnings (``logging.captureWarnings``): one line each in the --log-file, never on stderr."""

    lenscap_handler = "warnings"

    def emit(self, record: logging.LogRecord) -> None:
        if _file_handler is None:
            return
        text = record.getMessage().strip().splitlines()
        first = text[0] if text else ""
        _file_handler.handle(
            logging.makeLogRecord(
                {
                    "msg": f"warning: {first}",
                    "levelno": logging.WARNING,
                    "levelname": "WARNING",
                    "created": record.created,
                    "msecs": record.msecs,
                }
            )
        )


def capture_warnings() -> None:
    """Route Python warnings (a library's DeprecationWarning or UserWarning) into the --log-file, and off
    stderr: they are not the user's business, but a log that records them helps whoever upgrades a
    library. Meant for the CLI's entry point; idempotent."""
    logging.captureWarnings(True)
    w = logging.getLogger("py.warnings")
    w.propagate = False
    if not any(getattr(h, "lenscap_handler", None) == "warnings" for h in w.handlers):
        w.addHandler(_WarningsToLogFile())


class Progress(Protocol):
    def start(self, total_shards: int, done_shards: int = 0) -> None: ...
    def advance(self, shards: int = 0, samples: int = 0) -> None: ...
    def status(self, text: str) -> None: ...
    def note(self, message: str) -> None: ...
    def finish(self) -> None: ...

    # Also taken by lenscap's own progress (optional keywords, so older spies still fit the calls above):
    # start(..., total_samples=N, done_samples=D) and advance(..., failed=F): of ``samples``, F failed.


def accepts(method: Any, name: str) -> bool:
    """Whether ``method`` takes the keyword ``name``: lenscap's progress takes the optional sample
    counts; a caller's own progress may implement only the protocol above."""
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def start_progress(
    progress: Progress,
    total_shards: int,
    done_shards: int = 0,
    *,
    total_samples: int | None = None,
    done_samples: int = 0,
    failed_samples: int = 0,
) -> None:
    """``progress.start``, with the sample counts where the progress takes them."""
    if accepts(progress.start, "total_samples"):
        progress.start(
            total_shards,
            done_shards,
            total_samples=total_samples,  # type: ignore[call-arg]
            done_samples=done_samples,
            failed_samples=failed_samples,
        )
    else:
        progress.start(total_shards, done_shards)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _Rates:
    """Counts and the figures shown from them. ``unit``: what ``total_shards`` counts (shards, or a
    pass's steps). ``clock``: seconds, monotonic (a test gives a fake one)."""

    def __init__(self, label: str, unit: str = "shards", clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.unit = unit
        self._clock = clock
        self.total = 0
        self.done = 0
        self.samples = 0
        self.failed = 0
        self.total_samples: int | None = None
        self.started = clock()
        self._first_done = 0
        self._first_samples = 0
        self._rate_since: float | None = None  # when the first sample of this run was done
        self._rate_base = 0  # samples done by then
        self.extra = ""

    def status(self, text: str) -> None:
        """A short live figure shown with the rates (e.g. money spent, the step a pass is on)."""
        self.extra = text

    def start(
        self,
        total_shards: int,
        done_shards: int = 0,
        *,
        total_samples: int | None = None,
        done_samples: int = 0,
        failed_samples: int = 0,
    ) -> None:
        self.total, self.done, self._first_done = total_shards, done_shards, done_shards
        self.total_samples = total_samples
        self.samples = self._first_samples = done_samples
        self.failed = failed_samples
        self.started = self._clock()
        self._rate_since = None

    def _count(self, shards: int, samples: int, failed: int) -> None:
        self.done += shards
        if samples and self._rate_since is None:
            # Rates run from here: what came before (start-up, the first batch's latency) is not throughput.
            self._rate_since, self._rate_base = self._clock(), self.samples + samples
        self.samples += samples
        self.failed += failed

    def rate(self) -> float:
        """Samples per second since the first sample done (0 until there are two moments to compare)."""
        if self._rate_since is None:
            return 0.0
        elapsed = self._clock() - self._rate_since
        if elapsed <= 0:
            return 0.0
        return (self.samples - self._rate_base) / elapsed

    def _overall_rate(self) -> float:
        """For the last line of a pass whose samples all came at once: per second since the start."""
        return (self.samples - self._first_samples) / max(self._clock() - self.started, 1e-9)

    def eta_s(self) -> float | None:
        """Seconds left: the samples left at the current rate where the total is known, else the shards
        left at the time per shard so far."""
        rate = self.rate()
        if self.total_samples is not None and rate > 0 and self.samples <= self.total_samples:
            return max(self.total_samples - self.samples, 0) / rate
        shards_now = self.done - self._first_done
        if shards_now <= 0:
            return None
        per_shard = (self._clock() - self.started) / shards_now
        return per_shard * max(self.total - self.done, 0)

    def _figures(self, final: bool = False) -> list[str]:
        parts = []
        if self.unit == "shards":
            parts.append(f"{self.done}/{self.total} shards")
            known = self.total_samples is not None and self.samples <= self.total_samples
            samples = f"{self.samples:,}/{self.total_samples:,}" if known else f"{self.samples:,}"
            if self.samples or known:
                parts.append(f"{samples} samples" + (f" ({self.failed:,} failed)" if self.failed else ""))
            rate = self.rate()
            if final and not rate and self.samples > self._first_samples:
                rate = self._overall_rate()  # all at once (one shard's count at its end): no better figure
            if rate:
                parts.append(f"{rate:.1f} samples/s")
        elif self.total > 1:  # a pass of one step says where it is in its status instead
            parts.append(
                f"{self.unit.rstrip('s')} {min(self.done + 1, self.total)}/{self.total}"
                if not final
                else f"{self.done}/{self.total} {self.unit}"
            )
        if self.extra:
            parts.append(self.extra)
        if final:
            parts.append(f"{_duration(self._clock() - self.started)}")
        else:
            eta = self.eta_s()
            if eta is not None:
                parts.append(f"ETA {_duration(eta)}")
        return parts


class LogProgress(_Rates):
    """Periodic plain lines: shards and samples done (failures too), samples/s, ETA."""

    def __init__(
        self,
        label: str,
        interval_s: float = 30.0,
        quiet: bool = False,
        unit: str = "shards",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(label, unit, clock)
        self.interval_s = interval_s
        self.quiet = quiet
        self._last = 0.0

    def start(self, total_shards: int, done_shards: int = 0, **samples: Any) -> None:
        super().start(total_shards, done_shards, **samples)
        self._last = self._clock()
        if self.unit == "shards":
            todo = f"{total_shards - done_shards} of {total_shards} shards to do"
            if self.total_samples is not None:
                todo += f" ({self.total_samples - self.samples:,} of {self.total_samples:,} samples)"
        else:
            todo = f"{total_shards} {self.unit}" if total_shards > 1 else "started"
        log(f"{self.label}: {todo}", to_stderr=not self.quiet)

    def advance(self, shards: int = 0, samples: int = 0, failed: int = 0) -> None:
        self._count(shards, samples, failed)
        self._maybe_line()

    def status(self, text: str) -> None:
        super().status(text)
        self._maybe_line()  # a pass that only says what it is doing (a search, batch polling) still logs

    def _maybe_line(self) -> None:
        if (not self.quiet or log_file() is not None) and self._clock() - self._last >= self.interval_s:
            self._last = self._clock()
            self._line()

    def _line(self, final: bool = False) -> None:
        log(f"{self.label}: {', '.join(self._figures(final))}", to_stderr=not self.quiet)

    def note(self, message: str) -> None:
        log(message)  # notes say what went wrong and what to do: --quiet silences progress, not these

    def finish(self) -> None:
        self._line(final=True)


class RichProgress(_Rates):
    """A live bar over samples where their total is known (else shards), with failures, samples/s and ETA."""

    def __init__(self, label: str, unit: str = "shards", clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(label, unit, clock)
        from rich.console import Console  # only a terminal's bar needs it
        from rich.progress import BarColumn, TextColumn
        from rich.progress import Progress as _P

        self._console = Console(stderr=True)
        self._bar = _P(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[text]}"),
            console=self._console,
            transient=False,
        )
        self._task: Any = None

    def start(self, total_shards: int, done_shards: int = 0, **samples: Any) -> None:
        super().start(total_shards, done_shards, **samples)
        self._bar.start()
        self._task = self._bar.add_task(self.label, total=1, completed=0, text="")
        self._show()

    def _show(self, final: bool = False) -> None:
        if self._task is None:
            return
        if self.total_samples and self.samples <= self.total_samples:
            total, completed = self.total_samples, self.samples
        else:
            total, completed = max(self.total, 1), self.done
        self._bar.update(self._task, total=total, completed=min(completed, total), text=" · ".join(self._figures(final)))

    def advance(self, shards: int = 0, samples: int = 0, failed: int = 0) -> None:
        self._count(shards, samples, failed)
        self._show()

    def status(self, text: str) -> None:
        super().status(text)
        self._show()

    def note(self, message: str) -> None:
        self._console.print(message)
        log(message, to_stderr=False)

    def finish(self) -> None:
        self._show(final=True)
        self._bar.stop()


def make_progress(label: str, quiet: bool = False, unit: str = "shards") -> Progress:
    """A live bar on a terminal; timestamped lines (every 30 s) elsewhere, or with --log-file."""
    if not quiet and sys.stderr.isatty() and log_file() is None:
        return RichProgress(label, unit)
    return LogProgress(label, quiet=quiet, unit=unit)
