"""The Sample record: what flows through every stage.

A sample is one row of a shard's parquet (every column, failed samples included) plus, for
successful samples, the image bytes stored in the shard's tar as ``KEY.jpg``. Stages read samples,
return samples; the dataset module alone knows how they are laid out on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Sample", "SUCCESS"]

SUCCESS = "success"


@dataclass
class Sample:
    key: str
    row: dict[str, Any] = field(default_factory=dict)
    image: bytes | None = None

    @property
    def caption(self) -> str | None:
        return self.row.get("caption")

    @property
    def status(self) -> str | None:
        return self.row.get("status")

    @property
    def ok(self) -> bool:
        """True for a sample that has an image and no failed stage."""
        return self.status == SUCCESS and self.image is not None

    def metadata(self) -> dict[str, Any]:
        """The row as written to ``KEY.json`` inside the tar."""
        return {"key": self.key, **{k: v for k, v in self.row.items() if k != "key"}}
