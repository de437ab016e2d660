"""``lenscap audit``'s options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lenscap.audit.measures import PRESET_WORDS, AuditSettings, check_script
from lenscap.audit.summary import parse_rules
from lenscap.core.options import Argument, Executed, OwnedOutput, check, option
from lenscap.core.sql import check_memory_limit

__all__ = ["AuditOptions"]


# --target-words left unset: each caption's prompt preset's length (measures.PRESET_WORDS), none for other prompts.
TARGET_WORDS_TEXT = (
    "the caption_prompt preset's: " + ", ".join(f"{p} {n}" for p, n in PRESET_WORDS.items()) + "; none for other prompts"
)


@dataclass(kw_only=True, frozen=True)
class AuditOptions(OwnedOutput, Executed):
    command: ClassVar[str] = "audit"
    help: ClassVar[str] = (
        "Measure caption quality: length, refusals, templated openings, loops, truncations, near-duplicates, "
        "script, OCR grounding and alt-text carry-over, overall and per model/prompt. Writes nothing into DIR."
    )
    example: ClassVar[str] = 'lenscap audit data/captioned --fail-on "refusal>0.01,words_p50<80,template_top1>0.3"'
    arguments: ClassVar[tuple[Argument, ...]] = (
        Argument(
            "paths",
            "DIR, or DIR_A DIR_B to compare two captionings of the same images (rules judge DIR_B).",
            metavar="DIR [DIR_B]",
            many=True,
        ),
    )

    target_words: int | None = option(
        None,
        "Caption length aimed at; off_length flags captions under half or over 1.5 times it.",
        show_default=TARGET_WORDS_TEXT,
    )
    script: str = option(
        "Latin",
        "Expected Unicode script of the captions (Latin, Cyrillic, Han, ...); wrong_script flags captions with "
        "under half their letters in it.",
    )
    fail_on: str | None = option(
        None,
        "Comma-separated rules MEASURE OP NUMBER (OP: >, >=, < or <=; see the example below): exit 6 when one holds (a cron gate). "
        "Measures: every flag as a share, captions, words_mean/p5/p50/p95, template_top1, distinct_1, distinct_2, "
        "alt_carry.",
    )
    sample: int = option(10, "How many flagged captions (comparing: differing images) to show for reading.")
    seed: int = option(0, "Which samples: the same seed shows the same ones.")
    out: str | None = option(
        None,
        "Also write DIR with one column per flag (audit_refusal, audit_loop, ..., audit_flagged) into this new "
        "dataset, for filter --where or caption --redo.",
        names=("--out",),
        path=True,
    )
    memory_limit: str = option(
        "1GB",
        "Comparing two datasets: memory for joining their rows (DuckDB); beyond it, it spills to a temporary directory.",
    )

    def validate(self) -> None:
        super().validate()
        check(self.target_words is None or self.target_words >= 1, f"--target-words must be at least 1, not {self.target_words}")
        check(self.sample >= 0, f"--sample must be 0 or more, not {self.sample}")
        parse_rules(self.fail_on)
        check_script(self.script)
        check_memory_limit(self.memory_limit)

    @property
    def settings(self) -> AuditSettings:
        return AuditSettings(self.target_words, self.script)
