"""The download stage: URL list -> dataset directory, through img2dataset.

How a download runs (all state under ``OUT/.lenscap/``, so a rerun of the same command resumes):

1. The output is owned like every command's (``runner.owned_output``): one lock, interrupted commits
   finished, and ``claim.json`` recording the URL list and the options that shape the output; a
   rerun with others is refused, naming what differs, unless ``--overwrite``.
2. The URL list is streamed into one small parquet file per shard (``input/``), written once.
3. img2dataset downloads into ``img2dataset/`` (a staging directory), in a subprocess whose output
   goes to ``img2dataset.log``. Its own per-shard ``_stats.json`` lets it skip finished shards.
4. As each staged shard finishes, lenscap *adopts* it: every input row is accounted for (img2dataset
   can lose a sample when a worker hits an unexpected error; such a row gets a status), rows are
   sorted by key, and the shard is committed into ``OUT`` through ``Dataset.commit``.

``retry_failed`` is the second pass img2dataset lacks: the failed downloads of completed shards are
fetched again and the successes merged into those shards, atomically.

A remote ``OUT`` (an fsspec URL) keeps ``.lenscap/`` in its local mirror, as every remote output does.
Each adopted shard is committed into the mirror, then uploaded (``Dataset.upload_shard``: tar,
parquet, ``_stats.json`` last) and its local copy removed; the remote stats files say what is done.
On Ray, img2dataset's tasks may run on other machines, so its staging directory is remote too,
``OUT/.lenscap/img2dataset/``, and a staged tar reaches its final name by a copy inside the store.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lenscap.core import mirror
from lenscap.core.claim import CLAIM_FILE
from lenscap.core.commits import atomic_write_json
from lenscap.core.dataset import Dataset, read_parquet
from lenscap.core.errors import DatasetError, InputError, UsageError, disk_full
from lenscap.core.image_source import add_sample
from lenscap.core.job import owned_output
from lenscap.core.layout import IMAGE_OFFSET, IMAGE_SIZE, WORK_DIR_NAME, adopt_old_work_dir, parquet_name, shard_name, stats_name
from lenscap.core.manifest import shard_stats
from lenscap.core.progress import Progress, accepts, make_progress, start_progress
from lenscap.core.result import JobResult
from lenscap.core.storage import redact_url
from lenscap.core.tario import TarOut, archive_end
from lenscap.download.img2dataset_process import Img2datasetProcess
from lenscap.download.inputs import InputSpec, read_url_tables, resolve_input_files, rows_to_table
from lenscap.download.netguard import REFUSED

__all__ = ["DownloadOptions", "download", "retry_failed", "RESIZE_MODES"]

# lenscap's name -> img2dataset's. "keep_ratio" bounds the LONGEST side (img2dataset's
# keep_ratio_largest): text-to-image data keeps whole images; img2dataset's keep_ratio bounds the shortest.
RESIZE_MODES = {
    "no": "no",
    "keep_ratio": "keep_ratio_largest",
    "keep_ratio_smallest": "keep_ratio",
    "center_crop": "center_crop",
    "border": "border",
}
LOST_SAMPLE_MESSAGE = "no result recorded by img2dataset for this sample (lost in its worker); retry with --retry-failed"
# Failures that a second attempt cannot fix: the server said no, or the URL is not fetchable.
_PERMANENT_ERRORS = ("disallowed by X-Robots-Tag", "unsupported URL scheme", "empty URL")


@dataclass
class DownloadOptions:
    url_col: str | None = None
    caption_col: str | None = None
    extra_cols: list[str] = field(default_factory=list)
    samples_per_shard: int = 10_000
    processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    threads: int = 32
    image_size: int = 1024
    resize_mode: str = "keep_ratio"
    upscale: bool = False
    min_image_size: int = 0
    max_aspect_ratio: float = math.inf
    max_pixels: int = 178_956_970
    timeout: int = 10
    retries: int = 2
    user_agent_token: str | None = "lenscap"
    respect_opt_out: bool = True
    encode_quality: int = 95
    # A Ray cluster's GCS address: img2dataset then runs one Ray task per shard there (its "ray"
    # distributor) instead of --processes local processes. Where the work runs shapes nothing.
    ray_address: str | None = None
    # Fetch from loopback, private, link-local and other non-global addresses too (lenscap.download.netguard).
    allow_private_network: bool = False

    def validate(self) -> None:
        checks = [
            (self.samples_per_shard >= 1, f"--samples-per-shard must be at least 1, not {self.samples_per_shard}"),
            (self.processes >= 1, f"--processes must be at least 1, not {self.processes}"),
            (self.threads >= 1, f"--threads must be at least 1, not {self.threads}"),
            (self.image_size >= 1, f"--image-size must be at least 1, not {self.image_size}"),
            (
                self.resize_mode in RESIZE_MODES,
                f"--resize-mode must be one of {', '.join(RESIZE_MODES)}, not {self.resize_mode!r}",
            ),
            (self.min_image_size >= 0, f"--min-side must not be negative, not {self.min_image_size}"),
            (self.max_aspect_ratio >= 1, f"--max-aspect must be at least 1, not {self.max_aspect_ratio}"),
            (self.max_pixels >= 1, f"--max-pixels must be at least 1, not {self.max_pixels}"),
            (self.timeout >= 1, f"--timeout must be at least 1 second, not {self.timeout}"),
            (self.retries >= 0, f"--max-retries must not be negative, not {self.retries}"),
            (0 <= self.encode_quality <= 100, f"--encode-quality must be between 0 and 100, not {self.encode_quality}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def output_shaping(self) -> dict[str, Any]:
        """The options a rerun must repeat for its shards to match the earlier ones."""
        d = asdict(self)
        # Like --timeout, the network rule decides which fetches succeed, not what a success is: a rerun
        # may change it, and --retry-failed fetches what it refused before.
        for how_fast in ("processes", "threads", "retries", "timeout", "ray_address", "allow_private_network"):
            d.pop(how_fast)
        d["max_aspect_ratio"] = None if math.isinf(self.max_aspect_ratio) else self.max_aspect_ratio
        return d

    def img2dataset_kwargs(self, url_dir: Path, staging: Path | str) -> dict[str, Any]:
        return {
            "url_list": str(url_dir),
            "input_format": "parquet",
            "url_col": "url",
            "caption_col": "caption",
            "save_additional_columns": list(self.extra_cols) or None,
            "output_folder": str(staging),
            "output_format": "webdataset",
            "number_sample_per_shard": self.samples_per_shard,
            "processes_count": self.processes,
            "thread_count": self.threads,
            "image_size": self.image_size,
            "resize_mode": RESIZE_MODES[self.resize_mode],
            "resize_only_if_bigger": not self.upscale,
            "min_image_size": self.min_image_size,
            "max_aspect_ratio": self.max_aspect_ratio if not math.isinf(self.max_aspect_ratio) else float("inf"),
            "max_image_area": float(self.max_pixels),
            "timeout": self.timeout,
            "retries": self.retries,
            "user_agent_token": self.user_agent_token,
            "disallowed_header_directives": None if self.respect_opt_out else [],
            "encode_quality": self.encode_quality,
            "enable_wandb": False,
            "incremental_mode": "incremental",
            "compute_hash": "sha256",
            "oom_shard_count": 5,
            "distributor": "ray" if self.ray_address else "multiprocessing",
        }


def sample_key(shard_id: int, index: int, samples_per_shard: int) -> str:
    """img2dataset's key: shard id and index within the shard, zero-padded, dot-free."""
    oom_sample = math.ceil(math.log10(samples_per_shard)) if samples_per_shard > 1 else 0
    return f"{shard_id * 10**oom_sample + index:0{oom_sample + 5}d}"


