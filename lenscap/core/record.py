"""The Sample record: what flows through every stage.

A sample is one row of a shard's parquet (every column, failed samples included) plus, for a sample
that has an image, its bytes. The bytes live once, in a tar of the dataset that holds the images
(the download, an export, or a stage run with ``--copy-images``); a sample read from a dataset that
refers to them loads its image only when a stage asks for ``sample.image``, so a stage that decides on
columns alone (filter's cheap rules, writing the rows of a caption shard) reads no image at all.
Stages read samples, return samples; the dataset module alone knows how they are laid out on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Sample", "SUCCESS"]

SUCCESS = "success"


class Sample:
    """``key``, the parquet ``row``, and the image: bytes, or a loader that reads them when first asked."""

    __slots__ = ("key", "row", "_image", "_load")

    def __init__(
        self, key: str, row: dict[str, Any] | None = None, image: bytes | None = None, load: Callable[[], bytes] | None = None
    ) -> None:
        self.key = key
        self.row = row if row is not None else {}
        self._image = image
        self._load = load if image is None else None

    @property
    def image(self) -> bytes | None:
        if self._load is not None:
            self._image, self._load = self._load(), None
        return self._image

    @image.setter
    def image(self, value: bytes | None) -> None:
        """Set new bytes, or ``None`` to take the image away (a dropped sample keeps its row only)."""
        self._image, self._load = value, None

    @property
    def has_image(self) -> bool:
        """Whether the sample has an image, without reading it."""
        return self._image is not None or self._load is not None

    @property
    def caption(self) -> str | None:
        return self.row.get("caption")

    @property
    def status(self) -> str | None:
        return self.row.get("status")

    @property
    def ok(self) -> bool:
        """True for a sample that has an image and no failed stage."""
        return self.status == SUCCESS and self.has_image

    def __repr__(self) -> str:
        return f"Sample(key={self.key!r}, has_image={self.has_image}, row={self.row!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sample):
            return NotImplemented
        return (self.key, self.row, self.image) == (other.key, other.row, other.image)
