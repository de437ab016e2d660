"""The download stage: URL list -> dataset directory, through img2dataset.

How a download runs (all state under ``OUT/.lenscap/``, so a rerun of the same command resumes):

1. The output is owned like every command's (``Job.output``): one lock, interrupted commits
   finished, and ``claim.json`` recording the URL list and the options that shape the output; a
   rerun with others is refused, naming what differs, unless ``--overwrite``.
2. The URL list is planned so that hosts interleave (``download.plan``: every host spread evenly over
   the job) and cut into one small parquet file per shard (``input/``), written once: a rerun resumes
   the same plan. Keys follow the plan; each input row keeps its row of the list (``lenscap_row``).
3. img2dataset downloads into ``img2dataset/`` (a staging directory), in a subprocess whose output
   goes to ``img2dataset.log``. Its own per-shard ``_stats.json`` lets it skip finished shards.
4. As each staged shard finishes, lenscap *adopts* it: every input row is accounted for (img2dataset
   can lose a sample when a worker hits an unexpected error; such a row gets a status), rows are
   sorted by key, and the shard is committed into ``OUT`` through ``Dataset.commit``.

``retry_failed`` is the second pass img2dataset lacks: the failed downloads of completed shards are
fetched again and the successes merged into those shards, atomically.

A remote ``OUT`` (an fsspec URL) keeps ``.lenscap/`` on this machine, as every remote output does
(``Dataset.work_dir``), and each adopted shard is committed the same way: uploaded, ``_stats.json``
last. On Ray, img2dataset's tasks may run on other machines, so its staging directory is in the
store too, ``OUT/.lenscap/img2dataset/``, and a staged tar reaches its final name by a move inside it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
import shutil
import sys
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lenscap.core.claim import CLAIM_FILE
from lenscap.core.commits import Source, atomic_write_json
from lenscap.core.dataset import Dataset, read_parquet
from lenscap.core.errors import DatasetError, InputError, UsageError, disk_full
from lenscap.core.executors import LocalExecutor, RayExecutor, executor_for
from lenscap.core.image_source import add_sample
from lenscap.core.job import Job
from lenscap.core.layout import IMAGE_OFFSET, IMAGE_SIZE, WORK_DIR_NAME, parquet_name, shard_name, stats_name, tar_name
from lenscap.core.manifest import shard_stats
from lenscap.core.progress import Progress, accepts, make_progress, start_progress
from lenscap.core.result import JobResult
from lenscap.core.storage import redact_url
from lenscap.core.tario import TarOut, archive_end
from lenscap.download.card import write_download_card
from lenscap.download.host_policy import reset_state
from lenscap.download.img2dataset_process import Img2datasetProcess
from lenscap.download.inputs import NOT_UTF8, InputSpec, read_url_tables, resolve_input_files, rows_to_table
from lenscap.download.options import DownloadOptions
from lenscap.download.outcome import error_share, rerun_hint, retryable
from lenscap.download.plan import planned, spill

__all__ = ["run_download", "download", "retry_failed", "replayed", "sample_key"]

LOST_SAMPLE_MESSAGE = "no result recorded by img2dataset for this sample (lost in its worker); retry with --retry-failed"
NOT_UTF8_MESSAGE = "not valid UTF-8: this row of the URL list (its url shows the bytes escaped); save the list as UTF-8"
FETCH_FILE = "fetch.json"  # the fetch options of the last run (``DownloadOptions.fetch_settings``), in the work directory
# A URL that a list repeats is fetched once: the input's columns that say which rows repeat which.
DUPLICATE_OF, DUPLICATE_URL = "lenscap_duplicate_of", "lenscap_duplicate_url"
DUPLICATES_REMEMBERED = 2_000_000  # URLs whose repeats are found (their memory: a few hundred MB at most)


def sample_key(shard_id: int, index: int, samples_per_shard: int) -> str:
    """img2dataset's key: shard id and index within the shard, zero-padded, dot-free."""
    oom_sample = math.ceil(math.log10(samples_per_shard)) if samples_per_shard > 1 else 0
    return f"{shard_id * 10**oom_sample + index:0{oom_sample + 5}d}"


