"""Progress for long work: a rich bar on a terminal, plain timestamped log lines elsewhere (cron).

Both write to stderr: stdout is kept for ``--json`` summaries.
"""

from __future__ import annotations

import sys
import time
from typing import Protocol

__all__ = ["Progress", "make_progress", "log", "set_log_file"]


_log_file: str | None = None


def set_log_file(path: str | None) -> None:
    """Also append every log line (progress, notes) to ``path``: ``--log-file``."""
    global _log_file
    if path is not None:
        try:
            with open(path, "a"):
                pass
        except OSError as e:
            from lenscap.errors import UsageError

            raise UsageError(f"--log-file {path}: {e.strerror}") from None
    _log_file = path


def log(message: str, to_stderr: bool = True) -> None:
    """A plain timestamped line on stderr (and in the --log-file): what cron mails and log files keep."""
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} lenscap: {message}"
    if to_stderr:
        print(line, file=sys.stderr, flush=True)
    if _log_file is not None:
        with open(_log_file, "a") as f:
            f.write(line + "\n")


class Progress(Protocol):
    def start(self, total_shards: int, done_shards: int = 0) -> None: ...
    def advance(self, shards: int = 0, samples: int = 0) -> None: ...
    def status(self, text: str) -> None: ...
    def note(self, message: str) -> None: ...
    def finish(self) -> None: ...


class _Rates:
    def __init__(self, label: str) -> None:
        self.label = label
        self.total = 0
        self.done = 0
        self.samples = 0
        self.started = time.monotonic()
        self._first_done = 0
        self.extra = ""

    def status(self, text: str) -> None:
        """A short live figure shown with the rates (e.g. money spent)."""
        self.extra = text

    def start(self, total_shards: int, done_shards: int = 0) -> None:
        self.total, self.done, self._first_done = total_shards, done_shards, done_shards
        self.started = time.monotonic()

    def rate(self) -> float:
        return self.samples / max(time.monotonic() - self.started, 1e-9)

    def eta_s(self) -> float | None:
        shards_now = self.done - self._first_done
        if shards_now <= 0:
            return None
        per_shard = (time.monotonic() - self.started) / shards_now
        return per_shard * (self.total - self.done)


class LogProgress(_Rates):
    """Periodic plain lines: shards done, samples/s, ETA."""

    def __init__(self, label: str, interval_s: float = 30.0, quiet: bool = False) -> None:
        super().__init__(label)
        self.interval_s = interval_s
        self.quiet = quiet
        self._last = 0.0

    def start(self, total_shards: int, done_shards: int = 0) -> None:
        super().start(total_shards, done_shards)
        self._last = time.monotonic()
        log(f"{self.label}: {total_shards - done_shards} of {total_shards} shards to do", to_stderr=not self.quiet)

    def advance(self, shards: int = 0, samples: int = 0) -> None:
        self.done += shards
        self.samples += samples
        if (not self.quiet or _log_file) and time.monotonic() - self._last >= self.interval_s:
            self._last = time.monotonic()
            self._line()

    def _line(self) -> None:
        eta = self.eta_s()
        eta_text = f", ETA {eta:.0f}s" if eta is not None else ""
        extra = f", {self.extra}" if self.extra else ""
        log(f"{self.label}: {self.done}/{self.total} shards, {self.samples} samples, {self.rate():.1f} samples/s{extra}{eta_text}",
            to_stderr=not self.quiet)

    def note(self, message: str) -> None:
        log(message)  # notes say what went wrong and what to do: --quiet silences progress, not these

    def finish(self) -> None:
        self._line()


class RichProgress(_Rates):
    """A live bar: shards, samples/s, ETA."""

    def __init__(self, label: str) -> None:
        super().__init__(label)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as _P, TextColumn, TimeRemainingColumn

        self._console = Console(stderr=True)
        self._bar = _P(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("shards"),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
        )
        self._task = None

    def start(self, total_shards: int, done_shards: int = 0) -> None:
        super().start(total_shards, done_shards)
        self._bar.start()
        self._task = self._bar.add_task(self.label, total=total_shards, completed=done_shards, rate="")

    def advance(self, shards: int = 0, samples: int = 0) -> None:
        self.done += shards
        self.samples += samples
        if self._task is not None:
            extra = f"  {self.extra}" if self.extra else ""
            self._bar.update(self._task, completed=self.done, rate=f"{self.rate():.1f} samples/s{extra}")

    def note(self, message: str) -> None:
        self._console.print(message)
        log(message, to_stderr=False)

    def finish(self) -> None:
        self._bar.stop()


def make_progress(label: str, quiet: bool = False) -> Progress:
    if not quiet and sys.stderr.isatty() and _log_file is None:
        return RichProgress(label)
    return LogProgress(label, quiet=quiet)