class _Job:
    """The on-disk state of one download directory (a remote one's, in its local mirror)."""

    def __init__(self, out: Dataset, ray: bool = False) -> None:
        self.out = out
        self.dst = out.mirror()  # where shards are committed: the output itself, or a remote one's mirror
        self.work = out.work_dir
        self.input_dir = self.work / "input"
        self.log_file = self.work / "img2dataset.log"
        # img2dataset's Ray tasks may run on any node: with a remote output they stage under it, where
        # every node can write (a local output on a cluster needs a shared filesystem, as every stage does).
        self.ray = ray and out.remote
        self.staging = self.staging_dir("img2dataset")

    def staging_dir(self, name: str) -> Path | str:
        """Where img2dataset writes: ``.lenscap/NAME`` locally, or ``OUT/.lenscap/NAME`` for a remote
        output on Ray. That URL carries no credentials: img2dataset's processes, wherever they run,
        reach the store through its own configuration (environment, config files)."""
        if self.ray:
            return f"{self.out.fs.unstrip_protocol(self.out.root)}/{WORK_DIR_NAME}/{name}"
        return self.work / name

    def remove_staging(self, name: str) -> None:
        """Remove ``.lenscap/NAME`` (what img2dataset staged there is in the output, or is stale). A
        remote output's is looked for remotely too, whichever executor this run has: an earlier run's may be there."""
        shutil.rmtree(self.work / name, ignore_errors=True)
        if self.out.remote:
            remote = self.out.file(f"{WORK_DIR_NAME}/{name}")
            if self.out.fs.exists(remote):
                self.out.fs.rm(remote, recursive=True)

    def input_ready(self) -> dict[str, Any] | None:
        marker = self.input_dir / "_done.json"
        return json.loads(marker.read_text()) if marker.exists() else None


