"""Filter's cheap rules: one option each, and SQL over a shard's rows that says which samples fail it.

They run as one DuckDB query per shard (``query``), before any image is read; the first rule a sample
fails is its ``filter_reason``, in the order of ``RULES``. Each rule's option is a field of
``FilterOptions`` (so a flag, a recipe key and an API keyword), made from the rule: a new cheap rule is
one ``Rule`` added to ``RULES``, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lenscap.core.record import SUCCESS
from lenscap.core.schema import Column
from lenscap.core.sql import user_expression

__all__ = ["Rule", "RULES", "query", "columns_read"]

_SIDES = (Column("width", "integer"), Column("height", "integer"))
_CAPTION = (Column("caption", "string"),)

_WORDS = "(CASE WHEN caption IS NULL OR trim(caption) = '' THEN 0 ELSE len(regexp_split_to_array(trim(caption), '\\s+')) END)"
_RATIO = "(greatest(width, height)::DOUBLE / nullif(least(width, height), 0))"


def _no_check(value: Any) -> str | None:
    return None


def _off_when_none(value: Any) -> bool:
    return value is None


@dataclass(frozen=True)
class Rule:
    """``name``: the ``filter_reason`` of the samples it drops. ``option``: the field it reads (``type``,
    ``default``, ``help``, ``show_default``), which turns the rule ``off`` (by default: None). ``fails``
    and ``detail``: SQL over the shard's columns (and ``image_bytes``), given the value: true for a
    sample that fails it, and why (``filter_detail``). ``refuse``: why a value is refused, or None.
    ``reads``: the columns that SQL reads, checked in every input shard before any work (``--where``'s
    are whatever it names: it is run on no rows of each shard's schema instead)."""

    name: str
    option: str
    type: type
    help: str
    fails: Callable[[Any], str]
    detail: Callable[[Any], str]
    refuse: Callable[[Any], str | None] = _no_check
    default: Any = None
    show_default: str | bool = "no limit"
    off: Callable[[Any], bool] = _off_when_none
    reads: tuple[Column, ...] = ()


def _not_negative(flag: str) -> Callable[[Any], str | None]:
    return lambda v: f"{flag} must not be negative, not {v}" if v < 0 else None


def _where_refused(text: str) -> str | None:
    if not text.strip():
        return "--where is empty; give an SQL expression over the dataset's columns, or leave it out"
    user_expression(text, "--where")  # one expression, or a UsageError saying why not
    return None


RULES: tuple[Rule, ...] = (
    Rule(
        "status",
        "status",
        str,
        "Keep only this download status (success), or any.",
        fails=lambda v: f"status IS DISTINCT FROM '{v}'",
        detail=lambda v: "'status ' || coalesce(status, 'null')",
        refuse=lambda v: None if v in (SUCCESS, "any") else f"--status must be success or any, not {v!r}",
        default=SUCCESS,
        show_default=True,
        off=lambda v: v == "any",
        reads=(Column("status", "string"),),
    ),
    Rule(
        "min-side",
        "min_side",
        int,
        "Drop images whose shorter side is below this many pixels.",
        fails=lambda v: f"coalesce(least(width, height), 0) < {int(v)}",
        detail=lambda v: f"printf('shorter side %s < %d', coalesce(least(width, height)::VARCHAR, 'unknown'), {int(v)})",
        refuse=_not_negative("--min-side"),
        reads=_SIDES,
    ),
    Rule(
        "max-aspect",
        "max_aspect",
        float,
        "Drop images more elongated than this (long side / short side).",
        fails=lambda v: f"coalesce({_RATIO} > {float(v)}, true)",
        detail=lambda v: f"printf('aspect ratio %s > %s', coalesce(round({_RATIO}, 2)::VARCHAR, 'unknown'), '{v:g}')",
        refuse=lambda v: (
            None if v >= 1 else f"--max-aspect is a ratio of the longer side to the shorter one, at least 1, not {v}"
        ),
        reads=(Column("width", "number"), Column("height", "number")),
    ),
    Rule(
        "min-bytes",
        "min_bytes",
        int,
        "Drop images smaller than this many bytes.",
        fails=lambda v: f"coalesce(image_bytes, 0) < {int(v)}",
        detail=lambda v: f"printf('%d bytes < %d', coalesce(image_bytes, 0), {int(v)})",
        refuse=_not_negative("--min-bytes"),
    ),
    Rule(
        "caption-min-words",
        "caption_min_words",
        int,
        "Drop samples whose caption has fewer words.",
        fails=lambda v: f"{_WORDS} < {int(v)}",
        detail=lambda v: f"printf('%d words < %d', {_WORDS}, {int(v)})",
        refuse=_not_negative("--caption-min-words"),
        reads=_CAPTION,
    ),
    Rule(
        "caption-max-words",
        "caption_max_words",
        int,
        "Drop samples whose caption has more words.",
        fails=lambda v: f"{_WORDS} > {int(v)}",
        detail=lambda v: f"printf('%d words > %d', {_WORDS}, {int(v)})",
        refuse=_not_negative("--caption-max-words"),
        reads=_CAPTION,
    ),
    Rule(
        "where",
        "where",
        str,
        "Keep only rows where this SQL expression over the columns is true (DuckDB), "
        "e.g. \"width >= 512 AND caption NOT ILIKE '%stock%'\".",
        fails=lambda v: f"NOT coalesce(({user_expression(v, '--where')}), false)",
        detail=lambda v: "'not (" + v.replace("'", "''") + ")'",
        refuse=_where_refused,
        show_default=False,
    ),
)


def columns_read(values: dict[str, Any]) -> tuple[Column, ...]:
    """The columns the rules that are on under ``values`` read (``Rule.reads``)."""
    return tuple(c for r in RULES if not r.off(values.get(r.option, r.default)) for c in r.reads)


def query(values: dict[str, Any]) -> str:
    """The dropped rows of table ``t`` under the rules' option ``values``: key, rule, detail (kept rows
    never leave DuckDB)."""
    on = [r for r in RULES if not r.off(values.get(r.option, r.default))]
    if not on:
        return "SELECT key, NULL::VARCHAR AS reason, NULL::VARCHAR AS detail FROM t WHERE false"
    conditions = [(r.name, r.fails(values[r.option]), r.detail(values[r.option])) for r in on]
    reason = " ".join(f"WHEN {cond} THEN '{name}'" for name, cond, _ in conditions)
    detail = " ".join(f"WHEN {cond} THEN {d}" for _, cond, d in conditions)
    fails = " OR ".join(f"({cond})" for _, cond, _ in conditions)
    return f"SELECT key, CASE {reason} END AS reason, CASE {detail} END AS detail FROM t WHERE {fails}"
