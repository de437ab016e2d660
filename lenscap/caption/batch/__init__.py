"""Captioning as a batch job (``--backend openai-batch``, ``anthropic-batch`` or ``batch-files``), from 100 requests to 800M.

Everything lives under ``OUT/.lenscap/batch/``:

    state.sqlite         the job's state, one transaction per step (``state.py``)
    prepared/NNNNNN.*    a source shard's request lines, built once (``prepare.py``), until cut
    inputs/NAME.*        a batch file's lines and ids, from cutting (``cut.py``) until merged
    outputs/NAME.*       its output and error files, from the API until merged (``merge.py``)
    retry/NAME.*         requests of a merged batch that got no answer, until packed again

so the disk holds the files in flight, not the job. ``job.py`` drives it, one pass at a time; any
rerun (the same command, or a cron job) carries on from where the last run stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lenscap.caption.backends import backend_class
from lenscap.caption.backends.openai_batch import TERMINAL, BatchOptions
from lenscap.caption.batch.job import BatchJob, open_state
from lenscap.caption.batch.state import IN_QUEUE, BatchState
from lenscap.caption.stage import CaptionStage
from lenscap.core.dataset import Dataset
from lenscap.core.errors import BudgetReached, UsageError
from lenscap.core.executors import Executor, LocalExecutor
from lenscap.core.job import Job, StageRun
from lenscap.core.progress import Progress
from lenscap.core.result import JobResult
from lenscap.core.storage import require_local

__all__ = ["BatchOptions", "run_batch_caption", "batch_status", "cancel_batches"]


def run_batch_caption(
    stage: CaptionStage,
    in_dir: str | Path,
    out_dir: str | Path,
    progress: Progress,
    *,
    executor: Executor | None = None,
    overwrite: bool = False,
    allow_incomplete: bool = False,
) -> JobResult:
    options: BatchOptions = stage.backend.batch  # type: ignore[attr-defined]
    _local((in_dir, "the input of a batch caption job"), (out_dir, "the output of a batch caption job"))
    job = Job("caption", executor or LocalExecutor(1))
    with job.stage_output(stage, in_dir, out_dir, overwrite=overwrite, allow_incomplete=allow_incomplete) as run:
        return _run_batches(job, run, options, progress)


def _run_batches(driver: Job, owned: StageRun, options: BatchOptions, progress: Progress) -> JobResult:
    stage, src, dst = owned.stage, owned.src, owned.dst
    assert isinstance(stage, CaptionStage)
    stage.begin(src, dst)
    stage.setup()
    job = BatchJob(stage, src, dst, options, progress, driver)
    try:
        progress.start(job.shards_total, job.shards_total - len(job.open))
        job.recover()
        owned.write_manifest()
        while True:
            state = job.step()
            progress.status(job.describe())
            if state in ("done", "budget") or not options.wait:
                break
            time.sleep(options.poll_interval_s)
        files = job.state.by_state()
    finally:
        progress.finish()
        job.close()
    manifest = owned.write_manifest()
    if state == "budget":
        raise BudgetReached(
            f"--max-cost ${job.budget.max_usd:g} reached (${job.budget.spent:.4f} spent or reserved by this "
            "output directory); finished shards are kept: rerun with a higher --max-cost to go on"
        )
    complete = state == "done" and not job.failed
    # Batches still running are not a failure: the next run (or --wait) collects them.
    details = {"complete": complete, "files": files, "spent_usd": job.budget.spent}
    return JobResult.from_manifest("caption", dst.location, manifest, job.failed, complete=complete, details=details)


def _local(*locations: tuple[str | Path, str]) -> None:
    """A batch job's directories are local: its state file is a SQLite database beside its output."""
    for location, what in locations:
        require_local(location, what)


