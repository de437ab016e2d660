"""``lenscap shard``'s options."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from lenscap.core.errors import UsageError
from lenscap.core.options import Argument, Executed, FromDataset, OwnedOutput, check, option
from lenscap.shard.formats import FORMATS

__all__ = ["ShardOptions", "parse_size", "MIN_SHARDS"]

# The fewest shards a size-cut export has (unless it has fewer samples): enough for a typical
# 8-worker DataLoader (or 8 GPUs of one node), each worker reading shards of its own.
MIN_SHARDS = 8

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``500MB`` (decimal), ``512MiB`` (binary) or a number of bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"expected a size such as 500MB or 1GiB, not {text!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


@dataclass(kw_only=True, frozen=True)
class ShardOptions(OwnedOutput, FromDataset, Executed):
    command: ClassVar[str] = "shard"
    help: ClassVar[str] = "Export the kept, successful samples to evenly sized WebDataset or Parquet shards, with a dataset card."
    example: ClassVar[str] = "lenscap shard data/deduped data/shards --format webdataset --target-size 500MB --shuffle"
    arguments: ClassVar[tuple[Argument, ...]] = (
        Argument("in_dir", "Input dataset directory."),
        Argument("out_dir", "Output directory for the training-ready shards."),
    )

    format: str = option("webdataset", " or ".join(f.described for f in FORMATS.values()) + ".", names=("--format",))
    target_size: str = option("500MB", "Size each shard is filled to, e.g. 500MB or 1GiB (the last takes the rest).")
    samples_per_shard: int | None = option(None, "Cut shards by sample count instead of size.", show_default=False)
    min_shards: int = option(
        MIN_SHARDS,
        "Split a small export into at least this many shards (never more than its samples), so that a loader with "
        "that many workers has a shard for each. Not used with --samples-per-shard, whose count decides.",
    )
    shuffle: bool = option(
        False,
        "Shuffle samples across the whole dataset (deterministic for a --seed).",
        switch=True,
        show_default=False,
    )
    seed: int = option(0, "--shuffle: the seed; the same seed gives the same order.")
    caption_status: str = option(
        "ok", "ok: where captioning ran, export only its successes; any: export every sample with a caption."
    )

    def validate(self) -> None:
        super().validate()
        check(self.format in FORMATS, f"--format must be {' or '.join(FORMATS)}, not {self.format!r}")
        check(self.caption_status in ("ok", "any"), f"--caption-status must be ok or any, not {self.caption_status!r}")
        check(
            self.samples_per_shard is None or self.samples_per_shard >= 1,
            f"--samples-per-shard must be at least 1, not {self.samples_per_shard}",
        )
        check(self.samples_per_shard is not None or self.target_bytes >= 1, "--target-size must be more than 0 bytes")
        check(self.min_shards >= 1, f"--min-shards must be at least 1, not {self.min_shards}")

    @property
    def target_bytes(self) -> int | None:
        """--target-size in bytes; None when cut by --samples-per-shard."""
        return None if self.samples_per_shard is not None else parse_size(self.target_size)

    def identity(self) -> dict[str, Any]:
        """What decides the export's files (the claim, the plan's fingerprint and the manifest record it)."""
        return {
            "format": self.format,
            "target_bytes": self.target_bytes,
            "samples_per_shard": self.samples_per_shard,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "caption_status": self.caption_status,
            "min_shards": self.min_shards,
        }
