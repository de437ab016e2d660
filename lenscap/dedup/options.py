"""``lenscap dedup``'s options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from lenscap.core.options import Argument, Executed, FromDataset, OwnedOutput, RowsOnly, check, option
from lenscap.core.sql import check_memory_limit
from lenscap.dedup.phash import ALGORITHM
from lenscap.embed.model import DEFAULT_EMBED_MODEL, check_model_name

__all__ = ["DedupOptions", "DEFAULT_MAX_DISTANCE", "DEFAULT_SEMANTIC_THRESHOLD"]

DEFAULT_MAX_DISTANCE = 4
# SemDeDup (Abbas et al., 2023) removes a sample whose cosine similarity to another in its k-means
# cluster is above 1 - eps; on LAION-440M eps = 0.05 removed about a quarter of the data with no loss
# in zero-shot accuracy (their Table 1 sweeps eps from 0.005 to 0.3): 1 - 0.05 = 0.95.
DEFAULT_SEMANTIC_THRESHOLD = 0.95


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
    semantic: bool = option(
        False,
        "Find semantic near-duplicates (SemDeDup): CLIP embeddings within --semantic-threshold cosine, compared "
        "within k-means clusters; the embeddings are kept with the output.",
        switch=True,
        show_default=False,
    )
    max_distance: int | None = option(
        None, "--phash: largest Hamming distance (bits of 64) between duplicates.", show_default=str(DEFAULT_MAX_DISTANCE)
    )
    embed_model: str | None = option(
        None,
        "--semantic: the CLIP model to embed images with, a hub id or a local directory.",
        show_default=DEFAULT_EMBED_MODEL,
    )
    semantic_threshold: float | None = option(
        None,
        "--semantic: the smallest cosine similarity between duplicates (SemDeDup's 1 - eps).",
        show_default=str(DEFAULT_SEMANTIC_THRESHOLD),
    )
    clusters: int | None = option(
        None,
        "--semantic: k-means clusters the pairwise search runs within.",
        show_default="one per 10,000 images",
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
        for name, value in (
            ("embed-model", self.embed_model),
            ("semantic-threshold", self.semantic_threshold),
            ("clusters", self.clusters),
        ):
            check(value is None or self.semantic, f"--{name} applies to --semantic, which is not selected")
        threshold = self.threshold
        check(0 < threshold <= 1, f"--semantic-threshold must be above 0 and at most 1, not {threshold}")
        check(self.clusters is None or self.clusters >= 1, f"--clusters must be at least 1, not {self.clusters}")
        if self.semantic:
            check_model_name(self.model, "--embed-model")

    @property
    def compared(self) -> tuple[bool, bool, bool]:
        """(exact, phash, captions) as run: none chosen means --exact --phash; --semantic alone compares embeddings only."""
        if not (self.exact or self.phash or self.captions or self.semantic):
            return True, True, False
        return self.exact, self.phash, self.captions

    @property
    def distance(self) -> int:
        return DEFAULT_MAX_DISTANCE if self.max_distance is None else self.max_distance

    @property
    def threshold(self) -> float:
        return DEFAULT_SEMANTIC_THRESHOLD if self.semantic_threshold is None else self.semantic_threshold

    @property
    def model(self) -> str:
        return self.embed_model or DEFAULT_EMBED_MODEL

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
            # only with --semantic, so an output deduplicated before it existed keeps its claim
            **(
                {"semantic": True, "embed_model": self.model, "semantic_threshold": self.threshold, "clusters": self.clusters}
                if self.semantic
                else {}
            ),
        }
