"""``lenscap dedup``'s options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from lenscap.core.options import Argument, Executed, FromDataset, OwnedOutput, RowsOnly, check, option
from lenscap.core.sql import check_memory_limit
from lenscap.dedup.phash import ALGORITHM

__all__ = ["DedupOptions", "DEFAULT_MAX_DISTANCE"]

DEFAULT_MAX_DISTANCE = 4


@dataclass(kw_only=True, frozen=True)
class DedupOptions(RowsOnly, OwnedOutput, FromDataset, Executed):
    command: ClassVar[str] = "dedup"
    help: ClassVar[str] = (
        "Find duplicate images across the whole dataset and keep one of each. Default: --exact --phash. Rerun to resume."
    )
    example: ClassVar[str] = "lenscap dedup data/captioned data/deduped --phash --max-distance 4"
    arguments: ClassVar[tuple[Argument, ...]] = (
        Argument("in_dir", "Input dataset directory."),
        Argument("out_dir", "Output dataset directory."),
    )

    exact: bool = option(False, "Find byte-identical images (SHA-256).", switch=True, show_default=False)
    phash: bool = option(
        False,
        "Find perceptual duplicates (resized, recompressed, flipped, rotated): 64-bit pHash within --max-distance bits "
        "in one of 8 orientations; a flat graphic's match must also have matching colours.",
        switch=True,
        show_default=False,
    )
    captions: bool = option(
        False,
        "Find samples whose captions are equal after normalising case, punctuation and spacing.",
        switch=True,
        show_default=False,
    )
    max_distance: int | None = option(
        None, "--phash: largest Hamming distance (bits of 64) between duplicates.", show_default=str(DEFAULT_MAX_DISTANCE)
    )
    against: list[str] | None = option(
        None,
        "An earlier dataset directory or a folder of image files, e.g. an eval set (repeatable): drop input samples "
        "that duplicate it, never the reverse.",
        path=True,
    )
    keep: str = option("first", "Which sample of a cluster to keep: first (input order) or largest (most pixels).")
    mark_only: bool = option(
        False, "Remove nothing: only fill dedup_status, dup_of and dup_reason.", switch=True, show_default=False
    )
    bucket_cap: int = option(2000, "--phash: hash buckets larger than this are not expanded (reported instead).")
    memory_limit: str = option("2GB", "Memory for the global search (DuckDB); beyond it, it spills to OUT_DIR/.lenscap.")

    def validate(self) -> None:
        super().validate()
        check(
            self.max_distance is None or self.phash or not (self.exact or self.captions),
            "--max-distance applies to --phash, which is not selected",
        )
        distance = self.distance
        check(0 <= distance <= 16, f"--max-distance must be between 0 and 16, not {distance}")
        check(self.keep in ("first", "largest"), f"--keep must be first or largest, not {self.keep!r}")
        check_memory_limit(self.memory_limit)
        check(self.bucket_cap >= 2, f"--bucket-cap must be at least 2, not {self.bucket_cap}")

    @property
    def compared(self) -> tuple[bool, bool, bool]:
        """(exact, phash, captions) as run: none chosen means --exact --phash."""
        if not (self.exact or self.phash or self.captions):
            return True, True, False
        return self.exact, self.phash, self.captions

    @property
    def distance(self) -> int:
        return DEFAULT_MAX_DISTANCE if self.max_distance is None else self.max_distance

    def resolved(self) -> DedupOptions:
        """These options as the search runs them: what to compare, and with --phash the distance filled in."""
        exact, phash, captions = self.compared
        distance = self.distance if phash else None
        return dataclasses.replace(self, exact=exact, phash=phash, captions=captions, max_distance=distance)

    def identity(self) -> dict[str, Any]:
        """What decides the result (memory and workers only decide the speed)."""
        exact, phash, captions = self.compared
        return {
            "exact": exact,
            "phash": phash,
            "captions": captions,
            "max_distance": self.distance,
            "keep": self.keep,
            "mark_only": self.mark_only,
            "bucket_cap": self.bucket_cap,
            "phash_algorithm": ALGORITHM,
        }