@contextmanager
def _owned_download(
    out_dir: str | os.PathLike[str], source: str | None, options: DownloadOptions, overwrite: bool
) -> Iterator[tuple[_Job, DownloadOptions]]:
    """The download directory ``out_dir``, owned (``runner.owned_output``: checked, locked, recovered,
    claimed for this URL list and these options), and the options that shape it: with no ``source``
    (resuming, --retry-failed) the recorded ones."""
    out = Dataset(out_dir)
    recorded = _recorded_claim(out)
    if out.remote and recorded is None and not overwrite and any(n != WORK_DIR_NAME for n in out.names()):
        if (out.read_manifest() or {}).get("stage") == "download":
            raise DatasetError(
                f"{out.location} holds a download whose job state is not on this machine (it would be in "
                f"{out.path}); rerun where it started, or copy that machine's mirror there"
            )
    if recorded is None or overwrite:
        if source is None:
            raise DatasetError(f"{out.location} holds no download to resume; give the URL list too")
        resolve_input_files(source)  # a missing input fails before anything is created
    if source is None:
        assert recorded is not None
        options = DownloadOptions(**{**asdict(options), **recorded["settings"]})
        if options.max_aspect_ratio is None:
            options.max_aspect_ratio = math.inf
    label = None if source is None else "-" if source == "-" else redact_url(source)
    with owned_output(out, "download", options.output_shaping(), source_label=label, overwrite=overwrite) as out:
        job = _Job(out, ray=options.ray_address is not None)
        if recorded is None or overwrite:
            for name in ("img2dataset", "retry"):
                job.remove_staging(name)  # a Ray run's staging, left by an earlier output of this name
        for shard_id in set(job.dst.completed_ids()) - set(out.completed_ids()):
            out.upload_shard(shard_id)  # committed in a remote output's mirror before a kill, its upload unfinished
        yield job, options


def _recorded_claim(out: Dataset) -> dict[str, Any] | None:
    """The claim of an earlier download into ``out`` (its mirror, if remote); one that lenscap before 0.3
    recorded as ``.lenscap/job.json`` becomes a claim."""
    adopt_old_work_dir(out.path)
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
        return None  # a mirror whose remote output is gone is stale
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
            job, InputSpec(source, options.url_col, options.caption_col, options.extra_cols), options.samples_per_shard
        )
    except BaseException:
        # Nothing of a URL list that could not be read whole is kept: the claim then holds nothing, and
        # the corrected command (another --url-col, say) takes the directory over.
        shutil.rmtree(job.input_dir, ignore_errors=True)
        raise


def _split_input(job: _Job, spec: InputSpec, samples_per_shard: int) -> dict[str, Any]:
    """Stream the URL list into one parquet file per shard; the marker is written last."""
    if spec.source == "-" and sys.stdin.isatty():
        raise UsageError("'-' reads URLs from standard input, but standard input is a terminal")
    shutil.rmtree(job.input_dir, ignore_errors=True)
    job.input_dir.mkdir(parents=True)
    pending: list[pa.Table] = []
    pending_rows = shards = samples = 0
    for table in read_url_tables(spec):
        pending.append(table)
        pending_rows += table.num_rows
        samples += table.num_rows
        if pending_rows >= samples_per_shard:
            merged = _concat(pending)
            while merged.num_rows >= samples_per_shard:
                pq.write_table(merged.slice(0, samples_per_shard), job.input_dir / f"{shard_name(shards)}.parquet")
                shards += 1
                merged = merged.slice(samples_per_shard)
            pending, pending_rows = [merged], merged.num_rows
    if pending_rows:
        pq.write_table(_concat(pending), job.input_dir / f"{shard_name(shards)}.parquet")
        shards += 1
    ready = {"shards": shards, "samples": samples}
    atomic_write_json(job.input_dir / "_done.json", ready)
    return ready


def _concat(tables: list[pa.Table]) -> pa.Table:
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(f"the input files disagree on a column's type ({e}); make the column the same type everywhere") from None


