"""Pass 1 of ``shard``, per input shard: which samples are exported, where their images are, and
what each costs in the output format.

The index is a dataset directory of rows without images (``OUT/.lenscap/index/``): every exported
column, typed as in the input, plus where the image lies in the tar of the dataset holding the
input's images (``_offset``, ``_size``, from the input's offset columns),
the sample's place in the output order (``_order``) and its planned bytes (``_bytes``). Samples that
are not exported are counted by reason in each shard's stats (``left_out``), never dropped silently.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lenscap.core.dataset import Dataset
from lenscap.core.layout import IMAGE_OFFSET, IMAGE_SIZE, parquet_name
from lenscap.core.record import SUCCESS
from lenscap.core.schema import Column
from lenscap.core.stage import Stage
from lenscap.shard.formats import FORMATS, metadata_json

__all__ = ["IndexStage", "exported_schema", "INTERNAL"]

INTERNAL = [
    pa.field("_shard", pa.int32()),
    pa.field("_offset", pa.int64()),
    pa.field("_size", pa.int64()),
    pa.field("_order", pa.uint64()),
    pa.field("_bytes", pa.int64()),
]
# Per-sample outcomes and dedup bookkeeping: constant or empty for the samples that are exported.
_NOT_EXPORTED = {
    IMAGE_OFFSET,
    IMAGE_SIZE,
    "status",
    "error_message",
    "filter_reason",
    "filter_detail",
    "dup_of",
    "dup_in",
    "dup_reason",
    "dup_tier",
    "dup_distance",
    "dup_cluster",
}


def exported_schema(input_schema: pa.Schema) -> pa.Schema:
    """The input's columns that go into the export: the caption first, then the rest in order."""
    fields = [
        f for f in input_schema if f.name != "key" and f.name not in _NOT_EXPORTED and not f.name.endswith(("_status", "_error"))
    ]
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
    # The export puts every shard's rows into one: a column needs one type in all of them.
    same_types_across_shards = True
    needs = (
        *Stage.needs,
        *(
            Column(c, "string", optional=True)
            for c in ("status", "dedup_status", "filter_status", "filter_reason", "caption_status", "caption")
        ),
    )
    format: str = "webdataset"
    seed: int | None = None  # --shuffle --seed
    caption_status: str = "ok"  # ok: where captioning ran, only its successes; any: every sample

    def parameters(self) -> dict[str, Any]:
        return {"format": self.format, "seed": self.seed, "caption_status": self.caption_status}

    def run_shard(self, src: Dataset, dst: Dataset, shard_id: int) -> dict[str, Any]:
        table = src.read_table(shard_id)
        columns = exported_schema(table.schema)
        offsets_in, sizes_in = src.image_locations(shard_id, table)  # no image is read here
        # The verdict needs a few columns per row; the exported columns move as Arrow columns.
        wanted = [
            c
            for c in ("status", "dedup_status", "filter_status", "filter_reason", "caption_status", "caption")
            if c in table.column_names
        ]
        keys = [str(k) for k in table.column("key").to_pylist()]
        keep, left_out, where = [], Counter(), {c: table.column(c).to_pylist() for c in wanted}
        for i in range(len(keys)):
            reason = left_out_reason({c: where[c][i] for c in wanted}, offsets_in[i] is not None, self.caption_status)
            keep.append(reason is None)
            if reason is not None:
                left_out[reason] += 1
        rows = [i for i, k in enumerate(keep) if k]
        exported = pa.table(
            {f.name: table.column(f.name) if f.name in table.column_names else pa.nulls(table.num_rows, f.type) for f in columns}
        ).take(pa.array(rows, pa.int64()))
        planned = FORMATS[self.format].planned_bytes
        offsets, sizes, costs, orders = [], [], [], []
        for i, row in zip(rows, exported.to_pylist(), strict=True):
            offset, size = offsets_in[i], sizes_in[i]
            offsets.append(offset)
            sizes.append(size)
            costs.append(planned(size, len((row.get("caption") or "").encode()), len(metadata_json(keys[i], row))))
            orders.append(order_of(self.seed, shard_id, i, keys[i]))
        index = pa.table(
            {
                "key": pa.array([keys[i] for i in rows], pa.string()),
                **{c: exported.column(c) for c in exported.column_names},
                "_shard": pa.array([shard_id] * len(rows), pa.int32()),
                "_offset": pa.array(offsets, pa.int64()),
                "_size": pa.array(sizes, pa.int64()),
                "_order": pa.array(orders, pa.uint64()),
                "_bytes": pa.array(costs, pa.int64()),
            }
        )
        self.tick(table.num_rows)
        tmp = dst.staging_file(parquet_name(shard_id))
        pq.write_table(index, tmp)
        stats = {
            "shard": f"{shard_id:05d}",
            "count": index.num_rows,
            "stage": self.name,
            "left_out": dict(sorted(left_out.items())),
        }
        if "caption_status" in where:  # of the exported samples (not a column of the export): inspect shows them
            stats["caption_status"] = dict(sorted(Counter(str(where["caption_status"][i]) for i in rows).items()))
        return dst.commit(shard_id, {parquet_name(shard_id): tmp}, stats)
