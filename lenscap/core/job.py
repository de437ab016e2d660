"""The one job driver: every command's run goes through a ``Job``.

A ``Job`` owns what every command does the same way: its output (opened, locked, recovered, claimed
for one input and one set of settings: ``output`` and ``stage_output``), the executor loop (``map``:
the only place that hands tasks to an executor, reports the items that failed and raises a failure
that concerns the whole run), progress, the manifest, and the one result type with its exit-code
policy (``lenscap.core.result``). A command is a list of passes on it:

- per shard: a ``Stage`` over the input shards its output lacks (``run_shards``): filter, caption,
  audit's --out, dedup's signatures and its output, export's index, a library user's own stage;
- global: the command's own code between passes (dedup's search, export's plan), which may ``map``
  tasks of its own (dedup's tables, export's output shards, a batch job's preparing and reading);
- download drives img2dataset in a subprocess of its own, on an output owned the same way.

A shard that raises is reported and left incomplete; the others are kept, and a rerun does only the
missing shards, on any executor. A ``LenscapError`` from a task (the budget ran out, the backend
rejected the job) concerns the whole run: no further task starts, running ones finish, the manifest is
written, and the error is raised.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from lenscap.core.claim import claim_output, input_shards, open_output
from lenscap.core.dataset import Dataset
from lenscap.core.errors import disk_full
from lenscap.core.executors import Executor, LocalExecutor, Task
from lenscap.core.layout import shard_name
from lenscap.core.lock import output_lock
from lenscap.core.progress import Progress, log, make_progress, start_progress
from lenscap.core.result import JobResult
from lenscap.core.stage import Stage

__all__ = ["Job", "StageRun", "ShardTask", "run_stage"]

Location = str | os.PathLike[str] | Dataset


class ShardTask:
    """A stage from one dataset directory into another, as an executor's task: an item is a shard."""

    def __init__(self, stage: Stage, src: Location, dst: Location) -> None:
        self.stage = stage
        self.src = src if isinstance(src, Dataset) else Dataset(src)
        self.dst = dst if isinstance(dst, Dataset) else Dataset(dst)

    def setup(self) -> None:
        self.stage.setup()

    def run(self, shard_id: int) -> dict[str, Any]:
        dst = self.dst
        # Done by a task whose worker died before reporting, or committed half, then killed: finished,
        # never written again.
        if not (dst.is_complete(shard_id) or dst.recover_shard(shard_id)):
            try:
                return self.stage.run_shard(self.src, dst, shard_id)
            except OSError as e:
                # A full disk concerns the whole run, not this shard: stop it (LenscapError), keep what is done.
                raise disk_full(e) or e from None
        return dst.read_stats(shard_id)


class _LiveCounters:
    """Polls the samples / USD counters that workers tick, and shows them on the progress."""

    def __init__(self, progress: Progress, interval_s: float = 0.5) -> None:
        self.values = multiprocessing.get_context("spawn").Array("d", 2)
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
class StageRun:
    """A stage's job on an output it owns: its input, its output (locked, recovered, claimed), the input
    shards to do, those left out (incomplete, with --allow-incomplete), and where the images live."""

    stage: Stage
    src: Dataset
    dst: Dataset
    shards: list[int]
    missing: list[int]
    images: dict[str, Any] | None
    history: list[dict[str, Any]] = field(default_factory=list)

    def write_manifest(self) -> dict[str, Any]:
        return self.dst.write_manifest(
            self.stage.name,
            self.stage.parameters(),
            self.src.location,
            expected_shards=len(self.shards),
            history=self.history,
            images=self.images,
            input_incomplete=self.missing,
            extra=self.stage.manifest_entries(),
        )


