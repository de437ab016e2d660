"""``lenscap shard``: three passes, each resumable (SIGKILL anywhere, rerun the same command).

1. index (``lenscap.shard.index``), per input shard in parallel: the exported rows, where their images lie,
   their order and planned size, into ``OUT/.lenscap/index/``;
2. plan: every exported sample in output order, cut into shards at the target size (each shard is
   filled to the target, the last takes the rest) or every ``--samples-per-shard``, written to
   ``plan.parquet`` sorted by output shard; streamed in input order, sorted by DuckDB (out of core)
   when shuffled. A size cut that would give fewer than ``--min-shards`` shards (a small export) is
   cut instead into that many shards of equal sample counts (never more shards than samples): a
   WebDataset reader splits shards between DataLoader workers and nodes, and a worker without a shard
   fails ("No samples found", open_clip's "number of shards must be >= total workers");
3. write, per output shard in parallel: images read straight from the input tars at their offsets,
   so no input shard is decoded or rewritten; each shard is put in place, then marked done.

Then ``shards.json`` (the index of files and sample counts), the format's own files beside the
shards (WebDataset's ``sizes.json``: the samples of each tar, which open_clip's loader reads),
``lenscap.json`` (provenance) and the dataset card ``README.md`` are written. An export of 0 samples
is not an error but says so: its result's exit code is ``EXIT_EMPTY`` (7) and its card says it is
empty. The working state is under ``OUT/.lenscap/``: a dot directory, which ``datasets`` and the Hub
ignore.

A remote output (``s3://...``, any fsspec URL) is written the same way: each output shard is staged on
this machine's disk, put in place (uploaded), then marked done in the output's work directory, so local
disk holds only the shards in flight.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lenscap import __version__
from lenscap.core.card import CARD_NAME
from lenscap.core.claim import input_shards
from lenscap.core.commits import atomic_write_json
from lenscap.core.dataset import Dataset, read_parquet
from lenscap.core.errors import LenscapError, UsageError
from lenscap.core.executors import Executor, executor_for
from lenscap.core.image_source import moved_image
from lenscap.core.job import Job
from lenscap.core.layout import IMAGE_EXT
from lenscap.core.manifest import MANIFEST_FORMAT
from lenscap.core.progress import say, start_progress
from lenscap.core.result import EXIT_EMPTY, JobResult
from lenscap.core.sql import literal, out_of_core
from lenscap.core.tario import header_before, member_name
from lenscap.shard.card import write_card
from lenscap.shard.formats import FORMATS
from lenscap.shard.index import INTERNAL, IndexStage
from lenscap.shard.options import ShardOptions

__all__ = ["run_shard"]


_PLAN_MEMORY = "256MB"  # the shuffled plan's sort spills to disk beyond this


@dataclass(frozen=True)
class _Even:
    """A cut into ``shards`` shards of equal sample counts (to one), for ``samples`` samples."""

    shards: int
    samples: int


def _cut(options: ShardOptions, before: int, size: int, number: int, even: _Even | None = None) -> int:
    """The output shard of a sample, before dense renumbering: by count, or the shard its middle byte
    falls in (shards then miss the target by half a sample at most), or with ``even`` the even split.
    Integer arithmetic, the same in SQL."""
    if even is not None:
        return number * even.shards // even.samples
    if options.samples_per_shard is not None:
        return number // options.samples_per_shard
    return (2 * before + size) // (2 * int(options.target_bytes or 1))


def _plan(index: Dataset, options: ShardOptions, state: Path) -> dict[str, Any]:
    """Assign every indexed sample an output shard; write ``plan.parquet`` sorted by output shard.

    A size cut into fewer than ``min_shards`` shards is planned again as an even split into
    ``min(min_shards, samples)`` shards: that happens only to exports smaller than ``min_shards``
    target sizes, so the second pass is cheap."""
    tmp = state / ".plan.parquet.tmp"
    if not index.completed_ids():  # nothing to export: an empty plan, still a readable file
        pq.write_table(pa.table({"_out": pa.array([], pa.int32()), "_order": pa.array([], pa.uint64())}), tmp)
        shards = []
    else:
        shards = _plan_cut(index, options, tmp, state)
        samples = sum(n for n, _ in shards)
        wanted = min(options.min_shards, samples)
        if options.samples_per_shard is None and len(shards) < wanted:
            shards = _plan_cut(index, options, tmp, state, _Even(wanted, samples))
    os.replace(tmp, state / "plan.parquet")
    return {"shards": [{"samples": n, "planned_bytes": b} for n, b in shards]}


def _plan_cut(index: Dataset, options: ShardOptions, tmp: Path, state: Path, even: _Even | None = None) -> list[tuple[int, int]]:
    if options.shuffle:
        return _plan_shuffled(index, options, tmp, state, even)
    return _plan_in_order(index, options, tmp, even)


def _plan_in_order(index: Dataset, options: ShardOptions, tmp: Path, even: _Even | None = None) -> list[tuple[int, int]]:
    """Input order is index order: one streaming pass, an index shard at a time, in flat memory."""
    writer, shards, before, number, last_cut = None, [], 0, 0, None
    try:
        for shard_id in index.completed_ids():
            table = read_parquet(index.parquet_path(shard_id))
            outs = []
            for size in table.column("_bytes").to_pylist():
                cut = _cut(options, before, size, number, even)
                if cut != last_cut:  # dense shard numbers, even past a sample larger than the target
                    shards.append((0, 0))
                    last_cut = cut
                n, b = shards[-1]
                shards[-1] = (n + 1, b + size)
                outs.append(len(shards) - 1)
                before, number = before + size, number + 1
            table = table.append_column("_out", pa.array(outs, pa.int32()))
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    return shards


def _plan_shuffled(
    index: Dataset, options: ShardOptions, tmp: Path, state: Path, even: _Even | None = None
) -> list[tuple[int, int]]:
    """A global sort on the shuffle order: DuckDB, spilling to disk beyond ``_PLAN_MEMORY``."""
    files = [str(index.parquet_path(i)) for i in index.completed_ids()]
    if even is not None:
        cut = f"((row_number() OVER (ORDER BY _order) - 1) * {int(even.shards)}) // {int(even.samples)}"
    elif options.samples_per_shard is not None:
        cut = f"(row_number() OVER (ORDER BY _order) - 1) // {int(options.samples_per_shard)}"
    else:
        before = "(sum(_bytes) OVER (ORDER BY _order ROWS UNBOUNDED PRECEDING) - _bytes)"
        cut = f"(2 * {before} + _bytes) // {2 * int(options.target_bytes or 1)}"
    con = out_of_core(_PLAN_MEMORY, state / "spill")
    try:
        con.execute(
            f"""CREATE TABLE planned AS SELECT * EXCLUDE (_cut), (dense_rank() OVER (ORDER BY _cut) - 1)::INTEGER AS _out
                        FROM (SELECT *, {cut} AS _cut FROM read_parquet(?))""",
            [files],
        )
        shards = con.execute("SELECT count(*), sum(_bytes) FROM planned GROUP BY _out ORDER BY _out").fetchall()
        con.execute(f"COPY (SELECT * FROM planned ORDER BY _out, _order) TO {literal(tmp)} (FORMAT parquet)")
    finally:
        con.close()
        shutil.rmtree(state / "spill", ignore_errors=True)
    return [(int(n), int(b)) for n, b in shards]


def _write_shard(src: Dataset, dst: Dataset, shard_id: int, shards: int, format_name: str) -> dict[str, Any]:
    """Pass 3 for one output shard (runs in a worker process): the file, put in place; the caller marks it done."""
    import duckdb  # DuckDB takes a quarter second to import: only where a query runs

    con = duckdb.connect()
    try:  # plan.parquet is sorted by _out, so only this shard's row groups are read
        table = con.sql(
            "SELECT * EXCLUDE (_out) FROM read_parquet($plan) WHERE _out = $shard ORDER BY _order",
            params={"plan": str(dst.work_dir / "plan.parquet"), "shard": shard_id},
        ).to_arrow_table()
    finally:
        con.close()
    internal = {f.name for f in INTERNAL}
    columns = pa.schema([f for f in table.schema if f.name != "key" and f.name not in internal])
    shard_cls = FORMATS[format_name]
    name = shard_cls.file_name(shard_id, shards)
    tmp = dst.staging_file(name)
    writer = shard_cls(tmp, columns)
    images = src.image_source()  # the input itself, or the dataset whose tars it refers to
    tars: dict[int, Any] = {}
    try:
        for row in table.to_pylist():
            f = tars.get(row["_shard"])
            if f is None:
                f = tars[row["_shard"]] = images.open_tar(row["_shard"])  # a remote one is read by ranges; closed below
            if member_name(header_before(f, row["_offset"])) != f"{row['key']}.{IMAGE_EXT}":
                raise moved_image(images, row["_shard"], row["key"], row["_offset"])
            writer.write(
                row["key"], {k: v for k, v in row.items() if k not in internal and k != "key"}, f, row["_offset"], row["_size"]
            )
        size = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        for f in tars.values():
            f.close()
    dst.put(tmp, name)
    return {"file": name, "samples": table.num_rows, "bytes": size}


def run_shard(
    in_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: ShardOptions,
    *,
    quiet: bool = True,
    executor: Executor | None = None,
) -> JobResult:
    # The input may be remote (its passes read shard by shard, image by image), and the output too.
    src = Dataset.open(in_dir)
    shards, _ = input_shards(src, options.allow_incomplete)
    stage = IndexStage(options.format, options.seed if options.shuffle else None, options.caption_status)
    stage.check_input(src, shards)  # before the output is claimed: an input the export cannot read is refused here
    job = Job("shard", executor or executor_for(options), quiet)
    settings = {"options": options.identity()}
    with job.output(out_dir, settings, src=src, overwrite=options.overwrite, input_ids=shards) as dst:
        _forget_lost(dst)
        indexed = _index(job, stage, src, dst)
        if indexed.failed_shards:
            say(f"shard: {len(indexed.failed_shards)} input shard(s) could not be indexed; nothing exported yet; rerun to resume")
            return JobResult("shard", dst.location, failed_shards=indexed.failed_shards, details=_details(options, 0, 0, {}))
        index = Dataset(dst.work_dir / "index")
        plan = _planned(index, options, dst, indexed.samples)
        records = _write(job, src, dst, options, len(plan["shards"]), [int(p["samples"]) for p in plan["shards"]])
        return _finish(src, dst, options, index, records)


class _WriteTask:
    """Pass 3 as a task: an item is an output shard, written, put in place, then marked done in the
    output's work directory (a kill before that leaves no mark, and the rerun writes the shard again)."""

    def __init__(self, src: Dataset, dst: Dataset, shards: int, fmt: str) -> None:
        self.src, self.dst, self.shards, self.fmt = src, dst, shards, fmt

    def setup(self) -> None:
        pass

    def run(self, shard_id: int) -> dict[str, Any]:
        done = _done(self.dst, shard_id)
        if done.exists():  # a task run again after its worker died
            return json.loads(done.read_text())
        record = _write_shard(self.src, self.dst, shard_id, self.shards, self.fmt)
        atomic_write_json(done, record)
        return record


