"""What is in a dataset directory: shards, samples, statuses, errors, caption lengths, columns, bytes."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from lenscap.dataset import Dataset

__all__ = ["inspect_dataset"]

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
    completed = ds.completed_ids()
    expected = (manifest.get("shards") or {}).get("expected")
    incomplete = ds.incomplete_ids(range(expected) if expected else None)
    status: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    hist = [0] * (_MAX_WORDS + 1)
    words_total = samples = 0
    columns: list[str] = []
    for shard_id in completed:
        meta = pq.read_metadata(ds.parquet_path(shard_id))
        names = meta.schema.to_arrow_schema().names
        columns = columns or names
        samples += meta.num_rows
        # Only the columns summarised here: later stages add wide ones (exif, OCR text, embeddings).
        table = ds.read_table(shard_id, columns=[c for c in ("status", "error_message", "caption") if c in names])
        if "status" in table.column_names:
            status.update(str(s) for s in table.column("status").to_pylist())
        if "error_message" in table.column_names:
            errors.update(e for e in table.column("error_message").to_pylist() if e)
        if "caption" in table.column_names:
            captions = table.column("caption")
            ok = pc.equal(table.column("status"), "success") if "status" in table.column_names else None
            if ok is not None:
                captions = captions.filter(ok)
            for caption in captions.to_pylist():
                n = min(len(caption.split()) if caption else 0, _MAX_WORDS)
                hist[n] += 1
                words_total += n
    n_captions = sum(hist)
    shard_bytes = total_bytes = 0
    for root, _, files in os.walk(ds.path):
        for name in files:
            size = os.path.getsize(os.path.join(root, name))
            total_bytes += size
            if root == str(ds.path) and name.endswith((".tar", ".parquet", "_stats.json")):
                shard_bytes += size
    return {
        "path": str(ds.path),
        "stage": manifest.get("stage"),
        "shards": {"complete": len(completed), "incomplete": len(incomplete), "expected": expected},
        "incomplete_shards": incomplete[:50],
        "samples": samples,
        "status": dict(status.most_common()),
        "errors": dict(errors.most_common(10)),
        "caption_words": {
            "count": n_captions,
            "mean": round(words_total / n_captions, 2) if n_captions else None,
            "p50": _percentile(hist, 0.50),
            "p95": _percentile(hist, 0.95),
        },
        "columns": columns,
        "bytes": {"shards": shard_bytes, "total": total_bytes},
        "history": [h.get("stage") for h in manifest.get("history", [])],
    }
