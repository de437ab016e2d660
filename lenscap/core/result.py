"""What every command's job returns: one typed result.

``JobResult`` holds what all of them share (where the output is, its shards and samples, the counts
its manifest sums, the shards that failed in this run) and the exit code those imply. A command that
has more to say adds fields in a subclass (dedup's report, an export's format and bytes, a batch
job's files and spend); the CLI prints ``asdict`` of it as the JSON summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["JobResult", "EXIT_EMPTY"]

# The exit code of a job whose output holds 0 samples (a filter that kept none, an empty export, a
# recipe stage that left none): a warning, distinct from success (0) and failure (1).
EXIT_EMPTY = 7


@dataclass
class JobResult:
    out_dir: str
    shards_total: int = 0
    shards_completed: int = 0
    samples: int = 0
    status: dict[str, int] = field(default_factory=dict)
    # Shards that failed in this run (their id: why); a rerun does them again.
    failed_shards: dict[int, str] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_manifest(
        cls, out_dir: str, manifest: dict[str, Any], failed: dict[int, str] | None = None, **extra: Any
    ) -> JobResult:
        """The result of a job whose output's manifest (just written) is ``manifest``."""
        counts = manifest.get("counts") or {}
        shards = manifest.get("shards") or {}
        return cls(
            out_dir,
            shards.get("expected") or 0,
            shards.get("completed") or 0,
            counts.get("samples", 0),
            counts.get("status", {}),
            dict(failed or {}),
            counts,
            **extra,
        )

    @property
    def exit_code(self) -> int:
        """0: every shard is complete; 1: some are not (a rerun finishes them)."""
        return 0 if self.shards_completed >= self.shards_total and not self.failed_shards else 1