def _done(dst: Dataset, shard_id: int) -> Path:
    return dst.work_dir / "done" / f"{shard_id:05d}.json"


def _forget_lost(dst: Dataset) -> None:
    """Before a run (the lock held, so no task is writing): keep only the done marks of shards whose file
    is there with the size the mark records. A mark is written after its file is in place, so a missing
    or short file means the output was changed since; that shard is then written again."""
    done_dir = dst.work_dir / "done"
    done_dir.mkdir(parents=True, exist_ok=True)
    sizes = dst.tree_sizes()
    for marker in done_dir.glob("*.json"):
        record = json.loads(marker.read_text())
        if sizes.get(record["file"]) != record["bytes"]:
            marker.unlink()


def _index(job: Job, stage: IndexStage, src: Dataset, dst: Dataset) -> JobResult:
    """Pass 1: the index (``lenscap.shard.index``), per input shard."""
    with job.internal_output(stage, src, dst.work_dir / "index") as run:
        return job.run_shards(run, job.progress("shard: indexing"))


def _planned(index: Dataset, options: ShardOptions, dst: Dataset, indexed: int) -> dict[str, Any]:
    """Pass 2: the plan, once per index."""
    state = dst.work_dir
    fingerprint = {"options": options.identity(), "index_shards": index.completed_ids(), "indexed": indexed}
    marker = state / "plan.json"
    plan = json.loads(marker.read_text()) if marker.exists() else None
    if plan is not None and plan["fingerprint"] != fingerprint:
        if any((state / "done").glob("*.json")):
            raise UsageError(f"the input of {dst.location} changed since it was exported; use a new output directory")
        plan = None
    if plan is None:
        plan = _plan(index, options, state) | {"fingerprint": fingerprint}
        atomic_write_json(marker, plan)
    return plan