class _Job:
    """The on-disk state of one download directory, in its work directory."""

    def __init__(self, out: Dataset, processes: int = 1, cluster: str | None = None) -> None:
        self.out = out
        self.previous_fetch: dict[str, Any] | None = None  # the fetch options of the run before this one
        self.processes = processes  # img2dataset's worker processes
        self.cluster = cluster  # a Ray cluster's GCS address: img2dataset runs one Ray task per shard there
        self.work = out.work_dir
        self.input_dir = self.work / "input"
        self.log_file = self.work / "img2dataset.log"
        self.staging = self.staging_dir("img2dataset")

    def staging_dir(self, name: str) -> Path | str:
        """Where img2dataset writes: ``.lenscap/NAME`` in the work directory, or on Ray, whose tasks may run
        on any node, a directory every node can write (``Dataset.shared_dir``: a remote output's is in its
        store; a local output on a cluster needs a shared filesystem, as every stage does). That URL carries
        no credentials: img2dataset's processes, wherever they run, reach the store through its own
        configuration (environment, config files)."""
        return self.out.shared_dir(name) if self.cluster is not None else self.work / name

    def remove_staging(self, name: str) -> None:
        """Remove ``.lenscap/NAME`` (what img2dataset staged there is in the output, or is stale), wherever an
        earlier run of either executor staged it."""
        shutil.rmtree(self.work / name, ignore_errors=True)
        shared = Dataset(self.out.shared_dir(name), self.out.storage_options)
        if shared.fs.exists(shared.root):
            shared.fs.rm(shared.root, recursive=True)

    def input_ready(self) -> dict[str, Any] | None:
        marker = self.input_dir / "_done.json"
        return json.loads(marker.read_text()) if marker.exists() else None


