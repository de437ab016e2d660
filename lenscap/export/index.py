"""Pass 1 of ``shard``, per input shard: which samples are exported, where their images are, and
what each costs in the output format.

The index is a dataset directory of rows without images (``OUT/.lenscap/index/``): every exported
column, typed as in the input, plus where the image lies in the input tar (``_offset``, ``_size``),
the sample's place in the output order (``_order``) and its planned bytes (``_bytes``). Samples that
are not exported are counted by reason in each shard's stats (``left_out``), never dropped silently.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lenscap.dataset import IMAGE_EXT, Dataset
from lenscap.export.formats import FORMATS, metadata_json
from lenscap.record import SUCCESS, Sample
from lenscap.stages.base import Stage

__all__ = ["IndexStage", "exported_schema", "INTERNAL"]

INTERNAL = [pa.field("_shard", pa.int32()), pa.field("_offset", pa.int64()), pa.field("_size", pa.int64()),
            pa.field("_order", pa.uint64()), pa.field("_bytes", pa.int64())]
# Per-sample outcomes and dedup bookkeeping: constant or empty for the samples that are exported.
_NOT_EXPORTED = {"status", "error_message", "filter_reason", "filter_detail", "dup_of", "dup_in", "dup_reason",
                 "dup_distance", "dup_cluster"}


def exported_schema(input_schema: pa.Schema) -> pa.Schema:
    """The input's columns that go into the export: the caption first, then the rest in order."""
    fields = [f for f in input_schema if f.name != "key" and f.name not in _NOT_EXPORTED
              and not f.name.endswith(("_status", "_error"))]
    caption = [f for f in fields if f.name == "caption"] or [pa.field("caption", pa.string())]
    return pa.schema(caption + [f for f in fields if f.name != "caption"])


def left_out_reason(row: dict[str, Any], has_image: bool, caption_status: str) -> str | None:
    """Why a sample is not exported, or None if it is."""
    if row.get("status") != SUCCESS:
        return f"download: {row.get('status')}"
    if row.get("dedup_status") == "duplicate":
        return "duplicate"
    if not has_image:
        return f"filter: {row.get('filter_reason')}" if row.get("filter_status") == "dropped" else "no image"
    status = row.get("caption_status")
    if caption_status == "ok" and status is not None and status != "ok":
        return f"caption: {status}"
    if not (row.get("caption") or "").strip():
        return "no caption"
    return None


def order_of(seed: int | None, shard_id: int, row: int, key: str) -> int:
    """Input order, or with a seed a pseudo-random order that depends only on (seed, key)."""
    if seed is None:
        return (shard_id << 32) | row
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")


@dataclass
class IndexStage(Stage):
    name = "index"
    format: str = "webdataset"
    seed: int | None = None  # --shuffle --seed
    caption_status: str = "ok"  # ok: where captioning ran, only its successes; any: every sample

    def parameters(self) -> dict[str, Any]:
        return {"format": self.format, "seed": self.seed, "caption_status": self.caption_status}

    def run_shard(self, src: Dataset, dst: Dataset, shard_id: int) -> dict[str, Any]:
        input_schema = pq.read_schema(src.parquet_path(shard_id))
        columns = exported_schema(input_schema)
        writer = dst.writer(shard_id, pa.schema([pa.field("key", pa.string()), *columns, *INTERNAL]))
        images: dict[str, tuple[int, int]] = {}
        if src.tar_path(shard_id).exists():
            with tarfile.open(src.tar_path(shard_id)) as tar:  # headers only: no image is read here
                for m in tar:
                    key, _, ext = m.name.partition(".")
                    if ext == IMAGE_EXT:
                        images[key] = (m.offset_data, m.size)
        planned = FORMATS[self.format].planned_bytes
        left_out: Counter[str] = Counter()
        try:
            row_number = 0
            for batch in src.read_table(shard_id).to_batches(max_chunksize=4096):
                for row in batch.to_pylist():
                    key = str(row["key"])
                    reason = left_out_reason(row, key in images, self.caption_status)
                    if reason is None:
                        out = {f.name: row.get(f.name) for f in columns}
                        offset, size = images[key]
                        cost = planned(size, len((out.get("caption") or "").encode()), len(metadata_json(key, out)))
                        out.update(_shard=shard_id, _offset=offset, _size=size, _bytes=cost,
                                   _order=order_of(self.seed, shard_id, row_number, key))
                        writer.write(Sample(key, out))
                    else:
                        left_out[reason] += 1
                    row_number += 1
                self.tick(batch.num_rows)
        except BaseException:
            writer.abort()
            raise
        return writer.commit({"stage": self.name, "left_out": dict(sorted(left_out.items()))})