def _write(
    job: Job, src: Dataset, dst: Dataset, options: ShardOptions, shards: int, per_shard: list[int]
) -> list[dict[str, Any]]:
    """Pass 3: the output shards not done yet; every shard's record."""
    todo = [i for i in range(shards) if not _done(dst, i).exists()]
    progress = job.progress("shard: writing")
    start_progress(
        progress,
        shards,
        shards - len(todo),
        total_samples=sum(per_shard),
        done_samples=sum(per_shard) - sum(per_shard[i] for i in todo),
    )
    try:
        failed = job.map(
            _WriteTask(src, dst, shards, options.format),
            todo,
            lambda _, record: progress.advance(shards=1, samples=record["samples"]),
        )
    finally:
        progress.finish()
    if failed:
        shard_id, message = min(failed.items())
        raise LenscapError(f"{len(failed)} output shard(s) could not be written, e.g. {shard_id:05d}: {message}; rerun to resume")
    return [json.loads(_done(dst, i).read_text()) for i in range(shards)]


def _outcomes(index: Dataset) -> tuple[dict[str, int], dict[str, int] | None]:
    """The samples left out, by reason, and the caption outcomes of those exported (None: not captioned)."""
    left_out: dict[str, int] = {}
    caption_status: dict[str, int] | None = None
    for stats in index.read_all_stats(index.completed_ids()):
        for reason, n in stats.get("left_out", {}).items():
            left_out[reason] = left_out.get(reason, 0) + n
        if "caption_status" in stats:
            caption_status = caption_status or {}
            for status, n in stats["caption_status"].items():
                caption_status[status] = caption_status.get(status, 0) + n
    return dict(sorted(left_out.items())), dict(sorted(caption_status.items())) if caption_status is not None else None


