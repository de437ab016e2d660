"""What every command that writes a dataset returns: one typed result, and the exit code it means.

``JobResult`` holds what all of them share (the command, where the output is, its shards and samples,
the counts its manifest sums, the shards that failed in this run) and, in ``details``, the figures of
the command's own (filter's ``kept``, caption's ``spent_usd``, an export's ``bytes``), which read as
attributes too (``result.kept``). ``summary()`` is the command's ``--json`` object.

The exit-code policy is stated here, once (``exit_code``; docs/exit-codes.md lists the codes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["JobResult", "ErrorShare", "EXIT_OK", "EXIT_FAILED", "EXIT_EMPTY", "EXIT_MEANINGS"]

EXIT_OK = 0
# Some shards failed (the others are kept), the disk filled, or the caption server stayed down: rerun to finish.
EXIT_FAILED = 1
# The output holds 0 samples (a filter that kept none, an empty export, a recipe stage that left none):
# a warning, distinct from success (0) and failure (1).
EXIT_EMPTY = 7

# What each exit code means, in the log's last line of a run (a cron log read the next morning).
EXIT_MEANINGS = {
    0: "ok",
    1: "some shards failed, or too many samples failed: rerun to finish",
    2: "usage error",
    3: "internal error",
    4: "--max-cost reached",
    5: "locked by another run",
    6: "an audit rule broken",
    7: "0 samples",
    130: "interrupted",
}


@dataclass(frozen=True)
class ErrorShare:
    """How many of a run's samples failed for the world's reasons (a server's errors, dead URLs), against
    the share the command allows (``--max-error-share``): over it, the run is a failure (exit 1) even
    though every shard was written. The outcome policy is stated in docs/exit-codes.md."""

    failed: int  # samples that failed
    of: int  # samples tried
    max_share: float  # the most that still counts as the world's ordinary failures (0: none)
    commonest: str = ""  # the commonest reason, as the samples' rows say it
    fix: str = ""  # what to do, for the message
    # How many samples failed for the commonest reason: when known (a download's), the message ends
    # with a line of its own that names the reason, counted, and its fix: the line a person acts on.
    commonest_count: int = 0

    @property
    def exceeded(self) -> bool:
        return self.failed > 0 and self.failed > self.max_share * self.of

    def message(self, what: str) -> str:
        share = f"{self.failed / self.of:.0%}" if self.of else "all"
        if self.commonest_count:
            return (
                f"{self.failed} of {self.of} {what} failed ({share}), more than --max-error-share {self.max_share:g} allows\n"
                f"{self.commonest_count} of {self.of} {self.commonest}" + (f"; {self.fix}" if self.fix else "")
            )
        reason = f" (commonest: {self.commonest})" if self.commonest else ""
        return (
            f"{self.failed} of {self.of} {what} failed ({share}){reason}, more than --max-error-share "
            f"{self.max_share:g} allows" + (f": {self.fix}" if self.fix else "")
        )

    def summary(self, what: str) -> dict[str, Any]:
        return {
            "failed": self.failed,
            "of": self.of,
            "max_share": self.max_share,
            "commonest": self.commonest or None,
            "exceeded": self.exceeded,
            **({"message": self.message(what).replace("\n", ": ")} if self.exceeded else {}),
        }


@dataclass
class JobResult:
    command: str
    out_dir: str | None
    shards_total: int = 0
    shards_completed: int = 0
    samples: int = 0
    status: dict[str, int] = field(default_factory=dict)
    # Shards that failed in this run (their id: why); a rerun does them again.
    failed_shards: dict[int, str] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    # False: the job goes on elsewhere (a batch job's batches still running): unfinished shards are not failures.
    complete: bool = True
    # The output holds no sample for the next stage to work on (a filter that kept none, an empty export).
    empty: bool = False
    # What a person at a terminal should do next (run these files through vllm, rerun to collect): not
    # part of the summary.
    advice: list[str] = field(default_factory=list)
    # The samples that failed, against what the command allows (caption, download); None: not judged.
    errors: ErrorShare | None = None

    @classmethod
    def from_manifest(
        cls, command: str, out_dir: str, manifest: dict[str, Any], failed: dict[int, str] | None = None, **fields: Any
    ) -> JobResult:
        """The result of a job whose output's manifest (just written) is ``manifest``."""
        counts = manifest.get("counts") or {}
        shards = manifest.get("shards") or {}
        return cls(
            command,
            out_dir,
            shards.get("expected") or 0,
            shards.get("completed") or 0,
            counts.get("samples", 0),
            counts.get("status", {}),
            dict(failed or {}),
            counts,
            **fields,
        )

    def __getattr__(self, name: str) -> Any:
        details = self.__dict__.get("details")
        if details is not None and name in details:
            return details[name]
        raise AttributeError(f"{type(self).__name__} of {self.__dict__.get('command')} has no {name!r}")

    @property
    def exit_code(self) -> int:
        """1: a shard failed, shards are missing from a job that is over (a rerun finishes them), or more
        samples failed than ``--max-error-share`` allows; 7: done, with nothing in the output; else 0."""
        if self.failed_shards or (self.complete and self.shards_completed < self.shards_total):
            return EXIT_FAILED
        if self.errors is not None and self.errors.exceeded:
            return EXIT_FAILED
        return EXIT_EMPTY if self.empty else EXIT_OK

    def summary(self) -> dict[str, Any]:
        """The ``--json`` object (less ``ok``, which the CLI adds). A run that wrote nothing (a dry run:
        ``out_dir`` None) has its figures only."""
        if self.out_dir is None:
            return {"command": self.command, **self.details, "samples": self.samples, "exit_code": self.exit_code}
        return {
            "command": self.command,
            "out_dir": self.out_dir,
            "shards_total": self.shards_total,
            "shards_completed": self.shards_completed,
            "samples": self.samples,
            "status": self.status,
            "failed_shards": self.failed_shards,
            "counts": self.counts,
            **self.details,
            **({"errors": self.errors.summary(_SAMPLES.get(self.command, "samples"))} if self.errors is not None else {}),
            "exit_code": self.exit_code,
        }

    @property
    def verdict(self) -> str | None:
        """Why a run whose shards were all written still failed (the error share), for stderr."""
        if self.errors is not None and self.errors.exceeded and not self.failed_shards:
            return self.errors.message(_SAMPLES.get(self.command, "samples"))
        return None


_SAMPLES = {"caption": "captions", "download": "downloads"}  # what a command's failed samples are called