def _adopt(job: _Job, shard_id: int, samples_per_shard: int) -> dict[str, Any]:
    """Move one finished img2dataset shard into the output (a remote one's mirror), every input row accounted for."""
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
    url = table.column("url")
    # Written without Python scalars: converting one imports pandas, 0.3 s of CPU for nothing.
    url_empty = pc.or_kleene(pc.is_null(url), pc.invert(pc.cast(pc.utf8_length(pc.utf8_trim_whitespace(url)), pa.bool_())))
    # urllib's Request() rejects an empty URL itself, with "unknown url type: ''", before lenscap's
    # opener can name it; rare, so fixed here row by row.
    if pc.any(url_empty).as_py():
        rows = table.to_pylist()
        for row, empty in zip(rows, url_empty.to_pylist()):
            if empty and row["status"] != "success":
                row["error_message"] = "empty URL"
        table = pa.Table.from_pylist(rows, schema=table.schema)
    # Keys share one width: text order is numeric order. Where each image lies in the tar, for every later reader.
    table = staged.with_image_locations(shard_id, table.sort_by("key"))
    dst = job.dst
    tmp = dst.tmp_path(shard_id, "parquet")
    pq.write_table(table, tmp)
    stats = shard_stats(shard_id, table) | {"lost_by_img2dataset": lost}
    renames = [(tmp, dst.parquet_path(shard_id))]
    if staged.remote:
        # Staged remotely (Ray): the tar is copied inside the store, never through this machine. Before
        # the commit, so a shard committed in the mirror has its tar in place and needs only its upload.
        staged.fs.copy(staged.file(f"{name}.tar"), job.out.file(f"{name}.tar"))
        stats["files"] = {f"{name}.tar": int(staged.fs.size(staged.file(f"{name}.tar")))}
    else:
        renames.insert(0, (staged.tar_path(shard_id), dst.tar_path(shard_id)))
    stats = dst.commit(shard_id, renames, stats)
    if not staged.remote:
        staged.parquet_path(shard_id).unlink(missing_ok=True)
    return stats


def _adopt_into(job: _Job, shard_id: int, samples_per_shard: int) -> dict[str, Any]:
    """Adopt a finished staged shard: committed into the output's mirror (unless that was done before
    a kill), then put where it belongs (``Dataset.upload_shard``; nothing to do for a local output)."""
    if not job.dst.is_complete(shard_id):
        _adopt(job, shard_id, samples_per_shard)
    stats = job.out.upload_shard(shard_id)
    _unstage(job.staging, shard_id)
    return stats


def _unstage(staging: Path | str, shard_id: int) -> None:
    """Remove a remote staging's copy of an uploaded shard; its ``_stats.json`` stays, so that
    img2dataset skips the shard (a local staging's tar was moved, its parquet removed, by the commit)."""
    staged = Dataset(staging)
    if staged.remote:
        name = shard_name(shard_id)
        staged.fs.rm([staged.file(f"{name}.tar"), staged.file(f"{name}.parquet")])


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
    options: DownloadOptions, url_dir: Path, staging: Path | str, progress_dir: Path | None = None
) -> dict[str, Any]:
    """img2dataset's arguments and the hooks' (``_img2dataset_hooks.main`` takes theirs out):
    ``progress_dir``, where its workers count the samples they write (``_LiveSamples``)."""
    if isinstance(staging, Path):  # img2dataset makes a remote one itself
        staging.mkdir(parents=True, exist_ok=True)
    return options.img2dataset_kwargs(url_dir, staging) | {
        "max_pixels": options.max_pixels,
        "ray_address": options.ray_address,
        "allow_private_network": options.allow_private_network,
        "progress_dir": None if progress_dir is None else str(progress_dir),
    }


def download(
    source: str | None,
    out_dir: str | os.PathLike[str],
    options: DownloadOptions | None = None,
    progress: Progress | None = None,
    img2dataset: Img2datasetProcess | None = None,
    *,
    overwrite: bool = False,
) -> JobResult:
    """Download ``source`` (a URL list, or None to resume) into the dataset directory ``out_dir``.

    ``img2dataset``: a process started earlier, so that its imports overlap this work (the CLI
    starts one before its own imports); it is used if there is work to do and ended in any case.
    """
    try:
        options = options or DownloadOptions()
        options.validate()
        with _owned_download(out_dir, source, options, overwrite) as (job, options):
            return _download(job, source, options, progress, img2dataset)
    except OSError as e:
        raise disk_full(e) or e from None  # a full disk: exit 1 with what to do, not an internal error
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
                before[1] += int(stats.get("count", 0)) - int(stats.get("successes", 0))
            else:
                live.shard_done(shard_id, stats)

    already = _finish(job, options, total, {})  # a manifest from the start: `inspect` works mid-download
    _forget_unadoptable(job.staging, done)
    before = [already.samples, already.samples - already.status.get("success", 0)]
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
            _img2dataset_config(options, job.input_dir, job.staging, live.directory),
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
        failed = count - int(stats.get("successes", 0))
        self._advance(1, count - shown_n, failed - shown_f)
        if self.directory is not None:
            for outcome in ("ok", "failed"):
                (self.directory / f"{shard_id}.{outcome}").unlink(missing_ok=True)


