"""``lenscap run``'s options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lenscap.core.options import Argument, Options, option

__all__ = ["RunOptions"]


@dataclass(kw_only=True, frozen=True)
class RunOptions(Options):
    command: ClassVar[str] = "run"
    help: ClassVar[str] = "Run a whole pipeline from a TOML recipe; rerun to resume (finished stages are skipped)."
    example: ClassVar[str] = "lenscap run lens-recaption --input urls.parquet --work-dir /data/lens --set caption.max_cost=500"
    arguments: ClassVar[tuple[Argument, ...]] = (
        Argument(
            "recipe",
            "A recipe file; or a name: NAME.toml in the current directory, else the shipped recipe NAME "
            "(demo, lens-recaption, refresh). A directory is never a recipe.",
        ),
    )

    set: list[str] | None = option(
        None,
        "STAGE.OPTION=VALUE: override a stage's option (repeatable); STAGE.OPTION= removes it.",
        names=("--set",),
    )
    input: str | None = option(None, "The recipe's input instead of its own.", names=("--input",))
    work_dir: str | None = option(None, "The recipe's work directory instead of its own.", local="a recipe's work directory")
