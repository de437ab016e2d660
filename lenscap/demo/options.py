"""``lenscap demo``'s options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lenscap.core.options import Argument, Options, check, option

__all__ = ["DemoOptions", "CAPTIONERS", "DEMO_MAX_COST"]

CAPTIONERS = ("auto", "describe", "openai", "fake")
DEMO_MAX_COST = 0.10  # USD: what the demo may spend on gpt-4.1-mini with a key


@dataclass(kw_only=True, frozen=True)
class DemoOptions(Options):
    command: ClassVar[str] = "demo"
    help: ClassVar[str] = (
        "Run the demo recipe: generated images on loopback, download -> filter -> dedup -> caption -> shard -> report."
    )
    example: ClassVar[str] = "lenscap demo demo-out --images 100"
    arguments: ClassVar[tuple[Argument, ...]] = (
        Argument("work_dir", "Where the demo writes its URL list, datasets, shards and report.", default="demo-out"),
    )

    images: int = option(100, "How many generated images to serve.")
    captioner: str = option(
        "auto",
        "auto (openai when OPENAI_API_KEY is set, else describe), describe, openai (gpt-4.1-mini, at most $0.10), "
        "or fake (a fake API server on loopback).",
    )

    def validate(self) -> None:
        super().validate()
        check(self.images >= 1, "Invalid value for '--images': must be at least 1")
        check(self.captioner in CAPTIONERS, f"Invalid value for '--captioner': must be one of {', '.join(CAPTIONERS)}")