def _recorded_fetch(out: Dataset) -> dict[str, Any] | None:
    """The fetch options of the last run into ``out`` (``FETCH_FILE``); None before any, or unreadable."""
    try:
        recorded = json.loads((out.work_dir / FETCH_FILE).read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def replayed(out_dir: str | os.PathLike[str], options: DownloadOptions, given: set[str] | None = None) -> DownloadOptions:
    """The options of ``--retry-failed`` alone on ``out_dir``: the last run's fetch options (the network
    rule, --timeout, --max-retries, ...) but for those ``given`` (None: those that differ from the defaults)."""
    recorded = _recorded_fetch(Dataset(out_dir))
    return options if recorded is None else options.with_recorded_fetch(recorded, given)


@contextmanager
def _owned_download(
    out_dir: str | os.PathLike[str],
    source: str | None,
    options: DownloadOptions,
    cluster: str | None,
    given: set[str] | None = None,
) -> Iterator[tuple[_Job, DownloadOptions]]:
    """The download directory ``out_dir``, owned (``Job.output``: checked, locked, recovered,
    claimed for this URL list and these options), and the options that shape it: with no ``source``
    (resuming, --retry-failed) the recorded ones, and the last run's fetch options but those ``given``."""
    overwrite = options.overwrite and source is not None
    out = Dataset(out_dir)
    recorded = _recorded_claim(out)
    if out.remote and recorded is None and not overwrite and any(n != WORK_DIR_NAME for n in out.names()):
        if (out.read_manifest() or {}).get("stage") == "download":
            raise DatasetError(
                f"{out.location} holds a download whose job state is not on this machine (it would be in "
                f"{out.work_dir}); rerun where it started, or copy that machine's work directory there"
            )
    if recorded is None or overwrite:
        if source is None:
            raise DatasetError(f"{out.location} holds no download to resume; give the URL list too")
        resolve_input_files(source)  # a missing input fails before anything is created
    previous = _recorded_fetch(out)
    if source is None:
        assert recorded is not None
        options = options.with_recorded(recorded["settings"])
        if previous is not None:
            options = options.with_recorded_fetch(previous, given)
    label = None if source is None else "-" if source == "-" else redact_url(source)
    owner = Job("download", LocalExecutor(1))  # img2dataset runs the work itself
    with owner.output(out, options.output_shaping(), source_label=label, overwrite=overwrite) as out:
        job = _Job(out, options.workers, cluster)
        job.previous_fetch = None if overwrite else previous
        if recorded is None or overwrite:
            for name in ("img2dataset", "retry"):
                job.remove_staging(name)  # a Ray run's staging, left by an earlier output of this name
        # This run's fetch options are recorded for the next once it has read its URL list: an output
        # whose list could not be read holds nothing, and the corrected command takes it over.
        try:
            yield job, options
        except BaseException:
            if job.input_ready() is not None:
                _record_fetch(job, options)
            raise
        _record_fetch(job, options)


def _record_fetch(job: _Job, options: DownloadOptions) -> None:
    """This run's fetch options, for the next run (``FETCH_FILE``)."""
    atomic_write_json(job.work / FETCH_FILE, options.fetch_settings())


def _written_here(out_dir: str | os.PathLike[str]) -> Path:
    """Where a download writes on this machine (img2dataset's staging, the journal): the work directory,
    on this machine's disk for a remote output too."""
    return Dataset(out_dir).work_dir


def _recorded_claim(out: Dataset) -> dict[str, Any] | None:
    """The claim of an earlier download into ``out`` (in its work directory); one that lenscap before 0.3
    recorded as ``.lenscap/job.json`` becomes a claim."""
    out.lock_file()  # lenscap before 0.2 kept it in _lenscap/: renamed
    old, claim = out.work_dir / "job.json", out.work_dir / CLAIM_FILE
    if old.exists() and not claim.exists():
        job = json.loads(old.read_text())
        atomic_write_json(claim, {"command": "download", "input": {"location": job.get("input")}, "settings": job["options"]})
        old.unlink()
    try:
        recorded = json.loads(claim.read_text()) if claim.exists() else None
    except (OSError, ValueError):
        return None  # said by claim_output, in its words
    if recorded is None or recorded.get("command") != "download" or not isinstance(recorded.get("settings"), dict):
        return None
    if out.remote and not any(n != WORK_DIR_NAME for n in out.names()):
        return None  # the work directory of a remote output that is gone is stale
    return recorded


def _split_once(job: _Job, source: str | None, options: DownloadOptions) -> dict[str, Any]:
    """The URL list, split into one parquet file per shard, once; returns its shard and sample counts."""
    ready = job.input_ready()
    if ready is not None:
        return ready
    if source is None:  # cannot happen unless .lenscap/input was deleted by hand
        raise DatasetError(
            f"{job.out.location}: the recorded URL list ({job.input_dir}) is missing; start again in a new directory"
        )
    try:
        return _split_input(
            job, InputSpec(source, options.url_col, options.caption_col, options.extra_columns), options.samples_per_shard
        )
    except BaseException:
        # Nothing of a URL list that could not be read whole is kept: the claim then holds nothing, and
        # the corrected command (another --url-col, say) takes the directory over.
        shutil.rmtree(job.input_dir, ignore_errors=True)
        raise


def _split_input(job: _Job, spec: InputSpec, samples_per_shard: int) -> dict[str, Any]:
    """Stream the URL list into spill files, plan its order (``download.plan``: every host spread over
    the whole job) and cut the plan into one parquet file per shard; the marker is written last."""
    if spec.source == "-" and sys.stdin.isatty():
        raise UsageError("'-' reads URLs from standard input, but standard input is a terminal")
    shutil.rmtree(job.input_dir, ignore_errors=True)
    job.input_dir.mkdir(parents=True)
    plan_dir = job.work / "plan"
    shutil.rmtree(plan_dir, ignore_errors=True)
    try:
        spilled = spill(read_url_tables(spec), plan_dir / "list", _concat)
        shards = _write_shards(job, planned(spilled, plan_dir), samples_per_shard)
    finally:
        shutil.rmtree(plan_dir, ignore_errors=True)
    ready = {"shards": shards, "samples": spilled.rows}
    atomic_write_json(job.input_dir / "_done.json", ready)
    return ready


def _write_shards(job: _Job, tables: Iterator[pa.Table], samples_per_shard: int) -> int:
    """Cut ``tables`` (the planned list) into input shards of ``samples_per_shard`` rows; their count."""
    pending: list[pa.Table] = []
    pending_rows = shards = 0
    seen: dict[str, str] = {}  # URL -> the key of its first row

    def write(table: pa.Table, shard_id: int) -> None:
        table = _duplicates_pointed(table, shard_id, samples_per_shard, seen)
        pq.write_table(table, job.input_dir / f"{shard_name(shard_id)}.parquet")

    for table in tables:
        pending.append(table)
        pending_rows += table.num_rows
        if pending_rows >= samples_per_shard:
            merged = _concat(pending)
            while merged.num_rows >= samples_per_shard:
                write(merged.slice(0, samples_per_shard), shards)
                shards += 1
                merged = merged.slice(samples_per_shard)
            pending, pending_rows = [merged], merged.num_rows
    if pending_rows:
        write(_concat(pending), shards)
        shards += 1
    return shards


def _duplicates_pointed(table: pa.Table, shard_id: int, samples_per_shard: int, seen: dict[str, str]) -> pa.Table:
    """Shard ``shard_id``'s rows, each URL seen before (``seen``: URL -> the key of its first row) fetched
    no more: its URL is emptied for img2dataset, and kept, with the first row's key, for ``_adopt``, which
    makes the row ``duplicate``. ``seen`` remembers up to ``DUPLICATES_REMEMBERED`` URLs."""
    first_of: list[str | None] = []
    for index, url in enumerate(table.column("url").to_pylist()):
        key = seen.get(url) if url else None
        if key is None and url and len(seen) < DUPLICATES_REMEMBERED:
            seen[url] = sample_key(shard_id, index, samples_per_shard)
        first_of.append(key)
    if not any(first_of):
        return table
    duplicate = pa.array([k is not None for k in first_of])
    url = table.column("url")
    table = table.set_column(table.column_names.index("url"), "url", pc.if_else(duplicate, "", url))
    return table.append_column(DUPLICATE_OF, pa.array(first_of, pa.string())).append_column(
        DUPLICATE_URL, pc.if_else(duplicate, url, pa.scalar(None, pa.string()))
    )


def _point_duplicates(table: pa.Table, input_parquet: Path, shard_id: int, samples_per_shard: int) -> pa.Table:
    """The staged rows of a shard with its duplicate URLs (``_duplicates_pointed``) given back, status
    ``duplicate`` and the message ``duplicate of KEY``: the row that holds the sample."""
    if DUPLICATE_OF not in pq.read_schema(input_parquet).names:
        return table
    source = pq.read_table(input_parquet, columns=[DUPLICATE_OF, DUPLICATE_URL]).to_pylist()
    pointed = {sample_key(shard_id, i, samples_per_shard): row for i, row in enumerate(source) if row[DUPLICATE_OF] is not None}
    rows = table.to_pylist()
    for row in rows:
        if (first := pointed.get(row["key"])) is not None:
            row.update(url=first[DUPLICATE_URL], status="duplicate", error_message=f"duplicate of {first[DUPLICATE_OF]}")
    return pa.Table.from_pylist(rows, schema=table.schema)


def _concat(tables: list[pa.Table]) -> pa.Table:
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(f"the input files disagree on a column's type ({e}); make the column the same type everywhere") from None


def _adopt(job: _Job, shard_id: int, samples_per_shard: int) -> dict[str, Any]:
    """Move one finished img2dataset shard into the output, every input row accounted for."""
    name = shard_name(shard_id)
    staged = Dataset(job.staging)
    input_parquet = job.input_dir / f"{name}.parquet"
    table = staged.read_table(shard_id)
    lost = pq.read_metadata(input_parquet).num_rows - table.num_rows
    if lost:
        present = set(table.column("key").to_pylist())
        missing = [
            {c: None for c in table.column_names}
            | row
            | {"key": key, "status": "failed_to_download", "error_message": LOST_SAMPLE_MESSAGE}
            for index, row in enumerate(read_parquet(input_parquet).to_pylist())
            if (key := sample_key(shard_id, index, samples_per_shard)) not in present
        ]
        table = pa.concat_tables([table, pa.Table.from_pylist(missing, schema=table.schema)])
    table = _point_duplicates(table, input_parquet, shard_id, samples_per_shard)
    url = table.column("url")
    # Written without Python scalars: converting one imports pandas, 0.3 s of CPU for nothing.
    url_empty = pc.or_kleene(pc.is_null(url), pc.invert(pc.cast(pc.utf8_length(pc.utf8_trim_whitespace(url)), pa.bool_())))
    not_utf8 = pc.fill_null(pc.starts_with(url, NOT_UTF8), False)
    # urllib's Request() rejects an empty URL itself, with "unknown url type: ''", before lenscap's
    # opener can name it; a row of the list that was not UTF-8 was refused for its scheme. Rare, so
    # fixed here row by row.
    if pc.any(pc.or_(url_empty, not_utf8)).as_py():
        rows = table.to_pylist()
        for row, empty, bad in zip(rows, url_empty.to_pylist(), not_utf8.to_pylist()):
            if row["status"] != "success" and (empty or bad):
                row["error_message"] = "empty URL" if empty else NOT_UTF8_MESSAGE
        table = pa.Table.from_pylist(rows, schema=table.schema)
    # Keys share one width: text order is numeric order. Where each image lies in the tar, for every later reader.
    table = staged.with_image_locations(shard_id, table.sort_by("key"))
    out = job.out
    tmp = out.staging_file(parquet_name(shard_id))
    pq.write_table(table, tmp)
    stats = shard_stats(shard_id, table) | {"lost_by_img2dataset": lost}
    # The staged tar is moved in: renamed locally, or, staged in the output's store (Ray), moved inside
    # it, never through this machine.
    tar = tar_name(shard_id)
    source: Source = Path(job.staging) / tar if isinstance(job.staging, Path) else posixpath.relpath(staged.file(tar), out.root)
    stats = out.commit(shard_id, {tar: source, parquet_name(shard_id): tmp}, stats)
    staged.remove(parquet_name(shard_id))  # its _stats.json stays, so that img2dataset skips the shard
    return stats


def _adopt_into(job: _Job, shard_id: int, samples_per_shard: int) -> dict[str, Any]:
    """Adopt a finished staged shard, unless that was done before a kill."""
    if job.out.is_complete(shard_id):
        return job.out.read_stats(shard_id)
    return _adopt(job, shard_id, samples_per_shard)


def _mark_staged(staging: Path | str, shard_ids: set[int]) -> None:
    """img2dataset skips a shard whose ``_stats.json`` is in its staging directory. Shards complete
    in the output that this staging does not know (an earlier run staged elsewhere: another executor,
    or a staging directory removed since) get one, so nothing done is downloaded again."""
    staged = Dataset(staging)
    staged.fs.makedirs(staged.root, exist_ok=True)
    for shard_id in sorted(shard_ids - _staged_done(staging)):
        staged.fs.pipe_file(staged.file(stats_name(shard_id)), b"{}")


def _forget_unadoptable(staging: Path | str, done: set[int]) -> None:
    """A shard img2dataset finished whose files are no longer staged (adopted, then found damaged in the
    output and reopened) loses its staged ``_stats.json`` too, so that img2dataset downloads it again."""
    staged = Dataset(staging)
    names = set(staged.names())
    for shard_id in sorted(_staged_done(staging) - done):
        if parquet_name(shard_id) not in names:
            staged.fs.rm_file(staged.file(stats_name(shard_id)))


def _staged_done(staging: Path | str) -> set[int]:
    """Shards img2dataset has finished in ``staging``: its layout is ours, ``_stats.json`` last."""
    return set(Dataset(staging).completed_ids())


def _img2dataset_config(
    job: _Job, options: DownloadOptions, url_dir: Path, staging: Path | str, progress_dir: Path | None = None
) -> dict[str, Any]:
    """img2dataset's arguments and the hooks' (``img2dataset_hooks.main`` takes theirs out):
    ``progress_dir``, where its workers count the samples they write (``_LiveSamples``)."""
    if isinstance(staging, Path):  # img2dataset makes a remote one itself
        staging.mkdir(parents=True, exist_ok=True)
    return options.img2dataset_kwargs(str(url_dir), str(staging), job.processes, job.cluster is not None) | {
        "max_pixels": options.max_pixels,
        "ray_address": job.cluster,
        "host_limits": options.host_policy(_host_state_dir(job)).to_dict(),
        "allow_private_network": options.allow_private_network,
        # robots.txt is kept in the work directory, for the job's processes and its reruns; img2dataset's
        # tasks on a Ray cluster share no disk with it, and each keeps its own.
        "politeness": options.politeness(None if job.cluster is not None else str(job.work / "robots")),
        "progress_dir": None if progress_dir is None else str(progress_dir),
    }


def _host_state_dir(job: _Job) -> str:
    """Where this run's per-host limiter keeps its state (``lenscap.download.host_limits``), new for each run: the work
    directory, or on Ray a directory of each node's own (every node its own table, with its share of the
    limits), named for this run."""
    if job.cluster is not None:
        return os.path.join(tempfile.gettempdir(), "lenscap-hosts", uuid.uuid4().hex)
    directory = job.work / "hosts"
    reset_state(directory)
    return str(directory)


def run_download(
    source: str | None,
    out_dir: str | os.PathLike[str],
    options: DownloadOptions,
    *,
    quiet: bool = True,
    img2dataset: Img2datasetProcess | None = None,
    given: set[str] | None = None,
) -> JobResult:
    """Download ``source`` (a URL list) into ``out_dir``; with ``--retry-failed``, then fetch the failed
    downloads of completed shards again (``source`` None: only that, with the last run's fetch options
    but for the fields ``given``; None: those that differ from the defaults). ``img2dataset``: a process
    started earlier, so that its imports overlap the caller's (the CLI starts one before its own imports)."""
    try:
        if source is None:
            options = replayed(out_dir, options, given)  # before the executor is chosen: it is one of them
        cluster = _cluster(options)
        result = None
        if source is not None:
            result = download(source, out_dir, options, make_progress("download", quiet), img2dataset, cluster=cluster)
        if options.retry_failed and (result is None or result.exit_code == 0):
            result = retry_failed(out_dir, options, make_progress("retry-failed", quiet), cluster=cluster, given=given)
    finally:
        if img2dataset is not None:
            img2dataset.stop()
    if result is None:
        raise UsageError("download needs a URL list, or retry_failed=True on an existing output")
    if result.exit_code == 0:  # finished: the card, so datasets.load_dataset(out_dir) reads the downloaded samples
        write_download_card(out_dir)
    return result


def _cluster(options: DownloadOptions) -> str | None:
    """With --executor ray, the GCS address img2dataset joins the cluster by (a Ray started here too)."""
    executor = executor_for(options)
    return executor.cluster_address() if isinstance(executor, RayExecutor) else None


def download(
    source: str | None,
    out_dir: str | os.PathLike[str],
    options: DownloadOptions,
    progress: Progress | None = None,
    img2dataset: Img2datasetProcess | None = None,
    *,
    cluster: str | None = None,
) -> JobResult:
    """Download ``source`` (a URL list, or None to resume) into the dataset directory ``out_dir``.

    ``img2dataset``: a process started earlier, used if there is work to do and ended in any case.
    """
    try:
        with _owned_download(out_dir, source, options, cluster) as (job, options):
            return _download(job, source, options, progress, img2dataset)
    except OSError as e:
        raise disk_full(e, within=_written_here(out_dir)) or e from None  # exit 1 with what to do, not an internal error
    finally:
        if img2dataset is not None:
            img2dataset.stop()


def _download(
    job: _Job, source: str | None, options: DownloadOptions, progress: Progress | None, img2dataset: Img2datasetProcess | None
) -> JobResult:
    split = _split_once(job, source, options)
    total = split["shards"]
    progress = progress or make_progress("download")
    done = set(job.out.completed_ids())
    earlier = sorted(done)  # done by earlier runs, with their fetch options
    live = _LiveSamples(job.work / "progress" if isinstance(job.staging, Path) else None, progress)

    def adopt_finished(before: list[int] | None = None) -> None:
        for shard_id in sorted(_staged_done(job.staging) - done):
            if shard_id >= total or job.out.is_complete(shard_id):
                done.add(shard_id)
                continue
            stats = _adopt_into(job, shard_id, options.samples_per_shard)
            done.add(shard_id)
            if before is not None:  # adopted before this run's work starts: counted as done already
                before[0] += int(stats.get("count", 0))
                before[1] += _failed_in(stats)
            else:
                live.shard_done(shard_id, stats)

    already = _finish(job, options, total, {})  # a manifest from the start: `inspect` works mid-download
    _forget_unadoptable(job.staging, done)
    before = [already.samples, already.samples - already.status.get("success", 0) - already.status.get("duplicate", 0)]
    adopt_finished(before)  # shards staged before a crash
    _start(progress, total, len(done), split.get("samples"), before)
    rc = 0
    if len(done) < total:
        _mark_staged(job.staging, done)
        live.reset()
        img2dataset = img2dataset or Img2datasetProcess()

        def on_poll() -> None:
            adopt_finished()
            live.poll(done)

        rc = img2dataset.run(
            _img2dataset_config(job, options, job.input_dir, job.staging, live.directory),
            job.log_file,
            on_poll,
            lambda: len(done) >= total,
            poll_s=_poll_s(job.staging),
        )
        live.reset()
    progress.finish()
    failed = sorted(set(range(total)) - set(job.out.completed_ids()))
    if failed:
        progress.note(
            f"download: {len(failed)} shard(s) did not complete (img2dataset exit code {rc}, log: {job.log_file}); rerun the same command to finish them"
        )
    else:
        job.remove_staging("img2dataset")  # everything adopted: the staging copies are no longer needed
    hint = rerun_hint(job.out, job.previous_fetch, options, earlier)
    if hint is not None:
        progress.note(f"download: {hint}")
    return _finish(job, options, total, {i: f"not downloaded (img2dataset exit code {rc})" for i in failed})


def _start(progress: Progress, total: int, done: int, total_samples: int | None, before: list[int]) -> None:
    start_progress(progress, total, done, total_samples=total_samples, done_samples=before[0], failed_samples=before[1])


class _LiveSamples:
    """The samples img2dataset has written so far in the shards it has not finished, shown as they come.

    Its workers' writer (``_img2dataset_hooks.CountingWriter``) appends one byte per sample to
    ``DIR/SHARD.ok`` or ``DIR/SHARD.failed``: a poll is a listing and a stat per shard in flight. When
    a shard is adopted its committed counts replace its live ones. With no directory (img2dataset's
    Ray tasks writing to a remote staging, on other machines) only finished shards are counted.
    """

    def __init__(self, directory: Path | None, progress: Progress) -> None:
        self.directory = directory
        self.progress = progress
        self.shown: dict[int, tuple[int, int]] = {}  # shard -> (samples, failed) shown so far
        self._failed_kw = accepts(progress.advance, "failed")

    def reset(self) -> None:
        """No counts of an earlier run (a shard it did not finish starts again from 0)."""
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.shown.clear()

    def _advance(self, shards: int, samples: int, failed: int) -> None:
        if self._failed_kw:
            self.progress.advance(shards=shards, samples=samples, failed=failed)  # type: ignore[call-arg]
        else:
            self.progress.advance(shards=shards, samples=samples)

    def poll(self, done: set[int]) -> None:
        samples = failed = 0
        counts: dict[int, list[int]] = {}
        try:
            entries = list(os.scandir(self.directory)) if self.directory is not None else []
        except OSError:
            entries = []
        for entry in entries:
            stem, _, outcome = entry.name.partition(".")
            if not stem.isdigit() or outcome not in ("ok", "failed") or int(stem) in done:
                continue
            try:
                size = entry.stat().st_size
            except OSError:
                continue
            c = counts.setdefault(int(stem), [0, 0])
            c[0] += size
            if outcome == "failed":
                c[1] += size
        for shard_id, (n, f) in counts.items():
            shown_n, shown_f = self.shown.get(shard_id, (0, 0))
            samples, failed = samples + n - shown_n, failed + f - shown_f
            self.shown[shard_id] = (n, f)
        self._advance(0, samples, failed)  # also when nothing moved: a log line every interval says it is alive

    def shard_done(self, shard_id: int, stats: dict[str, Any]) -> None:
        """Shard ``shard_id`` is committed with ``stats``: its final counts (lost samples included)."""
        shown_n, shown_f = self.shown.pop(shard_id, (0, 0))
        count = int(stats.get("count", 0))
        failed = _failed_in(stats)
        self._advance(1, count - shown_n, failed - shown_f)
        if self.directory is not None:
            for outcome in ("ok", "failed"):
                (self.directory / f"{shard_id}.{outcome}").unlink(missing_ok=True)


def _failed_in(stats: dict[str, Any]) -> int:
    """The failed samples of a shard by its stats: neither downloaded nor a repeat of a URL above (fetched once)."""
    repeats = int((stats.get("status") or {}).get("duplicate", 0))
    return int(stats.get("count", 0)) - int(stats.get("successes", 0)) - repeats


def _poll_s(staging: Path | str) -> float:
    """How often to look for finished shards: a remote staging is listed once a second, not ten times."""
    return 0.1 if isinstance(staging, Path) else 1.0


def _finish(job: _Job, options: DownloadOptions, total: int, failed: dict[int, str]) -> JobResult:
    """Write the manifest from the shards present and summarise them."""
    claim = json.loads((job.work / CLAIM_FILE).read_text())
    params = {
        **options.output_shaping(),
        "processes": job.processes,
        "threads": options.threads,
        "timeout": options.timeout,
        "retries": options.max_retries,
        "ignore_robots": options.ignore_robots,
        "user_agent": options.user_agent_header,
        "per_host_rps": options.per_host_rps,  # None: the defaults (host_policy), none for a private address
        "per_host_concurrency": options.per_host_concurrency,
    }
    manifest = job.out.write_manifest("download", params, (claim.get("input") or {}).get("location"), expected_shards=total)
    result = JobResult.from_manifest("download", job.out.location, manifest, failed)
    result.errors = error_share(job.out, result, options)
    return result


def retry_failed(
    out_dir: str | os.PathLike[str],
    options: DownloadOptions,
    progress: Progress | None = None,
    *,
    cluster: str | None = None,
    given: set[str] | None = None,
) -> JobResult:
    """Fetch again the failed downloads of completed shards, with the last run's fetch options but for
    those ``given`` (None: those that differ from the defaults); merge the successes into those shards."""
    try:
        with _owned_download(out_dir, None, options, cluster, given) as (job, options):
            return _retry_failed(job, options, progress)
    except OSError as e:
        raise disk_full(e, within=_written_here(out_dir)) or e from None


def _retry_failed(job: _Job, options: DownloadOptions, progress: Progress | None) -> JobResult:
    """Each shard with retryable failures becomes one small retry shard, merged back as soon as
    img2dataset finishes it: memory holds one shard, and a crash loses at most the merge in flight.
    """
    total = _split_once(job, None, options)["shards"]
    out = job.out
    url_dir, staging = job.work / "retry" / "input", job.staging_dir("retry/img2dataset")
    progress = progress or make_progress("retry-failed")
    if not (url_dir / "_done.json").exists():
        job.remove_staging("retry")
        url_dir.mkdir(parents=True)
        origin: list[int] = []  # retry shard -> the shard its rows came from
        for shard_id in out.completed_ids():
            rows = [
                {
                    "url": row["url"],
                    "caption": row.get("caption"),
                    **{c: row.get(c) for c in options.extra_columns},
                    "lenscap_key": row["key"],
                }
                for row in out.read_table(shard_id).to_pylist()
                if retryable(row, options.allow_private_network, options.ignore_robots)
            ]
            if rows:
                pq.write_table(rows_to_table(rows), url_dir / f"{shard_name(len(origin))}.parquet")
                origin.append(shard_id)
        atomic_write_json(url_dir / "_done.json", {"shards": len(origin), "origin": origin})
    origin = json.loads((url_dir / "_done.json").read_text())["origin"]
    merged: set[int] = set()
    live = _LiveSamples(job.work / "retry" / "progress" if isinstance(staging, Path) else None, progress)
    retry_rows = {rid: pq.read_metadata(url_dir / f"{shard_name(rid)}.parquet").num_rows for rid in range(len(origin))}

    def merge_finished(before: list[int] | None = None) -> None:
        for rid in sorted(_staged_done(staging) - merged):
            _merge_retry_shard(job, staging, rid, origin[rid])
            merged.add(rid)
            if before is not None:  # merged before this run's work starts
                before[0] += retry_rows[rid]
            else:  # img2dataset's own counts: a failure here is a sample that failed again
                live.shard_done(rid, {"count": retry_rows[rid]} | _retry_stats(staging, rid))

    before = [0, 0]
    merge_finished(before)  # retry shards finished before a crash
    _start(progress, len(origin), len(merged), sum(retry_rows.values()), before)
    if len(merged) < len(origin):
        retry_options = dataclasses.replace(options, extra_cols=",".join([*options.extra_columns, "lenscap_key"]))
        live.reset()

        def on_poll() -> None:
            merge_finished()
            live.poll(merged)

        Img2datasetProcess().run(
            _img2dataset_config(job, retry_options, url_dir, staging, live.directory),
            job.log_file,
            on_poll,
            lambda: len(merged) >= len(origin),
            poll_s=_poll_s(staging),
        )
        live.reset()
    progress.finish()
    if len(merged) < len(origin):
        progress.note(
            f"retry-failed: {len(origin) - len(merged)} of {len(origin)} retry shards did not finish; rerun to finish them"
        )
    else:
        job.remove_staging("retry")
    failed = sorted(set(range(total)) - set(out.completed_ids()))
    return _finish(job, options, total, {i: "not downloaded; rerun the download to finish it" for i in failed})


def _retry_stats(staging: Path | str, retry_id: int) -> dict[str, Any]:
    """The successes img2dataset counted in a retry shard (its ``_stats.json``), for the progress."""
    try:
        stats = Dataset(staging).read_stats(retry_id)
    except (OSError, DatasetError):
        return {}
    return {"successes": int(stats["successes"])} if isinstance(stats.get("successes"), int) else {}


def _merge_retry_shard(job: _Job, staging: Path | str, retry_id: int, shard_id: int) -> None:
    """Merge the successes of retry shard ``retry_id`` into shard ``shard_id``. Idempotent.

    The shard's tar keeps every byte it had: the new images are appended after its members, so the
    offsets that datasets made from this one recorded stay true. The new tar and parquet are staged and
    committed together (``Dataset.commit``: the shard's stats file goes first, so that it is never
    complete with a mix of old and new files, and a kill mid-way is rolled forward by the next run).
    """
    out, staged = job.out, Dataset(staging)
    successes = {r["lenscap_key"]: r for r in staged.read_table(retry_id).to_pylist() if r["status"] == "success"}
    if not successes or not out.is_complete(shard_id):
        return
    images = _retried_images(staged, retry_id, {r["key"]: key for key, r in successes.items()})
    table = out.read_table(shard_id)
    rows = table.to_pylist()
    retried = [i for i, row in enumerate(rows) if row["key"] in successes and row["status"] != "success" and row["key"] in images]
    if not retried:
        return
    tar_tmp, parquet_tmp = out.staging_file(tar_name(shard_id)), out.staging_file(parquet_name(shard_id))
    out.fs.get_file(out.file(tar_name(shard_id)), str(tar_tmp))
    with open(tar_tmp, "rb") as f:
        end = archive_end(f)
    tar_out = TarOut(tar_tmp, start=end)
    try:
        for i in retried:
            key = rows[i]["key"]
            row = {c: successes[key].get(c) for c in table.column_names} | {
                "key": key,
                "url": rows[i]["url"],
                "caption": rows[i].get("caption"),
            }
            row[IMAGE_OFFSET], row[IMAGE_SIZE] = add_sample(tar_out, key, images[key], row)
            rows[i] = row
    finally:
        tar_out.close()
    merged = pa.Table.from_pylist(rows, schema=table.schema)
    pq.write_table(merged, parquet_tmp)
    stats = shard_stats(shard_id, merged) | {"retried": out.read_stats(shard_id).get("retried", 0) + len(retried)}
    out.commit(shard_id, {tar_name(shard_id): tar_tmp, parquet_name(shard_id): parquet_tmp}, stats)


def _retried_images(staged: Dataset, retry_id: int, keys: dict[str, str]) -> dict[str, bytes]:
    """The images of retry shard ``retry_id``, by the key of the sample each is for (``keys``: retry key -> key)."""
    images: dict[str, bytes] = {}
    with staged.open_tar(retry_id) as f, tarfile.open(fileobj=f) as tar:
        for member in tar:
            retry_key, _, ext = member.name.partition(".")
            if ext == "jpg" and retry_key in keys:
                images[keys[retry_key]] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return images
