"""Runs a per-shard stage over every shard of a dataset that the output does not have yet.

Each shard is one task of an executor (``lenscap.executors``): this process, spawned worker
processes, or a Ray cluster. A shard that raises is reported and left incomplete; the others are
kept, and a rerun does only the missing shards, on any executor. A ``LenscapError`` from a shard
(the budget ran out, the backend rejected the job) concerns the whole run: no further shard
starts, running ones finish, and the error is raised.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from lenscap.dataset import Dataset, shard_name
from lenscap.executors import Executor, LocalExecutor
from lenscap.lock import output_lock
from lenscap.progress import Progress, make_progress
from lenscap.stages.base import Stage

__all__ = ["StageResult", "ShardJob", "run_stage"]


@dataclass
class StageResult:
    out_dir: str
    shards_total: int
    shards_completed: int
    samples: int
    status: dict[str, int]
    failed_shards: dict[int, str] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if self.shards_completed == self.shards_total else 1


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
        if not dst.remote:
            # A task run again after its worker died may find the shard finished, or its commit half done.
            if dst.recover_shard(shard_id) or dst.is_complete(shard_id):
                return dst.read_stats(shard_id)
            return self._run_shard(dst, shard_id)
        if dst.is_complete(shard_id):
            return dst.read_stats(shard_id)
        local = dst.mirror()
        # Written here before, and killed before its upload finished: upload it, never write it again.
        if not (local.recover_shard(shard_id) or local.is_complete(shard_id)):
            self._run_shard(local, shard_id)
        return dst.upload_shard(shard_id)

    def _run_shard(self, dst: Dataset, shard_id: int) -> dict[str, Any]:
        return self.stage.run_shard(self.src, dst, shard_id)


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


def run_stage(
    stage: Stage,
    in_dir: str | os.PathLike[str] | Dataset,
    out_dir: str | os.PathLike[str] | Dataset,
    processes: int = 1,
    progress: Progress | None = None,
    executor: Executor | None = None,
) -> StageResult:
    """Run ``stage`` on ``executor`` (default: ``processes`` local worker processes).

    ``in_dir`` / ``out_dir``: local paths, fsspec URLs, or ``Dataset`` objects (with storage options).
    """
    src = Dataset.open(in_dir)
    stage.check()
    dst = Dataset.create(out_dir)  # a remote output's lock and work directory are in its local mirror
    with output_lock(dst.path):
        return _run_locked(stage, src, dst, executor or LocalExecutor(processes), progress)


def _run_locked(stage: Stage, src: Dataset, dst: Dataset, executor: Executor, progress: Progress | None) -> StageResult:
    dst.recover()
    images = None if stage.holds_images else src.images_ref(dst)  # a missing or replaced image source: refused here
    stage.begin(src, dst)
    shards = src.completed_ids()
    done = set(dst.completed_ids())
    todo = [i for i in shards if i not in done]
    history = (src.read_manifest() or {}).get("history", [])

    def write_manifest() -> dict[str, Any]:
        return dst.write_manifest(stage.name, stage.parameters(), src.location, expected_shards=len(shards),
                                  history=history, images=images)

    write_manifest()  # from the start, so the output can be inspected while the stage runs
    progress = progress or make_progress(stage.name)
    progress.start(len(shards), len(shards) - len(todo))
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
    counts = manifest["counts"]
    return StageResult(dst.location, len(shards), manifest["shards"]["completed"], counts["samples"],
                       counts["status"], failed, counts)
