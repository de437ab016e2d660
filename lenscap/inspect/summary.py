"""What is in a dataset directory: shards, samples, statuses, errors, caption lengths, columns, bytes.

Three things a user asks apart are kept apart here:

- **Outcomes in pipeline order.** ``outcomes`` holds every per-sample outcome count (the download's
  ``status``, ``filter_status`` with its ``filter_reasons``, ``dedup_status``, ``caption_status``, ...)
  in the order the stages ran (the manifest's history; else download, filter, dedup, caption), and
  ``stage_status`` keeps that order too.
- **Errors and skips.** A stage's message (``caption_error``, ...) on a sample whose status is
  ``skipped`` is why the stage left it alone (no image, filtered out), not an error: it is counted
  in ``skips``, never in ``errors``.
- **Cost.** ``caption_cost.spent_usd`` is what was paid for the captions of this dataset: each
  answer's price once, and 0 for an answer taken from the response cache (an earlier run paid for
  it). For a caption output it is the same figure as ``lenscap caption --json``'s ``spent_usd``
  (every run into that output, resumes included). ``cached_usd`` is what the cached answers cost
  when they were first asked (not paid again), and ``by_run`` (a ``--redo`` output's rows carry
  ``caption_run``) splits ``spent_usd`` by the output whose run paid for it. ``usd`` is
  ``spent_usd`` (its old name).

An export (``lenscap shard``: tars or Parquet files and ``shards.json``, no ``_stats.json``) is
summarised from its ``shards.json`` and manifest, and from its index (``.lenscap/index``, rows without
images) where that is here: every listed file present at its size is a complete shard.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from lenscap.core.dataset import Dataset
from lenscap.core.errors import DatasetError
from lenscap.core.layout import shard_name
from lenscap.shard.formats import export_format

__all__ = ["inspect_dataset"]

_SPEND_COLUMNS = ("caption_cost_usd", "caption_input_tokens", "caption_output_tokens")
_COST_COLUMNS = (*_SPEND_COLUMNS, "caption_cached", "caption_run")
# Where the manifest's history does not say: the order the stages usually run in.
_STAGE_ORDER = ("download", "filter", "dedup", "caption", "audit")
_SKIPPED = "skipped"
_REPEATED = "duplicate"  # a download row whose URL an earlier row of the list holds
_MAX_WORDS = 2048  # caption length histogram bins; longer captions share the last bin


def _percentile(hist: list[int], q: float) -> int | None:
    total = sum(hist)
    if total == 0:
        return None
    target = q * (total - 1)
    seen = 0
    for words, n in enumerate(hist):
        seen += n
        if seen > target:
            return words
    return len(hist) - 1


def inspect_dataset(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A summary of the dataset at ``path``; memory is flat in the number of samples."""
    ds = Dataset.open(path)
    manifest = ds.read_manifest() or {}
    damaged = ds.damaged_shards()  # complete by their stats, not by their files: summarised apart, never read
    completed = [i for i in ds.completed_ids() if i not in damaged]
    expected = (manifest.get("shards") or {}).get("expected")
    incomplete = ds.incomplete_ids(range(expected) if expected else None)
    if _is_export(ds, manifest):
        return _inspect_export(ds, manifest)
    tally = _Tally()
    for shard_id in completed:
        tally.add(ds, shard_id)
    shard_bytes, total_bytes = ds.disk_usage()
    history = [str(h.get("stage")) for h in manifest.get("history", [])]
    stage_counts = _in_pipeline_order({column: dict(c.most_common()) for column, c in tally.stage_status.items()}, history)
    status = dict(tally.status.most_common())
    filter_reasons = dict(tally.filter_reasons.most_common())
    return {
        "path": ds.location,
        "stage": manifest.get("stage"),
        "shards": {"complete": len(completed), "incomplete": len(incomplete), "damaged": len(damaged), "expected": expected},
        "incomplete_shards": incomplete[:50],
        "damaged_shards": {shard_name(i): why for i, why in sorted(damaged.items())[:50]},
        "input_incomplete_shards": manifest.get("input_incomplete_shards", []),
        "samples": tally.samples,
        "status": status,
        "stage_status": stage_counts,
        "outcomes": _outcomes(status, stage_counts, filter_reasons, history),
        "caption_cost": tally.cost.summary() if "caption_cost_usd" in tally.columns else None,
        "errors": dict(tally.errors.most_common(10)),
        "skips": dict(tally.skips.most_common(10)),
        "caption_words": _caption_words(tally.hist, tally.words_total),
        "filter_reasons": filter_reasons,
        "columns": tally.columns,
        "bytes": {"shards": shard_bytes, "total": total_bytes},
        "images": _images(ds),
        "history": [h.get("stage") for h in manifest.get("history", [])],
        "dedup": _dedup_report(ds),
        "export": None,
    }


