"""Runs a per-shard stage over every shard of a dataset that the output does not have yet.

Workers are separate processes (``spawn``: no state inherited by accident, same on every OS). A
shard that raises is reported and left incomplete; the others are kept, and a rerun does only the
missing shards.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from lenscap.dataset import Dataset, shard_name
from lenscap.progress import Progress, make_progress
from lenscap.stages.base import ShardStage

__all__ = ["StageResult", "run_stage"]


@dataclass
class StageResult:
    out_dir: str
    shards_total: int
    shards_completed: int
    samples: int
    status: dict[str, int]
    failed_shards: dict[int, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if self.shards_completed == self.shards_total else 1


_worker_stage: ShardStage | None = None


def _init_worker(stage: ShardStage) -> None:
    global _worker_stage
    _worker_stage = stage
    stage.setup()


def _run_one(src: str, dst: str, shard_id: int) -> dict[str, Any]:
    assert _worker_stage is not None
    return _worker_stage.run_shard(Dataset(src), Dataset(dst), shard_id)


def run_stage(
    stage: ShardStage,
    in_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    processes: int = 1,
    progress: Progress | None = None,
) -> StageResult:
    src = Dataset.open(in_dir)
    dst = Dataset.create(out_dir)
    dst.recover()
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
    if todo and processes <= 1:
        stage.setup()
        for shard_id in todo:
            try:
                stats = stage.run_shard(src, dst, shard_id)
                progress.advance(shards=1, samples=stats["count"])
            except Exception as e:  # noqa: BLE001 - one shard's failure must not cost the others
                failed[shard_id] = f"{type(e).__name__}: {e}"
    elif todo:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(processes, mp_context=ctx, initializer=_init_worker, initargs=(stage,)) as pool:
            futures: dict[Future[dict[str, Any]], int] = {
                pool.submit(_run_one, str(src.path), str(dst.path), i): i for i in todo}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    shard_id = futures[fut]
                    try:
                        progress.advance(shards=1, samples=fut.result()["count"])
                    except Exception as e:  # noqa: BLE001
                        failed[shard_id] = f"{type(e).__name__}: {e}"
    progress.finish()
    for shard_id, message in failed.items():
        progress.note(f"{stage.name}: shard {shard_name(shard_id)} failed: {message}")
    manifest = write_manifest()
    return StageResult(str(dst.path), len(shards), manifest["shards"]["completed"], manifest["counts"]["samples"],
                       manifest["counts"]["status"], failed)
