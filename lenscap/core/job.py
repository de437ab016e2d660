"""Runs a per-shard stage over every shard of a dataset that the output does not have yet.

Each shard is one task of an executor (``lenscap.core.executors``): this process, spawned worker
processes, or a Ray cluster. A shard that raises is reported and left incomplete; the others are
kept, and a rerun does only the missing shards, on any executor. A ``LenscapError`` from a shard
(the budget ran out, the backend rejected the job) concerns the whole run: no further shard
starts, running ones finish, and the error is raised.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from lenscap.core.claim import claim_output, input_shards, open_output
from lenscap.core.dataset import Dataset
from lenscap.core.errors import disk_full
from lenscap.core.executors import Executor, LocalExecutor
from lenscap.core.layout import shard_name
from lenscap.core.lock import output_lock
from lenscap.core.progress import Progress, log, make_progress, start_progress
from lenscap.core.result import JobResult
from lenscap.core.stage import Stage

__all__ = ["ShardJob", "OwnedJob", "owned_output", "owned_job", "reopen_damaged", "run_job", "run_stage"]


class ShardJob:
    """One stage from one dataset directory into another, as an executor's job: an item is a shard.

    A remote input shard is read where it is (its images by ranged reads); a remote output shard is
    written into the output's local mirror, then uploaded, its ``_stats.json`` last (``Dataset.upload_shard``).
    """

    def __init__(self, stage: Stage, src: str | Dataset, dst: str | Dataset) -> None:
        self.stage = stage
        self.src = src if isinstance(src, Dataset) else Dataset(src)
        self.dst = dst if isinstance(dst, Dataset) else Dataset(dst)

    def setup(self) -> None:
        self.stage.setup()

    def run(self, shard_id: int) -> dict[str, Any]:
        dst = self.dst
        if dst.is_complete(shard_id):  # a task run again after its worker died
            return dst.read_stats(shard_id)
        local = dst.mirror()  # itself, when local
        # Committed before (its commit half done, or its upload not done), then killed: finish it, never
        # write it again.
        if not (local.recover_shard(shard_id) or local.is_complete(shard_id)):
            self._run_shard(local, shard_id)
        return dst.upload_shard(shard_id)

    def _run_shard(self, dst: Dataset, shard_id: int) -> dict[str, Any]:
        try:
            return self.stage.run_shard(self.src, dst, shard_id)
        except OSError as e:
            # A full disk concerns the whole run, not this shard: stop it (LenscapError), keep what is done.
            raise disk_full(e) or e from None


class _LiveCounters:
    """Polls the samples / USD counters that workers tick, and shows them on the progress."""

    def __init__(self, ctx: Any, progress: Progress, interval_s: float = 0.5) -> None:
        self.values = ctx.Array("d", 2)
        self.progress = progress
        self.interval_s = interval_s
        self._shown = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lenscap-progress", daemon=True)

    def __enter__(self) -> _LiveCounters:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.show()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.show()

    def show(self) -> None:
        samples, cost = self.values[0], self.values[1]
        self.progress.advance(samples=int(samples - self._shown))
        self._shown = float(int(samples))
        if cost:
            self.progress.status(f"${cost:.4f} spent")


@dataclass
class OwnedJob:
    """A stage's job on an output it owns: its input, its output (locked, recovered, claimed), the
    input shards to do, those left out (incomplete, with --allow-incomplete), and where the images live."""

    stage: Stage
    src: Dataset
    dst: Dataset
    shards: list[int]
    missing: list[int]
    images: dict[str, Any] | None
    history: list[dict[str, Any]]

    def write_manifest(self) -> dict[str, Any]:
        return self.dst.write_manifest(
            self.stage.name,
            self.stage.parameters(),
            self.src.location,
            expected_shards=len(self.shards),
            history=self.history,
            images=self.images,
            input_incomplete=self.missing,
        )


@contextmanager
def owned_output(
    out_dir: str | os.PathLike[str] | Dataset,
    command: str,
    settings: dict[str, Any],
    *,
    src: Dataset | None = None,
    source_label: str | None = None,
    overwrite: bool = False,
    input_ids: list[int] | None = None,
) -> Iterator[Dataset]:
    """The one way a command gets its output: opened and checked (``open_output``), locked (one lock,
    ``.lenscap/lock``; a remote output's in its mirror), its interrupted commits finished, and claimed
    for this input and these settings (``claim_output``). ``src``: the input dataset; ``source_label``:
    an input that is not one (download's URL list)."""
    dst = open_output(out_dir, src, command)
    with output_lock(dst.path):
        dst.recover()
        claim_output(dst, src, command, settings, overwrite=overwrite, input_ids=input_ids, source_label=source_label)
        reopen_damaged(dst, command)
        yield dst


def reopen_damaged(dst: Dataset, command: str) -> list[int]:
    """Complete shards of ``dst`` whose files are not what was written (``Dataset.damaged_shards``) are
    made incomplete, and said so, so that this run writes them again instead of trusting them."""
    damaged = dst.damaged_shards()
    for shard_id, why in sorted(damaged.items()):
        log(
            f"{command}: shard {shard_name(shard_id)} of {dst.location} was damaged since it was written ({why}); "
            "writing it again"
        )
        dst.discard(shard_id)
    return sorted(damaged)


@contextmanager
def owned_job(
    stage: Stage,
    in_dir: str | os.PathLike[str] | Dataset,
    out_dir: str | os.PathLike[str] | Dataset,
    *,
    overwrite: bool = False,
    allow_incomplete: bool = False,
    internal: bool = False,
) -> Iterator[OwnedJob]:
    """A stage's job from ``in_dir`` into ``out_dir`` (``owned_output``). ``internal``: a pass writing
    into a command's private directory, which the command owns already: locked and recovered, not claimed."""
    src = Dataset.open(in_dir)
    shards, missing = input_shards(src, allow_incomplete or internal)
    stage.check()
    if internal:
        dst = Dataset.create(out_dir)
        with output_lock(dst.path):
            dst.recover()
            reopen_damaged(dst, stage.name)
            yield _stage_job(stage, src, dst, shards, missing)
        return
    with owned_output(out_dir, stage.name, stage.settings(), src=src, overwrite=overwrite, input_ids=shards) as dst:
        yield _stage_job(stage, src, dst, shards, missing)


def _stage_job(stage: Stage, src: Dataset, dst: Dataset, shards: list[int], missing: list[int]) -> OwnedJob:
    images = None if stage.holds_images else src.images_ref(dst)  # a missing or replaced image source: refused here
    return OwnedJob(stage, src, dst, shards, missing, images, (src.read_manifest() or {}).get("history", []))


def run_stage(
    stage: Stage,
    in_dir: str | os.PathLike[str] | Dataset,
    out_dir: str | os.PathLike[str] | Dataset,
    processes: int = 1,
    progress: Progress | None = None,
    executor: Executor | None = None,
    *,
    overwrite: bool = False,
    allow_incomplete: bool = False,
    internal: bool = False,
) -> JobResult:
    """Run ``stage`` on ``executor`` (default: ``processes`` local worker processes).

    ``in_dir`` / ``out_dir``: local paths, fsspec URLs, or ``Dataset`` objects (with storage options).
    """
    with owned_job(stage, in_dir, out_dir, overwrite=overwrite, allow_incomplete=allow_incomplete, internal=internal) as job:
        return run_job(job, executor or LocalExecutor(processes), progress)


def _start_progress(progress: Progress, src: Dataset, total: int, done: int) -> None:
    """``progress.start``, with the input's sample count where its manifest has one (lenscap's progress
    then shows samples of a total, and an ETA from the samples left); the samples of the shards done
    before are estimated from their share, as reading every shard's stats could take long."""
    samples = ((src.read_manifest() or {}).get("counts") or {}).get("samples")
    if isinstance(samples, int) and samples > 0 and total:
        start_progress(progress, total, done, total_samples=samples, done_samples=round(samples * done / total))
    else:
        progress.start(total, done)


def run_job(job: OwnedJob, executor: Executor, progress: Progress | None) -> JobResult:
    """Run a per-shard stage's job (from ``owned_job``) over the input shards its output lacks."""
    stage, src, dst, shards = job.stage, job.src, job.dst, job.shards
    stage.begin(src, dst)
    done = set(dst.completed_ids())
    todo = [i for i in shards if i not in done]
    write_manifest = job.write_manifest
    write_manifest()  # from the start, so the output can be inspected while the stage runs
    progress = progress or make_progress(stage.name)
    _start_progress(progress, src, len(shards), len(shards) - len(todo))
    failed: dict[int, str] = {}
    live = not executor.distributed  # workers on other machines cannot tick a counter in this one
    counters = _LiveCounters(multiprocessing.get_context("spawn"), progress) if live else None

    def on_done(shard_id: int, stats: dict[str, Any]) -> None:
        progress.advance(shards=1, samples=0 if live else int(stats.get("count", 0)))

    try:
        if todo:
            stage.use_executor(executor)
        stage._counters = counters.values if counters is not None else None
        with counters if counters is not None else nullcontext():
            fatal = executor.run(ShardJob(stage, src, dst), todo, on_done, failed)
    finally:
        stage._counters = None
        progress.finish()
    for shard_id, message in failed.items():
        progress.note(f"{stage.name}: shard {shard_name(shard_id)} failed: {message}")
    manifest = write_manifest()
    if fatal is not None:
        raise fatal
    return JobResult.from_manifest(dst.location, manifest, failed)
