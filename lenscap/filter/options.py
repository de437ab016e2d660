"""``lenscap filter``'s options: its own, one per cheap rule (``rules.RULES``), and the threshold flag and
options of every built-in annotator (``--min-sharpness``, ``--clip-model``), declared on the annotator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lenscap.core.errors import UsageError
from lenscap.core.options import (
    Argument,
    Executed,
    FromDataset,
    Options,
    OwnedOutput,
    RowsOnly,
    check,
    option,
    with_fields,
)
from lenscap.filter.annotators import REGISTRY, annotator_class, available_annotators
from lenscap.filter.annotators.base import Annotator
from lenscap.filter.rules import RULES

__all__ = ["FilterOptions"]


# The cheap rules' options, first in --help.
_Rules = with_fields(
    Options,
    "_Rules",
    __name__,
    [
        (r.option, r.type if r.default is not None else r.type | None, option(r.default, r.help, show_default=r.show_default))
        for r in RULES
    ],
)


@dataclass(kw_only=True, frozen=True)
class _FilterFlags(_Rules, RowsOnly, OwnedOutput, FromDataset, Executed):  # type: ignore[valid-type, misc]
    command: ClassVar[str] = "filter"
    help: ClassVar[str] = (
        "Keep the samples that pass cheap rules, then content annotators; every drop is recorded with its reason."
    )
    example: ClassVar[str] = "lenscap filter data/raw data/filtered --min-side 256 --annotate blur,uniform --min-sharpness 20"
    arguments: ClassVar[tuple[Argument, ...]] = (
        Argument("in_dir", "Input dataset directory."),
        Argument("out_dir", "Output dataset directory (not written with --dry-run)."),
    )

    blocklist: str | None = option(None, "File of MD5 or SHA-256 hex digests of images to drop.", path=True)
    annotate: str | None = option(
        None, "Comma-separated annotators whose scores to add: blur, uniform, ocr, faces, nsfw, clip, aesthetic, or a plugin."
    )
    threshold: list[str] | None = option(None, "NAME=VALUE: the drop threshold of any annotator (plugins too).")
    dry_run: bool = option(False, "Count what would be dropped, per reason; write nothing.", switch=True, show_default=False)
    no_keep_embeddings: bool = option(
        False,
        "Do not keep the image embeddings the clip or aesthetic annotator computes in the output "
        "(embeddings/NNNNN.parquet, float16), which dedup --semantic and later filters reuse.",
        names=("--no-keep-embeddings",),
        switch=True,
        show_default=False,
    )

    def validate(self) -> None:
        super().validate()
        values = self.rule_values()
        for rule in RULES:
            value = values[rule.option]
            if not rule.off(value):
                problem = rule.refuse(value)
                check(problem is None, problem or "")
        wanted = self.thresholds()  # --threshold NAME=NUMBER's syntax
        if wanted:  # names known here (a recipe hears it before its first stage); loaded when the stage is built
            known = available_annotators()
            for name in wanted:
                check(name in known, f"unknown annotator {name!r}; installed annotators: {', '.join(sorted(known))}")
        low, high = self.caption_min_words, self.caption_max_words  # type: ignore[attr-defined]
        check(
            None in (low, high) or low <= high,
            f"--caption-min-words {low} is more than --caption-max-words {high}",
        )

    def rule_values(self) -> dict[str, Any]:
        """The cheap rules' options (``rules.query`` takes them)."""
        return {r.option: getattr(self, r.option) for r in RULES}

    def thresholds(self) -> dict[str, float | None]:
        """Each annotator to run, by name, with its threshold (None: scores only): --annotate, the
        threshold flags, --threshold NAME=VALUE, and an annotator whose own option is given."""
        wanted: dict[str, float | None] = {n.strip(): None for n in (self.annotate or "").split(",") if n.strip()}
        for cls in _FLAGGED:
            value = getattr(self, _threshold_field(cls)) if cls.threshold_flag else None
            if value is not None:
                wanted[cls.name] = float(value)
            if any(getattr(self, _option_field(cls, o.name)) is not None for o in cls.options):
                wanted.setdefault(cls.name, None)
        for item in self.threshold or []:
            name, _, value = item.partition("=")
            try:
                wanted[name.strip()] = float(value)
            except ValueError:
                raise UsageError(f"--threshold takes NAME=NUMBER, not {item!r}") from None
        return wanted

    def annotators(self) -> list[Annotator]:
        """The annotators to run, built (a missing extra is refused here, before any work)."""
        out = []
        for name, threshold in self.thresholds().items():
            cls = annotator_class(name)
            given = {o.name: getattr(self, _option_field(cls, o.name), None) for o in cls.options}
            out.append(cls(threshold, **{k: v for k, v in given.items() if v is not None}))  # type: ignore[call-arg]
        return out


def _threshold_field(cls: type[Annotator]) -> str:
    return (cls.threshold_flag or "").lstrip("-").replace("-", "_")


def _option_field(cls: type[Annotator], name: str) -> str:
    return f"{cls.name}_{name}"


_FLAGGED: list[type[Annotator]] = [annotator_class(name) for name in REGISTRY.builtins]


def _annotator_fields() -> list[tuple[str, Any, Any]]:
    fields = []
    for cls in _FLAGGED:
        if cls.threshold_flag:
            help = f"{cls.name}: {cls.threshold_help}."
            fields.append((_threshold_field(cls), cls.threshold_type | None, option(None, help, show_default=False)))
        for o in cls.options:
            shown = o.default_text or (False if o.default is None else str(o.default))
            fields.append((_option_field(cls, o.name), o.type | None, option(None, f"{cls.name}: {o.help}.", show_default=shown)))
    return fields


FilterOptions = with_fields(_FilterFlags, "FilterOptions", __name__, _annotator_fields())
