"""Runs a per-shard stage over every shard of a dataset that the output does not have yet.

Workers are separate processes (``spawn``: no state inherited by accident, same on every OS). A
shard that raises is reported and left incomplete; the others are kept, and a rerun does only the
missing shards. A ``LenscapError`` from a shard (the budget ran out, the backend rejected the job)
concerns the whole run: no further shard starts, running ones finish, and the error is raised.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from lenscap.dataset import Dataset, shard_name
from lenscap.errors import LenscapError
from lenscap.lock import output_lock
from lenscap.progress import Progress, make_progress
from lenscap.stages.base import Stage

__all__ = ["StageResult", "run_stage"]


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


_worker_stage: Stage | None = None


def _init_worker(stage: Stage) -> None:
    global _worker_stage
    _worker_stage = stage
    stage.setup()


def _run_one(src: str, dst: str, shard_id: int) -> dict[str, Any]:
    assert _worker_stage is not None
    return _worker_stage.run_shard(Dataset(src), Dataset(dst), shard_id)


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
    in_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    processes: int = 1,
    progress: Progress | None = None,
) -> StageResult:
    src = Dataset.open(in_dir)
    stage.check()
    dst = Dataset.create(out_dir)
    with output_lock(dst.path):
        return _run_locked(stage, src, dst, processes, progress)


def _run_locked(stage: Stage, src: Dataset, dst: Dataset, processes: int, progress: Progress | None) -> StageResult:
    dst.recover()
    stage.begin(src, dst)
    shards = src.completed_ids()
    todo = [i for i in shards if not dst.is_complete(i)]
    history = (src.read_manifest() or {}).get("history", [])

    def write_manifest() -> dict[str, Any]:
        return dst.write_manifest(stage.name, stage.parameters(), str(src.path), expected_shards=len(shards),
                                  history=history)

    write_manifest()  # from the start, so the output can be inspected while the stage runs
    progress = progress or make_progress(stage.name)
    progress.start(len(shards), len(shards) - len(todo))
    failed: dict[int, str] = {}
    fatal: LenscapError | None = None
    ctx = multiprocessing.get_context("spawn")
    counters = _LiveCounters(ctx, progress)
    stage._counters = counters.values
    try:
        with counters:
            if todo and processes <= 1:
                stage.setup()
                for shard_id in todo:
                    try:
                        stage.run_shard(src, dst, shard_id)
                        progress.advance(shards=1)
                    except LenscapError as e:
                        fatal = e
                        break
                    except Exception as e:  # noqa: BLE001 - one shard's failure must not cost the others
                        failed[shard_id] = f"{type(e).__name__}: {e}"
            elif todo:
                fatal = _run_pool(stage, src, dst, todo, processes, ctx, progress, failed)
    finally:
        stage._counters = None
        progress.finish()
    for shard_id, message in failed.items():
        progress.note(f"{stage.name}: shard {shard_name(shard_id)} failed: {message}")
    manifest = write_manifest()
    if fatal is not None:
        raise fatal
    counts = manifest["counts"]
    return StageResult(str(dst.path), len(shards), manifest["shards"]["completed"], counts["samples"],
                       counts["status"], failed, counts)


def _run_pool(stage: Stage, src: Dataset, dst: Dataset, todo: list[int], processes: int, ctx: Any,
              progress: Progress, failed: dict[int, str]) -> LenscapError | None:
    fatal: LenscapError | None = None
    with ProcessPoolExecutor(processes, mp_context=ctx, initializer=_init_worker, initargs=(stage,)) as pool:
        futures: dict[Future[dict[str, Any]], int] = {pool.submit(_run_one, str(src.path), str(dst.path), i): i for i in todo}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                shard_id = futures[fut]
                if fut.cancelled():
                    continue
                try:
                    fut.result()
                    progress.advance(shards=1)
                except LenscapError as e:
                    if fatal is None:
                        fatal = e
                        for other in pending:
                            other.cancel()  # shards not started yet; running ones finish
                except Exception as e:  # noqa: BLE001
                    failed[shard_id] = f"{type(e).__name__}: {e}"
    return fatal