def _poll_s(staging: Path | str) -> float:
    """How often to look for finished shards: a remote staging is listed once a second, not ten times."""
    return 0.1 if isinstance(staging, Path) else 1.0


def _finish(job: _Job, options: DownloadOptions, total: int, failed: dict[int, str]) -> JobResult:
    """Write the manifest from the shards present and summarise them."""
    claim = json.loads((job.work / CLAIM_FILE).read_text())
    params = {
        **options.output_shaping(),
        "processes": options.processes,
        "threads": options.threads,
        "timeout": options.timeout,
        "retries": options.retries,
    }
    manifest = job.out.write_manifest("download", params, (claim.get("input") or {}).get("location"), expected_shards=total)
    return JobResult.from_manifest(job.out.location, manifest, failed)


def _retryable(row: dict[str, Any], allow_private_network: bool) -> bool:
    """A failed download worth asking again: not one the server or the URL rules out, nor an address the
    network rule refused (unless this run allows it)."""
    if row.get("status") != "failed_to_download":
        return False
    message = row.get("error_message") or ""
    if REFUSED in message and not allow_private_network:
        return False
    return not any(p in message for p in _PERMANENT_ERRORS)


def retry_failed(
    out_dir: str | os.PathLike[str], options: DownloadOptions | None = None, progress: Progress | None = None
) -> JobResult:
    """Fetch again the failed downloads of completed shards; merge the successes into those shards."""
    options = options or DownloadOptions()
    options.validate()
    try:
        with _owned_download(out_dir, None, options, False) as (job, options):
            return _retry_failed(job, options, progress)
    except OSError as e:
        raise disk_full(e) or e from None


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
                    **{c: row.get(c) for c in options.extra_cols},
                    "lenscap_key": row["key"],
                }
                for row in out.read_table(shard_id).to_pylist()
                if _retryable(row, options.allow_private_network)
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
        retry_options = DownloadOptions(**{**asdict(options), "extra_cols": [*options.extra_cols, "lenscap_key"]})
        live.reset()

        def on_poll() -> None:
            merge_finished()
            live.poll(merged)

        Img2datasetProcess().run(
            _img2dataset_config(retry_options, url_dir, staging, live.directory),
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
    offsets that datasets made from this one recorded stay true. The new tar and parquet are written
    under temporary names and committed together. A remote shard is read from a local copy and
    rewritten into the mirror, then replaced remotely: its stats file goes first, so that it is never
    complete with a mix of old and new files; a kill before the new one is up leaves the rewritten
    shard in the mirror, which the next run uploads.
    """
    out, staged = job.out, Dataset(staging)
    successes = {r["lenscap_key"]: r for r in staged.read_table(retry_id).to_pylist() if r["status"] == "success"}
    if not successes or not out.is_complete(shard_id):
        return
    retry_key_to_key = {r["key"]: key for key, r in successes.items()}
    images: dict[str, bytes] = {}
    with staged.open_tar(retry_id) as f, tarfile.open(fileobj=f) as tar:
        for member in tar:
            retry_key, _, ext = member.name.partition(".")
            if ext == "jpg" and retry_key in retry_key_to_key:
                images[retry_key_to_key[retry_key]] = tar.extractfile(member).read()  # type: ignore[union-attr]
    dst = job.dst
    with mirror.staged(out, shard_id) as src:  # the output itself when local
        table = src.read_table(shard_id)
        rows = table.to_pylist()
        retried = [
            i for i, row in enumerate(rows) if row["key"] in successes and row["status"] != "success" and row["key"] in images
        ]
        if not retried:
            return
        tar_tmp, parquet_tmp = dst.tmp_path(shard_id, "tar"), dst.tmp_path(shard_id, "parquet")
        shutil.copyfile(src.tar_path(shard_id), tar_tmp)
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
        stats = shard_stats(shard_id, merged) | {"retried": src.read_stats(shard_id).get("retried", 0) + len(retried)}
        dst.commit(shard_id, [(tar_tmp, dst.tar_path(shard_id)), (parquet_tmp, dst.parquet_path(shard_id))], stats)
    mirror.replace_shard(out, shard_id)