def _finish(src: Dataset, dst: Dataset, options: ShardOptions, index: Dataset, records: list[dict[str, Any]]) -> JobResult:
    """The export's own files, in this order: ``shards.json``, the format's (``sizes.json``), ``lenscap.json``,
    the card; its result."""
    left_out, caption_status = _outcomes(index)
    summary: dict[str, Any] = {
        "format": options.format,
        "samples": sum(r["samples"] for r in records),
        "bytes": sum(r["bytes"] for r in records),
        "shards": records,
        "left_out": left_out,
    }
    if caption_status is not None:  # the caption outcomes of the exported samples, where the input was captioned
        summary["caption_status"] = caption_status
    dst.put_bytes("shards.json", _json(summary))
    for name, value in FORMATS[options.format].side_files(records).items():
        dst.put_bytes(name, _json(value))
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    made = {"stage": "shard", "parameters": options.identity(), "input": src.location}
    history = [*(src.read_manifest() or {}).get("history", []), {**made, "lenscap_version": __version__, "at": at}]
    counts = {"samples": summary["samples"], "left_out": left_out}
    manifest = {"format": MANIFEST_FORMAT, "lenscap_version": __version__, **made, "history": history, "counts": counts}
    dst.put_bytes("lenscap.json", _json(manifest))
    dst.put_bytes(CARD_NAME, write_card(dst.url, FORMATS[options.format], summary, history, index, _columns(index)).encode())
    result = JobResult(
        "shard",
        dst.location,
        len(records),
        len(records),
        summary["samples"],
        details=_details(options, len(records), summary["bytes"], left_out),
        empty=summary["samples"] == 0,
    )
    result.details["empty"] = result.empty
    if result.empty:
        left = ", ".join(f"{n} {r}" for r, n in left_out.items()) or "none"
        say(f"warning: {dst.location} holds 0 samples (left out: {left}); nothing to train on (exit code {EXIT_EMPTY})")
    return result


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=False, default=str).encode() + b"\n"


def _details(options: ShardOptions, shards: int, size: int, left_out: dict[str, int]) -> dict[str, Any]:
    return {"format": options.format, "bytes": size, "left_out": left_out, "empty": False, "shards": shards}


def _columns(index: Dataset) -> pa.Schema:
    ids = index.completed_ids()
    if not ids:
        return pa.schema([pa.field("caption", pa.string())])
    internal = {f.name for f in INTERNAL} | {"key"}
    schema = pq.read_schema(index.parquet_path(ids[0]))
    return pa.schema([f for f in schema if f.name not in internal])
