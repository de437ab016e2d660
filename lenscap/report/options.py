"""``lenscap report``'s options."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from lenscap.core.options import Argument, Options, check, option

__all__ = ["ReportOptions", "REPORT_NAME"]

REPORT_NAME = "report.html"  # the page's name in the dataset directory, without --out


@dataclass(kw_only=True, frozen=True)
class ReportOptions(Options):
    command: ClassVar[str] = "report"
    help: ClassVar[str] = (
        "Write a self-contained HTML page about a dataset: counts, outcomes, caption lengths, sampled images with their captions."
    )
    example: ClassVar[str] = "lenscap report data/captioned --out report.html --sample 24"
    arguments: ClassVar[tuple[Argument, ...]] = (Argument("path", "Dataset directory.", metavar="DIR", local="report's dataset"),)

    out: str | None = option(
        None, "HTML file to write.", names=("--out",), show_default=f"DIR/{REPORT_NAME}", local="report's --out"
    )
    sample: int = option(24, "How many sampled images to show.", names=("--sample",))
    seed: int = option(0, "Which samples: the same seed shows the same ones.")
    png: str | None = option(
        None, "Also write a PNG contact sheet of the sampled images here.", names=("--png",), local="report's --png"
    )

    def validate(self) -> None:
        super().validate()
        check(self.sample >= 0, f"--sample must be 0 or more, not {self.sample}")

    def out_path(self, path: str | os.PathLike[str]) -> str:
        """Where the page goes for the dataset at ``path``: --out, else DIR/report.html."""
        return self.out if self.out is not None else os.path.join(path, REPORT_NAME)