def _caption_words(hist: list[int], words_total: int) -> dict[str, Any]:
    n_captions = sum(hist)
    return {
        "count": n_captions,
        "mean": round(words_total / n_captions, 2) if n_captions else None,
        "p50": _percentile(hist, 0.50),
        "p95": _percentile(hist, 0.95),
        "histogram": [[words, n] for words, n in enumerate(hist) if n],  # [words, captions], JSON-stable
    }


class _Tally:
    """What ``inspect`` counts over a dataset's shards, one shard at a time."""

    def __init__(self) -> None:
        self.status: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.skips: Counter[str] = Counter()
        self.cost = _Cost()
        self.hist = [0] * (_MAX_WORDS + 1)
        self.words_total = self.samples = 0
        self.stage_status: dict[str, Counter[str]] = {}
        self.filter_reasons: Counter[str] = Counter()
        self.columns: list[str] = []

    def add(self, ds: Dataset, shard_id: int) -> None:
        meta = ds.read_metadata(shard_id)
        names = meta.schema.to_arrow_schema().names
        self.columns = self.columns or names
        self.samples += meta.num_rows
        stats = ds.read_stats(shard_id)
        for column, outcome in stats.get("stage_status", {}).items():
            self.stage_status.setdefault(column, Counter()).update(outcome)
        self.filter_reasons.update(stats.get("filter_reasons", {}))
        stage_errors = [c for c in names if c.endswith("_error")]
        stage_statuses = [f"{c.removesuffix('_error')}_status" for c in stage_errors]
        # Only the columns summarised here: later stages add wide ones (exif, OCR text, embeddings).
        wanted = dict.fromkeys(
            ("status", "error_message", "caption", "caption_status", *_COST_COLUMNS, *stage_errors, *stage_statuses)
        )
        table = ds.read_table(shard_id, columns=[c for c in wanted if c in names])
        for column in stage_errors:  # caption_error, filter_error, ...: "caption: <message>"
            prefix = column.removesuffix("_error")
            outcome = table.column(f"{prefix}_status").to_pylist() if f"{prefix}_status" in table.column_names else None
            for i, e in enumerate(table.column(column).to_pylist()):
                if e:  # a skipped sample's message says why it was left alone: not an error
                    (self.skips if outcome is not None and outcome[i] == _SKIPPED else self.errors)[f"{prefix}: {e[:200]}"] += 1
        self.cost.add(table)
        if "status" in table.column_names:
            self.status.update(str(s) for s in table.column("status").to_pylist())
        if "error_message" in table.column_names:
            status = table.column("status").to_pylist() if "status" in table.column_names else None
            for i, e in enumerate(table.column("error_message").to_pylist()):
                if e and status is not None and status[i] == _REPEATED:  # "duplicate of KEY": not an error
                    self.skips["download: a repeated URL, fetched once for its first row"] += 1
                elif e:
                    self.errors[e] += 1
        if "caption" in table.column_names:
            self._add_captions(table)

    def _add_captions(self, table: pa.Table) -> None:
        captions = table.column("caption")
        # Captions to train on: downloaded samples, and where a caption stage ran, its successes.
        for column, value in (("status", "success"), ("caption_status", "ok")):
            if column in table.column_names:
                keep = pc.fill_null(pc.equal(table.column(column), pa.scalar(value)), False)
                captions = captions.filter(keep)
                table = table.filter(keep)
        for caption in captions.to_pylist():
            if caption and not caption.isspace():  # a row without a caption (a .txt list's) is not a 0-word one
                n = min(len(caption.split()), _MAX_WORDS)
                self.hist[n] += 1
                self.words_total += n


class _Cost:
    """``caption_cost``: what the captions cost, paid (``spent_usd``) apart from cached (``cached_usd``)."""

    def __init__(self) -> None:
        self.spent = self.cached = 0.0
        self.input_tokens = self.output_tokens = self.cached_answers = 0
        self.by_run: Counter[str] = Counter()
        self.runs = False

    def add(self, table: pa.Table) -> None:
        if "caption_cost_usd" not in table.column_names:
            return
        usd = pc.fill_null(table.column("caption_cost_usd").cast(pa.float64()), 0.0)
        if "caption_cached" in table.column_names:
            cached = pc.fill_null(table.column("caption_cached"), False)
        else:  # written before the cache was recorded: every answer was asked
            cached = pa.chunked_array([pa.array([False] * table.num_rows, pa.bool_())])
        paid = pc.invert(cached)
        self.spent += pc.sum(usd.filter(paid)).as_py() or 0.0
        self.cached += pc.sum(usd.filter(cached)).as_py() or 0.0
        self.cached_answers += pc.sum(pc.and_(cached, pc.is_valid(table.column("caption_cost_usd")))).as_py() or 0
        for key, column in (("input_tokens", "caption_input_tokens"), ("output_tokens", "caption_output_tokens")):
            if column in table.column_names:
                setattr(self, key, getattr(self, key) + (pc.sum(table.column(column).filter(paid)).as_py() or 0))
        if "caption_run" in table.column_names:
            self.runs = True
            for run, value in zip(
                table.column("caption_run").filter(paid).to_pylist(), usd.filter(paid).to_pylist(), strict=True
            ):
                if value:
                    self.by_run[str(run)] += value

    def summary(self) -> dict[str, Any]:
        spent = round(self.spent, 6)
        out: dict[str, Any] = {
            "spent_usd": spent,
            "usd": spent,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_answers": self.cached_answers,
            "cached_usd": round(self.cached, 6),
        }
        if self.runs:
            out["by_run"] = {run: round(usd, 6) for run, usd in self.by_run.most_common()}
        return out


