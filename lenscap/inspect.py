"""What is in a dataset directory: shards, samples, statuses, errors, caption lengths, columns, bytes."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from lenscap.dataset import Dataset
from lenscap.errors import DatasetError
from lenscap.layout import shard_name

__all__ = ["inspect_dataset"]

_SPEND_COLUMNS = ("caption_cost_usd", "caption_input_tokens", "caption_output_tokens")
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
    status: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    hist = [0] * (_MAX_WORDS + 1)
    words_total = samples = 0
    stage_status: dict[str, Counter[str]] = {}
    filter_reasons: Counter[str] = Counter()
    spend = {"usd": 0.0, "input_tokens": 0, "output_tokens": 0}
    columns: list[str] = []
    for shard_id in completed:
        meta = ds.read_metadata(shard_id)
        names = meta.schema.to_arrow_schema().names
        columns = columns or names
        samples += meta.num_rows
        # Only the columns summarised here: later stages add wide ones (exif, OCR text, embeddings).
        stats = ds.read_stats(shard_id)
        for column, outcome in stats.get("stage_status", {}).items():
            stage_status.setdefault(column, Counter()).update(outcome)
        filter_reasons.update(stats.get("filter_reasons", {}))
        stage_errors = [c for c in names if c.endswith("_error")]
        wanted = ("status", "error_message", "caption", "caption_status", *_SPEND_COLUMNS, *stage_errors)
        table = ds.read_table(shard_id, columns=[c for c in wanted if c in names])
        for column in stage_errors:  # caption_error, filter_error, ...: "caption: <message>"
            prefix = column.removesuffix("_error")
            errors.update(f"{prefix}: {e[:200]}" for e in table.column(column).to_pylist() if e)
        for key, column in zip(spend, _SPEND_COLUMNS, strict=True):
            if column in table.column_names:
                spend[key] += pc.sum(table.column(column)).as_py() or 0
        if "status" in table.column_names:
            status.update(str(s) for s in table.column("status").to_pylist())
        if "error_message" in table.column_names:
            errors.update(e for e in table.column("error_message").to_pylist() if e)
        if "caption" in table.column_names:
            captions = table.column("caption")
            # Captions to train on: downloaded samples, and where a caption stage ran, its successes.
            for column, value in (("status", "success"), ("caption_status", "ok")):
                if column in table.column_names:
                    keep = pc.fill_null(pc.equal(table.column(column), pa.scalar(value)), False)
                    captions = captions.filter(keep)
                    table = table.filter(keep)
            for caption in captions.to_pylist():
                n = min(len(caption.split()) if caption else 0, _MAX_WORDS)
                hist[n] += 1
                words_total += n
    n_captions = sum(hist)
    shard_bytes, total_bytes = ds.disk_usage()
    dedup = _dedup_report(ds)
    return {
        "path": ds.location,
        "stage": manifest.get("stage"),
        "shards": {"complete": len(completed), "incomplete": len(incomplete), "damaged": len(damaged), "expected": expected},
        "incomplete_shards": incomplete[:50],
        "damaged_shards": {shard_name(i): why for i, why in sorted(damaged.items())[:50]},
        "input_incomplete_shards": manifest.get("input_incomplete_shards", []),
        "samples": samples,
        "status": dict(status.most_common()),
        "stage_status": {column: dict(c.most_common()) for column, c in sorted(stage_status.items())},
        "caption_cost": {**spend, "usd": round(spend["usd"], 6)} if "caption_cost_usd" in columns else None,
        "errors": dict(errors.most_common(10)),
        "caption_words": {
            "count": n_captions,
            "mean": round(words_total / n_captions, 2) if n_captions else None,
            "p50": _percentile(hist, 0.50),
            "p95": _percentile(hist, 0.95),
            "histogram": [[words, n] for words, n in enumerate(hist) if n],  # [words, captions], JSON-stable
        },
        "filter_reasons": dict(filter_reasons.most_common()),
        "columns": columns,
        "bytes": {"shards": shard_bytes, "total": total_bytes},
        "images": _images(ds),
        "history": [h.get("stage") for h in manifest.get("history", [])],
        "dedup": dedup,
    }


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
    return {"report": f"{ds.location}/dedup/report.json", "duplicates": report.get("duplicates"),
            "by_reason": report.get("duplicates_by_reason"), "clusters": report.get("clusters"),
            "of_earlier_releases": report.get("duplicates_of_earlier_releases")}