@dataclass
class Job:
    """One command's run on ``executor``; ``quiet``: no progress on stderr."""

    command: str
    executor: Executor
    quiet: bool = True

    def progress(self, label: str, unit: str = "shards") -> Progress:
        return make_progress(label, self.quiet, unit)

    # -- the executor loop --------------------------------------------------------------------------

    def map(
        self,
        task: Task,
        items: list[int],
        on_done: Callable[[int, dict[str, Any]], None] | None = None,
        *,
        keep_workers: bool = False,
    ) -> dict[int, str]:
        """Run ``task`` for every item on the executor: ``on_done(item, result)`` as each finishes; returns
        the items that failed (item: why). A failure of the whole run (``LenscapError``) is raised once
        the tasks already running have finished. ``keep_workers``: the same task runs again soon (a
        batch job prepares shards a few at a time), so its workers stay set up."""
        failed: dict[int, str] = {}
        fatal = self.executor.run(task, items, on_done or (lambda item, result: None), failed, keep_workers=keep_workers)
        if fatal is not None:
            raise fatal
        return failed

    def close(self) -> None:
        """Let go of workers kept for later ``map`` calls."""
        self.executor.close()

    # -- owning an output ---------------------------------------------------------------------------

    @contextmanager
    def output(
        self,
        out: Location,
        settings: dict[str, Any],
        *,
        src: Dataset | None = None,
        source_label: str | None = None,
        overwrite: bool = False,
        input_ids: list[int] | None = None,
    ) -> Iterator[Dataset]:
        """The one way a command gets its output: opened and checked (``open_output``), locked (one lock,
        in its work directory), its interrupted commits finished, claimed for this input and these
        settings (``claim_output``), and its damaged shards made incomplete. ``src``: the input dataset;
        ``source_label``: an input that is not one (download's URL list)."""
        dst = open_output(out, src, self.command)
        with output_lock(dst):
            dst.recover()
            claim_output(dst, src, self.command, settings, overwrite=overwrite, input_ids=input_ids, source_label=source_label)
            _reopen_damaged(dst, self.command)
            yield dst

    @contextmanager
    def stage_output(
        self, stage: Stage, in_dir: Location, out_dir: Location, *, overwrite: bool = False, allow_incomplete: bool = False
    ) -> Iterator[StageRun]:
        """A stage's run from ``in_dir`` into ``out_dir`` (``output``)."""
        src = Dataset.open(in_dir)
        shards, missing = input_shards(src, allow_incomplete)
        stage.check_input(src, shards)
        stage.check()
        with self.output(out_dir, stage.settings(), src=src, overwrite=overwrite, input_ids=shards) as dst:
            yield _stage_run(stage, src, dst, shards, missing)

    @contextmanager
    def internal_output(self, stage: Stage, in_dir: Location, out_dir: Location) -> Iterator[StageRun]:
        """A pass writing into a command's private directory (dedup's signatures, export's index), which
        the command owns already: locked and recovered, not claimed; the input's incomplete shards left out."""
        src = Dataset.open(in_dir)
        shards, missing = input_shards(src, True)
        stage.check_input(src, shards)
        stage.check()
        dst = Dataset.create(out_dir)
        with output_lock(dst):
            dst.recover()
            _reopen_damaged(dst, stage.name)
            yield _stage_run(stage, src, dst, shards, missing)

    # -- a per-shard pass ---------------------------------------------------------------------------

    def run_shards(self, run: StageRun, progress: Progress | None = None) -> JobResult:
        """Run a stage over the input shards its output lacks; the output's manifest, written at the start
        (so it can be inspected while the stage runs) and at the end, whatever happened."""
        stage, src, dst = run.stage, run.src, run.dst
        stage.begin(src, dst)
        done = set(dst.completed_ids())
        todo = [i for i in run.shards if i not in done]
        run.write_manifest()
        progress = progress or self.progress(stage.name)
        _start_progress(progress, src, len(run.shards), len(run.shards) - len(todo))
        live = not self.executor.distributed  # workers on other machines cannot tick a counter in this one
        counters = _LiveCounters(progress) if live else None

        def on_done(shard_id: int, stats: dict[str, Any]) -> None:
            progress.advance(shards=1, samples=0 if live else int(stats.get("count", 0)))

        failed: dict[int, str] = {}
        try:
            if todo:
                stage.use_executor(self.executor)
            stage._counters = counters.values if counters is not None else None
            with counters if counters is not None else nullcontext():
                failed = self.map(ShardTask(stage, src, dst), todo, on_done)
        finally:
            stage._counters = None
            progress.finish()
            for shard_id, message in failed.items():
                progress.note(f"{stage.name}: shard {shard_name(shard_id)} failed: {message}")
            manifest = run.write_manifest()
        return JobResult.from_manifest(stage.name, dst.location, manifest, failed)


def _stage_run(stage: Stage, src: Dataset, dst: Dataset, shards: list[int], missing: list[int]) -> StageRun:
    images = None if stage.holds_images else src.images_ref(dst)  # a missing or replaced image source: refused here
    return StageRun(stage, src, dst, shards, missing, images, (src.read_manifest() or {}).get("history", []))


def _reopen_damaged(dst: Dataset, command: str) -> list[int]:
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


def _start_progress(progress: Progress, src: Dataset, total: int, done: int) -> None:
    """``progress.start``, with the input's sample count where its manifest has one (lenscap's progress
    then shows samples of a total, and an ETA from the samples left); the samples of the shards done
    before are estimated from their share, as reading every shard's stats could take long."""
    samples = ((src.read_manifest() or {}).get("counts") or {}).get("samples")
    if isinstance(samples, int) and samples > 0 and total:
        start_progress(progress, total, done, total_samples=samples, done_samples=round(samples * done / total))
    else:
        progress.start(total, done)


def run_stage(
    stage: Stage,
    in_dir: Location,
    out_dir: Location,
    processes: int = 1,
    progress: Progress | None = None,
    executor: Executor | None = None,
    *,
    overwrite: bool = False,
    allow_incomplete: bool = False,
    internal: bool = False,
) -> JobResult:
    """Run ``stage`` from ``in_dir`` into ``out_dir`` on ``executor`` (default: ``processes`` local worker
    processes): a one-pass job. ``in_dir`` / ``out_dir``: local paths, fsspec URLs, or ``Dataset``
    objects (with storage options). ``internal``: into a command's private directory (``internal_output``)."""
    job = Job(stage.name, executor or LocalExecutor(processes))
    if internal:
        with job.internal_output(stage, in_dir, out_dir) as run:
            return job.run_shards(run, progress)
    with job.stage_output(stage, in_dir, out_dir, overwrite=overwrite, allow_incomplete=allow_incomplete) as run:
        return job.run_shards(run, progress)
