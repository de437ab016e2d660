"""``lenscap inspect``'s options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lenscap.core.options import Argument, Options

__all__ = ["InspectOptions"]


@dataclass(kw_only=True, frozen=True)
class InspectOptions(Options):
    command: ClassVar[str] = "inspect"
    help: ClassVar[str] = "Summarise a dataset directory: shards, samples, statuses, errors, caption lengths, columns, bytes."
    example: ClassVar[str] = "lenscap inspect data/captioned --json"
    arguments: ClassVar[tuple[Argument, ...]] = (
        Argument("path", "A dataset directory or an export (lenscap shard's output).", metavar="DIR"),
    )
