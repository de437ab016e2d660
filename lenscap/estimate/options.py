"""``lenscap estimate``'s options, and the values they stand for (a count, a size, hours)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import ClassVar

from lenscap.caption.backends.openai_batch import BatchOptions, OpenAIBatchBackend
from lenscap.core.errors import UsageError
from lenscap.core.options import Options, check, option

__all__ = [
    "EstimateOptions",
    "parse_count",
    "parse_hours",
    "hours_span",
    "human_hours",
    "COMPARED_MODELS",
    "BATCH_MAX_REQUESTS",
    "BATCH_WINDOW_H",
]

# caption's own defaults (the openai-batch backend's, which are the openai backend's too): an estimate
# left at its defaults prices the run caption would make.
_CAPTION = {o.name: o.default for o in OpenAIBatchBackend.options}
BATCH_MAX_REQUESTS = _CAPTION["max_requests_per_file"]
BATCH_WINDOW_H = 24
# What --compare prices when no --compare-model is given: each provider's flagship vision model and its
# cheaper ones.
COMPARED_MODELS = (
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "claude-sonnet-4-5",
    "claude-haiku-4-5",
    "gemini-2.5-pro",
    "gemini-2.5-flash",
    "gemini-2.5-flash-lite",
)
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}
_COUNT_RE = re.compile(r"(\d+(?:\.\d*)?(?:e\d+)?)([kmb]?)", re.IGNORECASE)


def parse_count(text: str, flag: str = "--images") -> int:
    """``800000000``, ``800,000,000``, ``8e8``, ``800M``, ``1.5B``, ``10k`` as a whole number."""
    match = _COUNT_RE.fullmatch(text.strip().replace(",", "").replace("_", ""))
    # Decimal, not float: 1.1k is exactly 1,100.
    value = Decimal(match.group(1)) * _SUFFIXES[match.group(2).lower()] if match else None
    if value is None or value != value.to_integral_value():
        raise UsageError(f"{flag} takes a whole number such as 800000000, 800,000,000, 8e8, 800M, 1.5B or 10k, not {text!r}")
    return int(value)


def parse_hours(text: str) -> tuple[float, float]:
    """``1-24`` (low-high) or ``24`` (both) hours."""
    low, dash, high = text.strip().partition("-")
    try:
        hours = (float(low), float(high if dash else low))
    except ValueError:
        raise UsageError(f"--batch-hours takes LOW-HIGH or HOURS, such as 1-24, not {text!r}") from None
    return hours


def human_hours(hours: float) -> str:
    """A duration as a person reads it: minutes, hours, days, or years past two of them."""
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    if hours < 24 * 730:
        return f"{hours / 24:,.1f} days"
    return f"{hours / 24 / 365:,.0f} years"


def hours_span(low: float, high: float) -> str:
    """``parse_hours`` the other way: ``1-24 h``, ``24 h``."""
    return f"{low:g} h" if low == high else f"{low:g}-{high:g} h"


@dataclass(kw_only=True, frozen=True)
class EstimateOptions(Options):
    command: ClassVar[str] = "estimate"
    help: ClassVar[str] = "Tokens, cost and wall time of captioning N images, before spending anything."
    example: ClassVar[str] = "lenscap estimate --images 800M --model gpt-4.1 --batch --prompt alt-aware"

    images: str | None = option(
        None,
        "How many images to caption: 800000000, 800,000,000, 8e8, 800M, 1.5B, 10k (with --from and --where: counted there).",
        show_default=False,
    )
    model: str = option(_CAPTION["model"], "The model (caption's default is the same).")
    batch: bool = option(
        False,
        "Price as the Batch API (half price), and count its files and wall time.",
        switch=True,
        show_default=False,
    )
    detail: str = option(_CAPTION["detail"], "Image detail: low, high or auto.")
    output_words: float = option(109.0, "Caption length in words (Lens: about 109).")
    source_size: str = option(
        "1024x768", "Typical image size WIDTHxHEIGHT before downscaling to --max-side.", old_names=("--image-size",)
    )
    max_side: int = option(_CAPTION["max_side"], "Longest side sent to the model (caption's --max-side).")
    prompt: str = option("lens", "Prompt preset or file, as for caption.")
    rpm: float | None = option(None, "Requests per minute you may send.")
    tpm: float | None = option(None, "Tokens per minute you may send.")
    prices: str | None = option(None, "JSON or TOML price file (USD per 1M tokens).")
    from_dir: str | None = option(
        None,
        "A dataset already captioned with this model: use its measured tokens per image.",
        names=("--from",),
        local="estimate --from",
    )
    where: str | None = option(
        None,
        "With --from: the images are its rows where this SQL expression over its columns is true (DuckDB), as "
        "caption --redo would select them.",
    )
    sample_from: str | None = option(
        None,
        "A downloaded dataset: build the batch request lines of its first 200 images as caption would, and use "
        "their measured bytes and image tokens.",
    )
    max_requests_per_file: int = option(
        BATCH_MAX_REQUESTS, "With --batch: requests per batch file, as for caption (the API allows 50,000)."
    )
    max_file_mib: float = option(
        _CAPTION["max_file_mib"],
        "With --batch: MiB (1,048,576 bytes) per batch file, as for caption (the API allows 200).",
        old_names=("--max-file-mb",),
    )
    max_enqueued_tokens: str | None = option(
        None,
        "With --batch: your account's batch queue limit in input tokens (such as 2e9 or 2B); sets how many files "
        "run at once, for a wall time.",
        show_default=False,
    )
    batch_hours: str = option("1-24", "With --batch or --compare: hours one batch takes to complete, LOW-HIGH or one number.")
    compare: bool = option(
        False,
        "Price and time the job on every provider's models, online and as batches, in one table (--model and --batch "
        "are then not used).",
        switch=True,
        show_default=False,
    )
    compare_model: list[str] | None = option(
        None,
        "With --compare: a model to compare (repeatable; any model the price table or --prices knows).",
        show_default=", ".join(COMPARED_MODELS),
    )

    def validate(self) -> None:
        super().validate()
        check(
            self.where is None or bool(self.from_dir),
            "--where selects rows of a captioned dataset: give it with --from DIR",
        )
        check(
            self.where is None or self.images is None,
            "give --images or --where (which counts the images in --from), not both",
        )
        check(
            self.images is not None or self.where is not None,
            "--images is needed: how many images to caption (or --from DIR --where EXPR to count them)",
        )
        check(not self.compare_model or self.compare, "--compare-model chooses what --compare compares: give --compare")
        check(
            not self.compare or (self.from_dir is None and self.images is not None),
            "--compare prices --images on every provider's own token counts: it does not take --from",
        )
        count = self.count
        check(count is None or count >= 1, f"--images must be at least 1, not {count}")
        check(self.detail in ("low", "high", "auto"), f"--detail must be low, high or auto, not {self.detail!r}")
        for name, value in (("--rpm", self.rpm), ("--tpm", self.tpm)):
            check(value is None or value > 0, f"{name} must be more than 0, not {value:g}" if value is not None else "")
        width, height = self.size
        check(
            self.output_words >= 0 and min(width, height, self.max_side) >= 1,
            "--output-words, --source-size and --max-side must be positive",
        )
        low, high = self.hours
        check(0 < low <= high, f"--batch-hours must be LOW-HIGH with 0 < LOW <= HIGH, not {low:g}-{high:g}")
        # The caption batch backends' own checks, so estimate takes exactly what caption would.
        BatchOptions(
            max_requests_per_file=self.max_requests_per_file,
            max_file_bytes=self.max_file_bytes,
            max_enqueued_tokens=self.queue_tokens,
        ).validate()

    @property
    def count(self) -> int | None:
        """--images as a number (None: counted by --where in --from)."""
        return parse_count(self.images) if self.images is not None else None

    @property
    def size(self) -> tuple[int, int]:
        """--source-size as (width, height)."""
        width, x, height = self.source_size.lower().partition("x")
        if not (x and width.isdigit() and height.isdigit()):
            raise UsageError(f"--source-size takes WIDTHxHEIGHT, not {self.source_size!r}")
        return int(width), int(height)

    @property
    def queue_tokens(self) -> int | None:
        return parse_count(self.max_enqueued_tokens, "--max-enqueued-tokens") if self.max_enqueued_tokens is not None else None

    @property
    def hours(self) -> tuple[float, float]:
        return parse_hours(self.batch_hours)

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mib * 1024 * 1024)  # as the batch backends convert --max-file-mib
