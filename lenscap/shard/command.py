"""``lenscap shard``: three passes, each resumable (SIGKILL anywhere, rerun the same command).

1. index (``export.index``), per input shard in parallel: the exported rows, where their images lie,
   their order and planned size, into ``OUT/.lenscap/index/``;
2. plan: every exported sample in output order, cut into shards at the target size (each shard is
   filled to the target, the last takes the rest) or every ``--samples-per-shard``, written to
   ``plan.parquet`` sorted by output shard; streamed in input order, sorted by DuckDB (out of core)
   when shuffled. A size cut that would give fewer than ``--min-shards`` shards (a small export) is
   cut instead into that many shards of equal sample counts (never more shards than samples): a
   WebDataset reader splits shards between DataLoader workers and nodes, and a worker without a shard
   fails ("No samples found", open_clip's "number of shards must be >= total workers");
3. write, per output shard in parallel: images read straight from the input tars at their offsets,
   so no input shard is decoded or rewritten; each shard is renamed into place, then marked done.

Then ``shards.json`` (the index of files and sample counts), for WebDataset ``sizes.json`` (the
samples of each tar by file name, which open_clip's loader reads), ``lenscap.json`` (provenance)
and the dataset card ``README.md`` are written. An export of 0 samples is not an error but says so:
its result's exit code is ``EXIT_EMPTY`` (7) and its card says it is empty. The working state is under ``OUT/.lenscap/``: a dot
directory, which ``datasets`` and the Hub ignore.

A remote output (``s3://...``, any fsspec URL) is written through its local mirror (``Dataset.path``),
which holds ``.lenscap/``: each output shard is written there as above, uploaded, then marked done,
then its local copy is removed, so local disk holds only the shards in flight; the three files above
are uploaded at the end (``export.remote``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lenscap import __version__
from lenscap.core.claim import input_shards
from lenscap.core.commits import atomic_write_json
from lenscap.core.dataset import Dataset, read_parquet
from lenscap.core.errors import LenscapError, UsageError
from lenscap.core.executors import Executor, LocalExecutor
from lenscap.core.image_source import moved_image
from lenscap.core.job import owned_output, run_stage
from lenscap.core.layout import IMAGE_EXT
from lenscap.core.progress import make_progress, start_progress
from lenscap.core.result import EXIT_EMPTY, JobResult
from lenscap.core.sql import literal, out_of_core
from lenscap.core.tario import header_before, member_name
from lenscap.core.uploads import put_and_remove
from lenscap.shard.card import write_card
from lenscap.shard.formats import FORMATS
from lenscap.shard.index import INTERNAL, IndexStage
from lenscap.shard.remote import INDEX_FILES, sync_mirror

__all__ = ["ExportOptions", "ExportResult", "run_export", "parse_size", "MIN_SHARDS"]

# The fewest shards a size-cut export has (unless it has fewer samples): enough for a typical
# 8-worker DataLoader (or 8 GPUs of one node), each worker reading shards of its own.
MIN_SHARDS = 8

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``500MB`` (decimal), ``512MiB`` (binary) or a number of bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"expected a size such as 500MB or 1GiB, not {text!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


@dataclass(frozen=True)
class ExportOptions:
    format: str = "webdataset"
    target_bytes: int | None = 500 * 10**6  # the Hub's default shard size
    samples_per_shard: int | None = None
    shuffle: bool = False
    seed: int = 0
    caption_status: str = "ok"
    # A size cut giving fewer shards than this is cut into this many instead (fewer only with fewer
    # samples); --samples-per-shard is an exact count and is kept as given.
    min_shards: int = MIN_SHARDS

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UsageError(f"--format must be {' or '.join(FORMATS)}, not {self.format!r}")
        if self.caption_status not in ("ok", "any"):
            raise UsageError(f"--caption-status must be ok or any, not {self.caption_status!r}")
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise UsageError(f"--samples-per-shard must be at least 1, not {self.samples_per_shard}")
        if self.samples_per_shard is None and (self.target_bytes or 0) < 1:
            raise UsageError("--target-size must be more than 0 bytes")
        if self.min_shards < 1:
            raise UsageError(f"--min-shards must be at least 1, not {self.min_shards}")

    def index_stage(self) -> IndexStage:
        return IndexStage(self.format, self.seed if self.shuffle else None, self.caption_status)


@dataclass
class ExportResult(JobResult):
    """An export's result: its shards are the output shards written; ``failed_shards`` the input shards
    that could not be indexed (then nothing is exported yet)."""

    format: str = ""
    bytes: int = 0
    left_out: dict[str, int] = field(default_factory=dict)
    empty: bool = False  # every shard written, and they hold 0 samples (exit code 7)

    @property
    def exit_code(self) -> int:
        """0: exported; 1: some input shards could not be indexed (a rerun goes on); 7: done, but 0 samples."""
        code = super().exit_code
        return EXIT_EMPTY if code == 0 and self.empty else code


def _state(out: Path) -> Path:
    return out / ".lenscap"


_PLAN_MEMORY = "256MB"  # the shuffled plan's sort spills to disk beyond this


@dataclass(frozen=True)
class _Even:
    """A cut into ``shards`` shards of equal sample counts (to one), for ``samples`` samples."""

    shards: int
    samples: int


def _cut(options: ExportOptions, before: int, size: int, number: int, even: _Even | None = None) -> int:
    """The output shard of a sample, before dense renumbering: by count, or the shard its middle byte
    falls in (shards then miss the target by half a sample at most), or with ``even`` the even split.
    Integer arithmetic, the same in SQL."""
    if even is not None:
        return number * even.shards // even.samples
    if options.samples_per_shard is not None:
        return number // options.samples_per_shard
    return (2 * before + size) // (2 * int(options.target_bytes or 1))


def _plan(index: Dataset, options: ExportOptions, state: Path) -> dict[str, Any]:
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


def _plan_cut(index: Dataset, options: ExportOptions, tmp: Path, state: Path, even: _Even | None = None) -> list[tuple[int, int]]:
    if options.shuffle:
        return _plan_shuffled(index, options, tmp, state, even)
    return _plan_in_order(index, options, tmp, even)


def _plan_in_order(index: Dataset, options: ExportOptions, tmp: Path, even: _Even | None = None) -> list[tuple[int, int]]:
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
    index: Dataset, options: ExportOptions, tmp: Path, state: Path, even: _Even | None = None
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


def _write_shard(src: Dataset, out_dir: str, shard_id: int, shards: int, format_name: str) -> dict[str, Any]:
    """Pass 3 for one output shard (runs in a worker process): the file, in place; the caller marks it done."""
    import duckdb

    out, state = Path(out_dir), _state(Path(out_dir))
    con = duckdb.connect()
    try:  # plan.parquet is sorted by _out, so only this shard's row groups are read
        table = con.sql(
            "SELECT * EXCLUDE (_out) FROM read_parquet($plan) WHERE _out = $shard ORDER BY _order",
            params={"plan": str(state / "plan.parquet"), "shard": shard_id},
        ).to_arrow_table()
    finally:
        con.close()
    internal = {f.name for f in INTERNAL}
    columns = pa.schema([f for f in table.schema if f.name != "key" and f.name not in internal])
    shard_cls = FORMATS[format_name]
    name = shard_cls.file_name(shard_id, shards)
    final = out / name
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
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
    os.replace(tmp, final)
    return {"file": name, "samples": table.num_rows, "bytes": size}


def run_export(
    options: ExportOptions,
    in_dir: str | Path,
    out_dir: str | Path,
    processes: int = 1,
    quiet: bool = False,
    executor: Executor | None = None,
    *,
    overwrite: bool = False,
    allow_incomplete: bool = False,
) -> ExportResult:
    # The input may be remote (its passes read shard by shard, image by image), and the output too.
    src = Dataset.open(in_dir)
    shards, _ = input_shards(src, allow_incomplete)
    with owned_output(out_dir, "shard", {"options": asdict(options)}, src=src, overwrite=overwrite, input_ids=shards) as out:
        return _run_locked(options, src, out, executor or LocalExecutor(processes), quiet)


class _WriteJob:
    """Pass 3 as an executor's job: an item is an output shard, written into ``out``'s local directory
    (a remote output's mirror, as the driver named it, so every worker uses the same), then put where
    it belongs (``lenscap.core.uploads``: nothing to do for a local output)."""

    def __init__(self, src: Dataset, out: Dataset, shards: int, fmt: str) -> None:
        self.src, self.out, self.shards, self.fmt = src, out, shards, fmt

    def setup(self) -> None:
        pass

    def run(self, shard_id: int) -> dict[str, Any]:
        done = _state(self.out.path) / "done" / f"{shard_id:05d}.json"
        if done.exists():  # a task run again after its worker died
            return json.loads(done.read_text())
        record = _write_shard(self.src, str(self.out.path), shard_id, self.shards, self.fmt)
        # Done only once uploaded: a kill before that leaves no marker, and the rerun writes the shard again.
        put_and_remove(self.out, self.out.path, [record["file"]])
        atomic_write_json(done, record)
        return record


def _run_locked(options: ExportOptions, src: Dataset, dst: Dataset, executor: Executor, quiet: bool) -> ExportResult:
    out = dst.path  # where files are written: the output, or a remote one's mirror
    state = _state(out)
    (state / "done").mkdir(parents=True, exist_ok=True)
    sync_mirror(dst, state / "done")
    where = dst.location

    # Pass 1: the index.
    index_dir = state / "index"
    indexed = run_stage(
        options.index_stage(), src, index_dir, progress=make_progress("shard: indexing", quiet), executor=executor, internal=True
    )
    if indexed.failed_shards:
        return ExportResult(where, failed_shards=indexed.failed_shards, format=options.format)
    index = Dataset(index_dir)
    left_out: dict[str, int] = {}
    caption_status: dict[str, int] | None = None
    for shard_id in index.completed_ids():
        stats = index.read_stats(shard_id)
        for reason, n in stats.get("left_out", {}).items():
            left_out[reason] = left_out.get(reason, 0) + n
        if "caption_status" in stats:
            caption_status = caption_status or {}
            for status, n in stats["caption_status"].items():
                caption_status[status] = caption_status.get(status, 0) + n

    # Pass 2: the plan, once per index.
    fingerprint = {"options": asdict(options), "index_shards": index.completed_ids(), "indexed": indexed.samples}
    marker = state / "plan.json"
    plan = json.loads(marker.read_text()) if marker.exists() else None
    if plan is not None and plan["fingerprint"] != fingerprint:
        if any((state / "done").glob("*.json")):
            raise UsageError(f"the input of {where} changed since it was exported; use a new output directory")
        plan = None
    if plan is None:
        plan = _plan(index, options, state) | {"fingerprint": fingerprint}
        atomic_write_json(marker, plan)

    # Pass 3: the output shards.
    shards = len(plan["shards"])
    todo = [i for i in range(shards) if not (state / "done" / f"{i:05d}.json").exists()]
    for stray in list(out.glob(".*.tmp")) + list(out.glob("data/.*.tmp")):
        stray.unlink(missing_ok=True)
    if options.format == "parquet" and todo:
        dst.fs.makedirs(dst.file("data"), exist_ok=True)  # once here, not in every task
    progress = make_progress("shard: writing", quiet)
    per_shard = [int(p["samples"]) if isinstance(p, dict) else int(p[0]) for p in plan["shards"]]  # from the plan
    start_progress(
        progress,
        shards,
        shards - len(todo),
        total_samples=sum(per_shard),
        done_samples=sum(per_shard) - sum(per_shard[i] for i in todo),
    )
    failed: dict[int, str] = {}
    try:
        fatal = executor.run(
            _WriteJob(src, dst, shards, options.format),
            todo,
            lambda _, record: progress.advance(shards=1, samples=record["samples"]),
            failed,
        )
    finally:
        progress.finish()
    if fatal is not None:
        raise fatal
    if failed:
        shard_id, message = min(failed.items())
        raise LenscapError(f"{len(failed)} output shard(s) could not be written, e.g. {shard_id:05d}: {message}; rerun to resume")

    records = [json.loads((state / "done" / f"{i:05d}.json").read_text()) for i in range(shards)]
    summary = {
        "format": options.format,
        "samples": sum(r["samples"] for r in records),
        "bytes": sum(r["bytes"] for r in records),
        "shards": records,
        "left_out": dict(sorted(left_out.items())),
    }
    if caption_status is not None:  # the caption outcomes of the exported samples, where the input was captioned
        summary["caption_status"] = dict(sorted(caption_status.items()))
    atomic_write_json(out / "shards.json", summary)
    if options.format == "webdataset":  # open_clip's get_dataset_size: samples per tar, by file name
        atomic_write_json(out / "sizes.json", {r["file"]: r["samples"] for r in records})
    manifest = src.read_manifest() or {}
    history = [
        *manifest.get("history", []),
        {
            "stage": "shard",
            "parameters": asdict(options),
            "input": src.location,
            "lenscap_version": __version__,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    ]
    atomic_write_json(
        out / "lenscap.json",
        {
            "lenscap_version": __version__,
            "stage": "shard",
            "parameters": asdict(options),
            "input": src.location,
            "history": history,
            "counts": {"samples": summary["samples"], "left_out": summary["left_out"]},
        },
    )
    write_card(
        out, options.format, summary, history, Path(index_dir), _columns(index), location=dst.location if dst.remote else None
    )
    put_and_remove(dst, out, list(INDEX_FILES))  # those written: sizes.json is WebDataset's only
    return ExportResult(
        where,
        shards,
        shards,
        summary["samples"],
        format=options.format,
        bytes=summary["bytes"],
        left_out=summary["left_out"],
        empty=summary["samples"] == 0,
    )


def _columns(index: Dataset) -> pa.Schema:
    ids = index.completed_ids()
    if not ids:
        return pa.schema([pa.field("caption", pa.string())])
    internal = {f.name for f in INTERNAL} | {"key"}
    schema = pq.read_schema(index.parquet_path(ids[0]))
    return pa.schema([f for f in schema if f.name not in internal])
