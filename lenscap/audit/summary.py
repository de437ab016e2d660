"""The audit's numbers: the global pass over the scan's spill files (``lenscap.audit.spill``, out of
core), the summary object ``--json`` prints, ``--fail-on`` rules, and the comparison of two datasets
(a DuckDB join of their per-caption rows)."""

from __future__ import annotations

import heapq
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lenscap.audit.measures import FLAGS, LENGTH_BAND, PRESET_WORDS
from lenscap.audit.scan import Scan, Tally
from lenscap.audit.spill import Spill
from lenscap.audit.text import mix
from lenscap.core.errors import UsageError
from lenscap.core.sql import literal, out_of_core

__all__ = [
    "Duplicates",
    "find_duplicates",
    "top_openings",
    "summarise",
    "Rule",
    "parse_rules",
    "check_rules",
    "compare",
    "METRICS",
]

TOP_OPENINGS = 10

# --fail-on names: every flag as a share (refusal, loop ...), and these.
_NUMBERS = (
    "captions",
    "words_mean",
    "words_p5",
    "words_p50",
    "words_p95",
    "template_top1",
    "distinct_1",
    "distinct_2",
    "alt_carry",
)
METRICS = (*FLAGS, *_NUMBERS)


@dataclass
class Duplicates:
    by_group: dict[int, int]  # captions flagged duplicate, per group id
    file: Path  # the sample ids (shard << 32 | row) of every duplicate caption, int64, in no order


_DUP_RECORD = np.dtype([("h", "<u8"), ("sample", "<i8"), ("grp", "<i4")])


def find_duplicates(scan: Scan, spill: Path) -> Duplicates:
    """Captions that share an LSH band key with another caption are ``duplicate``. A partition of band
    keys at a time: sorted, the keys equal to a neighbour mark their samples; a sample marked in several
    partitions is counted once, by a second spill partitioned on the sample."""
    marked = Spill(spill / "marked", _DUP_RECORD)
    for part in scan.bands.partitions():
        part = part[np.argsort(part["h"], kind="stable")]
        same = part["h"][1:] == part["h"][:-1]
        shared = np.zeros(len(part), bool)
        shared[1:] |= same
        shared[:-1] |= same
        picked = part[shared]
        records = np.empty(len(picked), _DUP_RECORD)
        records["h"] = mix(picked["sample"].astype(np.uint64))  # partitioned by sample: each counted once
        records["sample"], records["grp"] = picked["sample"], picked["grp"]
        marked.append(records)
    by_group: Counter[int] = Counter()
    out = spill / "duplicates.bin"
    with open(out, "wb") as f:
        for part in marked.partitions():
            _, first = np.unique(part["sample"], return_index=True)
            unique = part[first]
            by_group.update(dict(zip(*np.unique(unique["grp"], return_counts=True), strict=True)))
            f.write(unique["sample"].tobytes())
    return Duplicates({int(k): int(v) for k, v in by_group.items()}, out)


def top_openings(scan: Scan) -> dict[int, list[tuple[str, int]]]:
    """The TOP_OPENINGS most common openings per group, and of all groups together (-1), exact: the
    counts of one opening are summed in the one partition that holds its hash."""
    best: dict[int, list[tuple[int, int]]] = {}  # group -> min-heap of (count, hash): its largest so far
    for part in scan.openings.partitions():
        part = part[np.lexsort((part["grp"], part["h"]))]
        new = np.r_[True, (part["h"][1:] != part["h"][:-1]) | (part["grp"][1:] != part["grp"][:-1])]
        starts = np.flatnonzero(new)
        hs, grps, ns = part["h"][starts], part["grp"][starts], np.add.reduceat(part["n"], starts)
        per_h = np.r_[True, hs[1:] != hs[:-1]]
        overall = np.add.reduceat(ns, np.flatnonzero(per_h))
        for grp in np.unique(grps):
            mine = grps == grp
            _keep(best.setdefault(int(grp), []), hs[mine], ns[mine])
        _keep(best.setdefault(-1, []), hs[per_h], overall)
    wanted = {h for heap in best.values() for _, h in heap}
    texts: dict[int, str] = {}
    with open(scan.opening_texts, encoding="utf-8") as f:
        for line in f:
            h, _, text = line.rstrip("\n").partition("\t")
            if int(h, 16) in wanted:
                texts[int(h, 16)] = text
    return {grp: sorted(((texts[h], n) for n, h in heap), key=lambda t: (-t[1], t[0])) for grp, heap in best.items()}