def _stage_rank(history: list[str], stages: Iterable[str]) -> dict[str, int]:
    """Each stage's place in the pipeline: the order the manifest's history ran them in, where it names
    every one of ``stages``; else the usual order. The download comes first either way."""
    order = [*history, *_STAGE_ORDER] if set(stages) <= {"download", *history} else [*_STAGE_ORDER, *history]
    ranks: dict[str, int] = {"download": 0}
    for stage in order:
        ranks.setdefault(stage, len(ranks))
    return ranks


def _stage_of(section: str) -> str:
    """The stage of an outcome section: ``status`` is the download's, ``X_status`` and ``X_reasons`` X's."""
    return "download" if section == "status" else section.removesuffix("_status").removesuffix("_reasons")


def _in_pipeline_order(stage_status: dict[str, dict[str, int]], history: list[str]) -> dict[str, dict[str, int]]:
    ranks = _stage_rank(history, map(_stage_of, stage_status))
    return dict(sorted(stage_status.items(), key=lambda kv: (ranks.get(_stage_of(kv[0]), len(ranks)), kv[0])))


def _outcomes(
    status: dict[str, int], stage_status: dict[str, dict[str, int]], filter_reasons: dict[str, int], history: list[str]
) -> dict[str, dict[str, int]]:
    """Every outcome count, in pipeline order: the download's status, then each stage's (filter's
    reasons right after its status)."""
    out: dict[str, dict[str, int]] = {}
    if status:
        out["status"] = status
    for column, counts in stage_status.items():
        out[column] = counts
        if column == "filter_status" and filter_reasons:
            out["filter_reasons"] = filter_reasons
    if filter_reasons and "filter_reasons" not in out:
        out["filter_reasons"] = filter_reasons
    return _ordered_sections(out, history)


def _ordered_sections(sections: dict[str, dict[str, int]], history: list[str]) -> dict[str, dict[str, int]]:
    ranks = _stage_rank(history, map(_stage_of, sections))

    def rank(name: str) -> tuple[int, int]:
        return ranks.get(_stage_of(name), len(ranks)), 1 if name.endswith("_reasons") else 0

    return dict(sorted(sections.items(), key=lambda kv: rank(kv[0])))


# -- exports ----------------------------------------------------------------------------------------


def _is_export(ds: Dataset, manifest: dict[str, Any]) -> bool:
    """``lenscap shard``'s output: its manifest says so (or, without one, a ``shards.json`` and no
    shard marked complete the way a stage's are)."""
    if manifest.get("stage") == "shard":
        return True
    return not manifest and not ds.completed_ids() and "shards.json" in ds.names()


