"""The annotator protocol: score columns from a decoded image, and a drop rule on one of them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import pyarrow as pa
from PIL import Image

from lenscap.record import Sample

__all__ = ["Annotator"]


class Annotator(ABC):
    """Subclasses set ``name``, ``columns`` (the score columns they write), ``score`` (the column the
    threshold applies to) and ``keep_above`` (True: drop scores below the threshold; False: above),
    and implement ``annotate``."""

    name: ClassVar[str]
    columns: ClassVar[tuple[pa.Field, ...]]
    score: ClassVar[str]
    keep_above: ClassVar[bool]
    threshold_help: ClassVar[str] = ""

    cost_rank: ClassVar[int] = 50  # cheaper annotators run first; a drop skips the rest

    def __init__(self, threshold: float | None = None) -> None:
        self.threshold = threshold

    def setup(self) -> None:
        """Once per worker process: load models."""

    @abstractmethod
    def annotate(self, image: Image.Image, sample: Sample) -> dict[str, Any]:
        """Score columns for one image (RGB, at most 1024 px on its longer side) and its sample."""

    def verdict(self, scores: dict[str, Any]) -> str | None:
        """Why the sample is dropped, or None to keep it."""
        value = scores.get(self.score)
        if self.threshold is None or value is None:
            return None
        if self.keep_above and value < self.threshold:
            return f"{self.score} {value:.4g} < {self.threshold:g}"
        if not self.keep_above and value > self.threshold:
            return f"{self.score} {value:.4g} > {self.threshold:g}"
        return None

    def parameters(self) -> dict[str, Any]:
        return {"threshold": self.threshold}