def _keep(heap: list[tuple[int, int]], hashes: np.ndarray, counts: np.ndarray) -> None:
    """Keep in ``heap`` the TOP_OPENINGS largest (count, hash) pairs seen so far."""
    if len(counts) > TOP_OPENINGS:
        top = np.argpartition(-counts, TOP_OPENINGS)[:TOP_OPENINGS]
        hashes, counts = hashes[top], counts[top]
    for h, n in zip(hashes.tolist(), counts.tolist(), strict=True):
        entry = (int(n), int(h))
        if len(heap) < TOP_OPENINGS:
            heapq.heappush(heap, entry)
        elif entry > heap[0]:
            heapq.heapreplace(heap, entry)


def _percentile(hist: np.ndarray, q: float) -> int | None:
    total = int(hist.sum())
    if total == 0:
        return None
    return int(np.searchsorted(np.cumsum(hist), q * (total - 1), side="right"))


def _share(n: int, of: int) -> float | None:
    return round(n / of, 6) if of else None


def _measures(t: Tally, duplicates: int, top: list[tuple[str, int]], target: int | None) -> dict[str, Any]:
    """One group's (or the dataset's) measures, in the ``--json`` shape."""
    counts = {name: int(t.counts.get(name, 0)) for name in FLAGS} | {"duplicate": duplicates}
    # Shares are of the captions audited, except where only some captions can have the flag.
    of = {name: t.captions for name in FLAGS} | {
        "ocr_missed": t.ocr_with_text,
        "ocr_invented": t.ocr_known,
        "alt_dropped": t.alt_named,
    }
    out: dict[str, Any] = {
        "captions": t.captions,
        "measured_texts": t.texts,
        "counts": counts,
        "shares": {name: _share(counts[name], of[name]) for name in FLAGS},
        "words": {
            "mean": round(t.words / t.texts, 2) if t.texts else None,
            "p5": _percentile(t.hist, 0.05),
            "p50": _percentile(t.hist, 0.50),
            "p95": _percentile(t.hist, 0.95),
            "target": target,
            "band": [round(target * (1 - LENGTH_BAND)), round(target * (1 + LENGTH_BAND))] if target else None,
        },
        "openings": [{"opening": o, "captions": n, "share": _share(n, t.texts)} for o, n in top],
        "template_top1": _share(top[0][1], t.texts) if top else None,
        "distinct_1": round(t.distinct_1.estimate() / t.unigrams, 6) if t.unigrams else None,
        "distinct_2": round(t.distinct_2.estimate() / t.bigrams, 6) if t.bigrams else None,
        "ocr": {
            "known": t.ocr_known,
            "with_text": t.ocr_with_text,
            "quoted": t.ocr_with_text - counts["ocr_missed"],
            "missed": counts["ocr_missed"],
            "invented": counts["ocr_invented"],
        },
        "alt_text": {
            "named": t.alt_named,
            "carry_mean": round(t.alt_carry / t.alt_named, 4) if t.alt_named else None,
            "dropped": counts["alt_dropped"],
        },
    }
    return out


def summarise(
    location: str,
    scan: Scan,
    duplicates: Duplicates,
    top: dict[int, list[tuple[str, int]]],
    target_words: int | None,
    script: str,
) -> dict[str, Any]:
    """The audit of one dataset: overall measures, then the same per model and prompt."""
    ids = {label: gid for gid, label in scan.groups.items()}
    total = Tally()
    for tally in scan.tallies.values():
        total.merge(tally)
    prompts = {label[1] for label, tally in scan.tallies.items() if tally.captions}
    overall_target = (
        target_words if target_words is not None else (PRESET_WORDS.get(next(iter(prompts))) if len(prompts) == 1 else None)
    )
    summary = {
        "path": location,
        "shards": len(scan.shards),
        "failed_shards": {str(k): v for k, v in scan.failed.items()},
        "script": script,
        **_measures(total, sum(duplicates.by_group.values()), top.get(-1, []), overall_target),
    }
    # [words, captions] pairs as inspect gives them (the last bin holds every longer caption); overall only.
    summary["words"]["histogram"] = [[int(w), int(n)] for w, n in enumerate(total.hist) if n]
    summary["by_model"] = [
        {
            "model": label[0] or None,
            "prompt": label[1] or None,
            "prompt_sha": label[2] or None,
            **_measures(
                tally,
                duplicates.by_group.get(ids[label], 0),
                top.get(ids[label], [])[:3],
                target_words if target_words is not None else PRESET_WORDS.get(label[1]),
            ),
        }
        # Largest first; equal ones by label, not by which shard finished first.
        for label, tally in sorted(scan.tallies.items(), key=lambda kv: (-kv[1].captions, kv[0]))
    ]
    summary["samples"] = scan.samples
    return summary