def _inspect_export(ds: Dataset, manifest: dict[str, Any]) -> dict[str, Any]:
    try:
        index = ds.read_json("shards.json")
    except DatasetError:
        index = None
    parameters = manifest.get("parameters") or {}
    fmt = (index or {}).get("format") or parameters.get("format")
    listed = (index or {}).get("shards") or []
    sizes = export_format(fmt).file_sizes(ds)
    damaged = {
        r["file"]: ("missing" if sizes.get(r["file"]) is None else f"has {sizes[r['file']]} bytes, not the {r['bytes']} written")
        for r in listed
        if sizes.get(r["file"]) != r.get("bytes")
    }
    stray = sorted(set(sizes) - {r["file"] for r in listed})  # written by a run that did not finish
    complete = len(listed) - len(damaged)
    samples = sum(int(r.get("samples") or 0) for r in listed if r["file"] not in damaged)
    history = [str(h.get("stage")) for h in manifest.get("history", [])]
    left_out = _ordered_reasons((index or {}).get("left_out") or {}, history)
    captions = (index or {}).get("caption_status")
    stage_status = {"caption_status": dict(Counter(captions).most_common())} if captions else {}
    status = {"success": samples} if samples else {}  # every exported sample was downloaded
    shard_bytes, total_bytes = ds.disk_usage()
    rows = _export_rows(ds)
    hist, words_total, cost, columns = rows if rows is not None else ([0] * (_MAX_WORDS + 1), 0, None, [])
    outcomes = _outcomes(status, stage_status, {}, history)
    if left_out:
        outcomes["left_out"] = left_out
    return {
        "path": ds.location,
        "stage": manifest.get("stage") or "shard",
        "shards": {
            "complete": complete,
            "incomplete": len(stray),
            "damaged": len(damaged),
            "expected": len(listed) if index is not None else None,
        },
        "incomplete_shards": stray[:50],
        "damaged_shards": dict(sorted(damaged.items())[:50]),
        "input_incomplete_shards": manifest.get("input_incomplete_shards", []),
        "samples": samples,
        "status": status,
        "stage_status": stage_status,
        "outcomes": outcomes,
        "caption_cost": cost,
        "errors": {},
        "skips": {},
        "caption_words": _caption_words(hist, words_total),
        "filter_reasons": {},
        "columns": columns,
        "bytes": {
            "shards": shard_bytes if index is None else sum(int(r.get("bytes") or 0) for r in listed),
            "total": total_bytes,
        },
        "images": {"held": True, "location": ds.location, "problem": None},
        "history": [h.get("stage") for h in manifest.get("history", [])],
        "dedup": None,
        "export": {
            "format": fmt,
            "files": [r["file"] for r in listed][:50],
            "shards_json": index is not None,
            "sizes_json": "sizes.json" in ds.names(),
            "card": "README.md" in ds.names(),
            "left_out": left_out,
            "empty": index is not None and samples == 0,
            "parameters": parameters,
        },
    }


def _ordered_reasons(left_out: dict[str, int], history: list[str]) -> dict[str, int]:
    """An export's left-out reasons ("download: ...", "filter: ...", "duplicate", "caption: ...",
    "no image", "no caption") in pipeline order, most first within a stage."""

    def stage(reason: str) -> str:
        head = reason.partition(":")[0]
        return {"duplicate": "dedup", "no image": "filter", "no caption": "caption"}.get(head, head)

    ranks = _stage_rank(history, map(stage, left_out))

    return dict(sorted(left_out.items(), key=lambda kv: (ranks.get(stage(kv[0]), len(ranks)), -kv[1], kv[0])))


def _export_rows(ds: Dataset) -> tuple[list[int], int, dict[str, Any] | None, list[str]] | None:
    """Caption lengths, cost and columns of an export's samples, from its index (rows without
    images, kept in the export's work directory (``.lenscap/index``; a remote one's is on the machine
    that wrote it); None where there is none."""
    index_dir = ds.work_dir / "index"
    if not index_dir.is_dir():
        return None
    index = Dataset(index_dir)
    ids = index.completed_ids()
    if not ids:
        return None
    hist = [0] * (_MAX_WORDS + 1)
    words_total = 0
    cost = _Cost()
    columns: list[str] = []
    for shard_id in ids:
        names = index.read_schema(shard_id).names
        columns = columns or ["key", *(c for c in names if c != "key" and not c.startswith("_"))]
        table = index.read_table(shard_id, columns=[c for c in ("caption", *_COST_COLUMNS) if c in names])
        cost.add(table)
        if "caption" in table.column_names:
            for caption in table.column("caption").to_pylist():
                if not caption or caption.isspace():
                    continue  # no caption: not a 0-word one
                n = min(len(caption.split()), _MAX_WORDS)
                hist[n] += 1
                words_total += n
    return hist, words_total, cost.summary() if "caption_cost_usd" in columns else None, columns


def _images(ds: Dataset) -> dict[str, Any]:
    """Where the dataset's images live: in its own tars, or in the dataset its manifest names (and
    whether that one is still there, the same as when this one was written)."""
    try:
        source = ds.image_source()
    except DatasetError as e:
        ref = (ds.read_manifest() or {}).get("images") or {}
        return {"held": False, "location": ref.get("location"), "problem": str(e)}
    if source is ds:
        return {"held": True, "location": ds.location, "problem": None}
    return {"held": False, "location": source.location, "problem": None}


def _dedup_report(ds: Dataset) -> dict[str, Any] | None:
    """The headline of a dedup output's report (``DIR/dedup/report.json``), if there is one."""
    try:
        report = ds.read_json("dedup/report.json")
    except DatasetError:
        return None
    if report is None:
        return None
    return {
        "report": f"{ds.location}/dedup/report.json",
        "duplicates": report.get("duplicates"),
        "by_reason": report.get("duplicates_by_reason"),
        "clusters": report.get("clusters"),
        "of_earlier_releases": report.get("duplicates_of_earlier_releases"),
    }
