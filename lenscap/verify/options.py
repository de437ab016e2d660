"""``lenscap verify``'s options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lenscap.core.options import Argument, Executed, option

__all__ = ["VerifyOptions"]


@dataclass(kw_only=True, frozen=True)
class VerifyOptions(Executed):
    command: ClassVar[str] = "verify"
    help: ClassVar[str] = (
        "Read every byte of a dataset's complete shards and check each file against the size and SHA-256 its "
        "commit recorded; name the damaged shards (exit 1). Writes nothing unless --repair."
    )
    example: ClassVar[str] = "lenscap verify data/raw --json"
    arguments: ClassVar[tuple[Argument, ...]] = (
        Argument("path", "A dataset directory (a stage's output, not an export).", metavar="DIR"),
    )

    repair: bool = option(
        False,
        "Mark the damaged shards incomplete (their _stats.json goes), so that the next run of the command that "
        "wrote the dataset writes them again.",
    )