def metric(summary: dict[str, Any], name: str) -> float | None:
    if name in FLAGS:
        return summary["shares"][name]
    if name.startswith("words_"):
        return summary["words"][name.removeprefix("words_")]
    if name == "alt_carry":
        return summary["alt_text"]["carry_mean"]
    return summary[name]


@dataclass(frozen=True)
class Rule:
    name: str
    op: str
    limit: float

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.limit:g}"

    def broken_by(self, value: float | None) -> bool:
        if value is None:
            return True  # a gate that cannot measure what it guards fails, never passes by default
        return {">": value > self.limit, ">=": value >= self.limit, "<": value < self.limit, "<=": value <= self.limit}[self.op]


_RULE = re.compile(r"^\s*([a-z_0-9]+)\s*(>=|<=|>|<)\s*([-+0-9.eE%]+)\s*$")


def parse_rules(text: str | None) -> list[Rule]:
    """``refusal>0.01,words_p50<80,template_top1>0.3``: each rule is broken when its comparison holds."""
    if text is None:
        return []
    rules = []
    for part in text.split(","):
        m = _RULE.match(part)
        if not m:
            raise UsageError(f"--fail-on takes rules like refusal>0.01,words_p50<80, not {part.strip()!r}")
        name, op, number = m.groups()
        if name not in METRICS:
            raise UsageError(f"--fail-on: unknown measure {name!r}; known: {', '.join(METRICS)}")
        try:
            limit = float(number[:-1]) / 100 if number.endswith("%") else float(number)
        except ValueError:
            raise UsageError(f"--fail-on: {number!r} in {part.strip()!r} is not a number") from None
        rules.append(Rule(name, op, limit))
    if not rules:
        raise UsageError("--fail-on is empty; give rules like refusal>0.01,words_p50<80")
    return rules


def check_rules(summary: dict[str, Any], rules: list[Rule]) -> list[dict[str, Any]]:
    return [{"rule": str(r), "value": metric(summary, r.name), "broken": r.broken_by(metric(summary, r.name))} for r in rules]


def compare(
    a: dict[str, Any],
    b: dict[str, Any],
    rows_a: Path | None,
    rows_b: Path | None,
    spill: Path,
    memory_limit: str,
    sample: int,
    seed: int,
) -> dict[str, Any]:
    """Two audits side by side: the change of each measure (B minus A) and, on the images both hold
    (by key), how many captions each flag newly marks or clears, with the keys of a sample of them."""
    delta: dict[str, float | None] = {}
    for name in METRICS:
        va, vb = metric(a, name), metric(b, name)
        delta[name] = None if va is None or vb is None else round(vb - va, 6)
    out: dict[str, Any] = {"delta": delta, "common": 0, "flag_changes": {}, "differences": []}
    if rows_a is None or rows_b is None:
        return out
    con = out_of_core(memory_limit, spill / "duckdb-compare")
    try:
        con.execute(f"""CREATE TEMP TABLE j AS SELECT a.key, a.shard AS shard_a, a.row AS row_a, b.shard AS shard_b,
                        b.row AS row_b, a.words AS words_a, b.words AS words_b, a.flags AS flags_a, b.flags AS flags_b
                        FROM read_parquet({literal(rows_a)}) a JOIN read_parquet({literal(rows_b)}) b USING (key)""")
        out["common"] = con.execute("SELECT count(*) FROM j").fetchone()[0]
        for bit, name in enumerate(FLAGS):
            gained, cleared = (
                con.execute(f"""SELECT count(*) FILTER (WHERE (flags_b >> {bit}) & 1 = 1 AND (flags_a >> {bit}) & 1 = 0),
                                                     count(*) FILTER (WHERE (flags_a >> {bit}) & 1 = 1 AND (flags_b >> {bit}) & 1 = 0)
                                              FROM j""").fetchone()
            )
            if gained or cleared:
                out["flag_changes"][name] = {"gained": gained, "cleared": cleared}
        picked = con.execute(f"""SELECT key, shard_a, row_a, shard_b, row_b, words_a, words_b, flags_a, flags_b FROM j
                                 WHERE flags_a <> flags_b OR abs(words_a - words_b) > 0.25 * greatest(words_a, words_b, 1)
                                 ORDER BY hash(key || {literal(str(seed))}), key LIMIT {int(sample)}""").fetchall()
    finally:
        con.close()
    out["differences"] = [
        {
            "key": k,
            "a": {"shard": sa, "row": ra, "words": wa, "flags": _names(fa)},
            "b": {"shard": sb, "row": rb, "words": wb, "flags": _names(fb)},
        }
        for k, sa, ra, sb, rb, wa, wb, fa, fb in picked
    ]
    return out


def _names(bits: int) -> list[str]:
    return [name for bit, name in enumerate(FLAGS) if (bits >> bit) & 1]