def batch_status(out_dir: str | Path) -> dict[str, Any]:
    """What the batch job in ``out_dir`` has done and when it should end, from its state (no network)."""
    _local((out_dir, "batch status's directory"))
    dst = Dataset.open(out_dir)
    root = dst.work_dir / "batch"
    if not (root / "state.sqlite").exists() and not (root / "files").is_dir():
        raise UsageError(f"{dst.location} holds no batch job (run lenscap caption --backend openai-batch first)")
    state = open_state(root)
    try:
        db = state.db
        job = state.get("job") or {}
        totals = db.execute("""SELECT coalesce(sum(requests), 0), count(*), coalesce(sum(answered), 0),
                               coalesce(sum(spent), 0) FROM files WHERE requests > 0""").fetchone()
        prepared = db.execute(
            "SELECT count(*), coalesce(sum(requests), 0), coalesce(sum(answered), 0), coalesce(sum(committed), 0) FROM shards"
        ).fetchone()
        # Requests that got no answer: asked again in the next round, or, in the last, failed.
        last = int(state.get("max_rounds", 0))
        failed, again = db.execute(
            """SELECT coalesce(sum(CASE WHEN round >= ? THEN unanswered END), 0),
                                      coalesce(sum(CASE WHEN round < ? THEN unanswered END), 0)
                                      FROM files WHERE state = 'merged'""",
            (last, last),
        ).fetchone()
        flying = state.files(*IN_QUEUE)
        manifest = dst.read_manifest() or {}
        expected = (manifest.get("shards") or {}).get("expected")
        completed = len(dst.completed_ids())
        rate = _answers_per_hour(state)
        # Requests still to answer: packed ones without their final answer, and the shards not packed yet at
        # the mean of those packed.
        unprepared = max(0, (expected or 0) - completed - (prepared[0] - prepared[3]))
        mean = prepared[1] / prepared[0] if prepared[0] else 0.0
        left = max(0, prepared[1] - prepared[2]) + round(unprepared * mean)
        eta = left / rate if rate else None
        return {
            "out_dir": dst.location,
            "job_id": state.get("job_id"),
            "backend": job.get("backend"),
            "model": job.get("model"),
            "shards": {"completed": completed, "expected": expected, "prepared": prepared[0]},
            "files": state.by_state(),
            "requests": int(totals[0]),
            "rounds": int(db.execute("SELECT coalesce(max(round) + 1, 0) FROM files WHERE requests > 0").fetchone()[0]),
            "answered": int(prepared[2]),
            "failed": int(failed),
            "asked_again": int(again),
            "left": left,
            "queue": {
                "tokens": state.queued_tokens(),
                "limit": min((v for v in (state.get("limit_given"), state.get("learned_limit")) if v), default=None),
                "learned_limit": state.get("learned_limit"),
            },
            "spent_usd": round(float(totals[3]), 4),
            "answers_per_hour": round(rate, 1),
            "eta_hours": round(eta, 2) if eta is not None else None,
            "batches": [
                {k: r.get(k) for k in ("name", "round", "state", "status", "requests", "batch_id", "counts")} for r in flying
            ],
        }
    finally:
        state.close()


def _answers_per_hour(state: BatchState) -> float:
    """Requests answered an hour, over the last day's merged batches (or since the first submission)."""
    now = time.time()
    first = state.db.execute("SELECT min(submitted_at) FROM files").fetchone()[0]
    if first is None:
        return 0.0
    since = max(first, now - 86400)
    answered = state.db.execute(
        "SELECT coalesce(sum(answered), 0) FROM files WHERE state = 'merged' AND finished_at >= ?", (since,)
    ).fetchone()[0]
    hours = (now - since) / 3600
    return float(answered) / hours if hours > 0 else 0.0


def cancel_batches(out_dir: str | Path) -> list[str]:
    """Cancel every batch of the job in ``out_dir`` still running (through the backend and account the
    job recorded); their finished answers are merged on the next run."""
    _local((out_dir, "batch cancel's directory"))
    dst = Dataset.open(out_dir)
    root = dst.work_dir / "batch"
    if not (root / "state.sqlite").exists():
        raise UsageError(f"{out_dir} holds no batch job")
    state = open_state(root)
    try:
        job = state.get("job")
        running = [r for r in state.files("submitted") if r.get("status") not in TERMINAL]
    finally:
        state.close()
    cls = backend_class(job["backend"])
    settings: dict[str, Any] = {"model": job["model"]}
    if {o.name for o in cls.options} >= {"base_url", "api_key_env"}:
        settings |= {"base_url": [job["base_url"]] if job.get("base_url") else [], "api_key_env": job["key_variable"]}
    transport = cls.from_options(settings).transport(root)  # type: ignore[attr-defined]
    for r in running:
        transport.cancel(r["batch_id"])
    return [r["batch_id"] for r in running]
