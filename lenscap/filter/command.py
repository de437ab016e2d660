"""``lenscap filter`` as a job: the stage over every shard, or, with --dry-run, its verdicts counted."""

from __future__ import annotations

import os
from collections import Counter

from lenscap.core.dataset import Dataset
from lenscap.core.executors import Executor, executor_for
from lenscap.core.job import run_stage
from lenscap.core.progress import make_progress, say
from lenscap.core.result import EXIT_EMPTY, JobResult
from lenscap.filter.annotators.base import Annotator
from lenscap.filter.options import FilterOptions
from lenscap.filter.stage import FilterStage

__all__ = ["run_filter"]


def run_filter(
    in_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: FilterOptions,
    *,
    quiet: bool = True,
    executor: Executor | None = None,
    annotators: list[Annotator] | None = None,
) -> JobResult:
    stage = FilterStage.from_options(options, annotators)
    src = Dataset.open(in_dir)
    if options.dry_run:
        stage.check_input(src, src.completed_ids())  # as a run checks it (lenscap.core.job): before any work
        return _counted(src, stage)
    result = run_stage(
        stage,
        src,
        out_dir,
        progress=make_progress("filter", quiet),
        executor=executor or executor_for(options),
        overwrite=options.overwrite,
        allow_incomplete=options.allow_incomplete,
    )
    reasons: Counter[str] = Counter()
    out = Dataset(out_dir)
    for stats in out.read_all_stats(out.completed_ids()):
        reasons.update(stats.get("filter_reasons", {}))
    result.details = {"kept": reasons.get("kept", 0), "reasons": dict(reasons.most_common())}
    result.empty = result.kept == 0
    if result.exit_code == EXIT_EMPTY:
        dropped = ", ".join(f"{n} {r}" for r, n in result.reasons.items() if r != "kept") or "none"
        say(
            f"warning: {result.out_dir}: {result.samples} samples, 0 kept; dropped: {dropped}: nothing left (exit code {EXIT_EMPTY})"
        )
    return result


def _counted(src: Dataset, stage: FilterStage) -> JobResult:
    """--dry-run: what the stage would decide, counted per reason (kept, error, or a rule); writes nothing."""
    stage.setup()
    counts: Counter[str] = Counter()
    for shard_id in src.completed_ids():
        counts.update(stage.count_shard(src, shard_id))
    details = {"dry_run": True, "in_dir": src.location, "kept": counts.get("kept", 0), "reasons": dict(counts.most_common())}
    return JobResult("filter", None, samples=sum(counts.values()), details=details)
