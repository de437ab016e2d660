"""``lenscap caption`` as a job: the backend built from the options, then the stage over every shard, or
the batch job for a batch backend. Nothing already paid for is asked again on a rerun."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

from lenscap.caption.backends import backend_class
from lenscap.caption.backends.base import ERROR, SKIPPED, CaptionBackend, image_own_error
from lenscap.caption.batch import run_batch_caption
from lenscap.caption.cache import default_cache_dir
from lenscap.caption.options import CaptionOptions
from lenscap.caption.prompts import load_prompt
from lenscap.caption.stage import CaptionStage
from lenscap.core.dataset import Dataset
from lenscap.core.errors import BudgetReached, UsageError
from lenscap.core.executors import Executor, executor_for
from lenscap.core.job import run_stage
from lenscap.core.progress import make_progress, say
from lenscap.core.registry import OptionRenamed
from lenscap.core.result import ErrorShare, JobResult

__all__ = ["run_caption", "build_backend"]


def build_backend(name: str, values: dict[str, object]) -> CaptionBackend:
    """The backend ``name`` with its option ``values``; an option given by its old name says so."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", OptionRenamed)
        backend = backend_class(name).from_options(values)
    for w in said:
        if issubclass(w.category, OptionRenamed):
            say(f"note: {w.message}")
    return backend


def run_caption(
    in_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: CaptionOptions,
    *,
    quiet: bool = True,
    executor: Executor | None = None,
    backend: CaptionBackend | None = None,
) -> JobResult:
    """Caption ``in_dir`` into ``out_dir``. ``backend``: one built already (``lenscap.api.backend``),
    instead of the one the options name."""
    prompt = load_prompt(options.prompt)  # a missing prompt file fails before the backend is built
    captioner = backend or build_backend(options.backend, options.backend_values())
    processes = options.workers_for(captioner.runs_as_batch)
    if captioner.runs_as_batch and options.redo is not None:
        raise UsageError(f"--redo is for the request-by-request backends; {captioner.name} runs as batch jobs")
    if captioner.runs_as_batch and options.retry_errors:
        raise UsageError(
            "--retry-errors is for the request-by-request backends; a batch job asks its failed requests "
            "again itself, in new rounds (--max-retries)"
        )
    priced = not captioner.priced or captioner.has_price()
    if not priced:
        if options.max_cost is not None:
            raise UsageError(f"--max-cost needs a price for model {captioner.model!r}: give one with --prices FILE")
        say(f"note: no price known for model {captioner.model!r}; cost columns stay empty (see --prices)")
    executor = executor or executor_for(options, processes)
    captioner.set_processes(processes)
    cache = None if options.no_cache else Path(options.cache) if options.cache is not None else default_cache_dir()
    stage = CaptionStage(captioner, prompt, cache, options.max_cost, hints=options.hint_names, redo=options.redo)
    stage.copy_images = options.copy_images
    stage.retry_errors = options.retry_errors
    if options.redo is not None:
        stage.check_redo(Dataset.open(in_dir))  # a bad expression or an uncaptioned input fails here, before any request
    progress = make_progress("caption", quiet)
    try:
        if captioner.runs_as_batch:
            result = run_batch_caption(
                stage,
                in_dir,
                out_dir,
                progress,
                executor=executor,
                overwrite=options.overwrite,
                allow_incomplete=options.allow_incomplete,
            )
        else:
            result = run_stage(
                stage,
                in_dir,
                out_dir,
                progress=progress,
                executor=executor,
                overwrite=options.overwrite,
                allow_incomplete=options.allow_incomplete,
            )
    except BudgetReached as e:
        e.spent_usd = stage.budget.spent if stage.budget else 0.0
        e.summary = {
            "command": "caption",
            "out_dir": os.fspath(out_dir),
            "spent_usd": e.spent_usd,
            "exit_code": e.exit_code,
            "reason": str(e),
        }
        raise
    spent = stage.budget.spent if stage.budget else 0.0
    result.details = {
        **({"backend": captioner.name} if captioner.runs_as_batch else {}),
        **result.details,
        "spent_usd": spent,
        "caption_status": result.counts.get("caption_status", {}),
    }
    result.errors = _error_share(Dataset(out_dir), result, options.max_error_share)
    if not captioner.runs_as_batch:
        result.details["cost_known"] = priced  # a model without a known price has spent something unknown, not $0
    elif not result.complete:
        result.advice = _batch_advice(captioner, Dataset(out_dir).work_dir / "batch")
    return result


def _error_share(out: Dataset, result: JobResult, max_share: float) -> ErrorShare | None:
    """The captions left in error after every retry, against ``--max-error-share`` (none while a batch job
    is still running). An image's own error (undecodable, refused as an image) is not counted: the
    messages are read from the rows of the shards whose stats count errors, and of no other."""
    if not result.complete:
        return None
    outcomes = result.counts.get("caption_status", {})
    of = sum(n for status, n in outcomes.items() if status != SKIPPED)
    messages: Counter[str] = Counter()
    if outcomes.get(ERROR):
        ids = out.completed_ids()
        with_errors = [
            shard_id
            for shard_id, stats in zip(ids, out.read_all_stats(ids), strict=True)
            if stats.get("stage_status", {}).get("caption_status", {}).get(ERROR)
        ]
        for shard_id in with_errors:
            table = out.read_table(shard_id, columns=["caption_status", "caption_error"])
            statuses, errors = table.column(0).to_pylist(), table.column(1).to_pylist()
            messages.update(e or "" for s, e in zip(statuses, errors, strict=True) if s == ERROR)
    counted = Counter({m: n for m, n in messages.items() if not image_own_error(m)})
    commonest = counted.most_common(1)[0][0][:200] if counted else ""
    return ErrorShare(counted.total(), of, max_share, commonest, "rerun with --retry-errors to ask them again")


def _batch_advice(captioner: CaptionBackend, root: Path) -> list[str]:
    """What to do with a batch job that is not finished: run the batch files (batch-files), or rerun."""
    commands = getattr(captioner.transport(root), "commands", None)  # type: ignore[attr-defined]
    if commands is not None:
        return ["run these, then rerun this command to merge the results:", *(f"  {c}" for c in commands(captioner.model))]
    return ["not finished: rerun this command (or from cron, or with --wait) to collect"]
