"""lenscap as a library: one function per command, typed options in, a typed result out.

    import lenscap.api as lc

    lc.download("urls.csv", "data/raw", lc.DownloadOptions(samples_per_shard=5000))
    lc.filter("data/raw", "data/filtered", lc.FilterRules(min_side=256))
    lc.caption("data/filtered", "data/captioned", lc.backend("openai", model="gpt-4.1-mini"), max_cost=20.0)
    lc.dedup("data/captioned", "data/deduped")
    lc.shard("data/deduped", "release", lc.ExportOptions(format="parquet"))
    print(lc.inspect("data/deduped")["caption_words"])

The command line is a thin layer over these functions: what a flag does, the keyword of the same
name does here. Every function that writes a dataset takes the same ownership keywords:
``overwrite`` (the output holds another job's results: clear it), ``allow_incomplete`` (go on without
the input's incomplete shards), and, for the stages that do not change images, ``copy_images``
(write a self-contained output instead of rows that refer to the input's images). Errors are the
``lenscap.core.errors`` hierarchy (``UsageError`` and its kinds for a job that cannot run as asked).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lenscap.audit import AuditOptions
from lenscap.core.record import Sample
from lenscap.core.result import JobResult
from lenscap.core.stage import ShardStage
from lenscap.dedup.search import DedupOptions
from lenscap.dedup.stage import DedupResult
from lenscap.download.command import DownloadOptions
from lenscap.filter.stage import FilterRules
from lenscap.shard.command import ExportOptions, ExportResult

if TYPE_CHECKING:
    from lenscap.caption.backends.base import CaptionBackend
    from lenscap.caption.batch import BatchResult
    from lenscap.core.executors import Executor
    from lenscap.core.progress import Progress
    from lenscap.core.stage import Stage
    from lenscap.filter.annotators.base import Annotator

__all__ = [
    "download",
    "filter",
    "filter_counts",
    "caption",
    "dedup",
    "shard",
    "inspect",
    "report",
    "audit",
    "run",
    "run_stage",
    "backend",
    "AuditOptions",
    "ShardStage",
    "Sample",
    "JobResult",
    "DownloadOptions",
    "FilterRules",
    "FilterResult",
    "CaptionResult",
    "DedupOptions",
    "DedupResult",
    "ExportOptions",
    "ExportResult",
]

Location = str | os.PathLike[str]


@dataclass
class FilterResult(JobResult):
    kept: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # kept, error, or the rule that dropped


@dataclass
class CaptionResult(JobResult):
    spent_usd: float = 0.0


def download(
    source: Location | None,
    out_dir: Location,
    options: DownloadOptions | None = None,
    *,
    retry_failed: bool = False,
    overwrite: bool = False,
    quiet: bool = True,
    img2dataset: Any = None,
) -> JobResult:
    """Download ``source`` (a URL list) into ``out_dir``; with ``retry_failed``, then fetch the failed
    downloads of completed shards again (``source`` None: only that). ``img2dataset``: an
    ``Img2datasetProcess`` started earlier, to overlap its start-up with the caller's."""
    from lenscap.core.progress import make_progress
    from lenscap.download.command import download as run_download
    from lenscap.download.command import retry_failed as run_retry

    options = options or DownloadOptions()
    result = None
    if source is not None:
        result = run_download(
            os.fspath(source), out_dir, options, make_progress("download", quiet), img2dataset, overwrite=overwrite
        )
    if retry_failed and (result is None or result.exit_code == 0):
        result = run_retry(out_dir, options, make_progress("retry-failed", quiet))
    if result is None:
        from lenscap.core.errors import UsageError

        raise UsageError("download needs a URL list, or retry_failed=True on an existing output")
    if result.exit_code == 0:  # finished: the card, so datasets.load_dataset(out_dir) reads the downloaded samples
        from lenscap.shard.card import write_download_card

        write_download_card(out_dir)
    return result


def filter(
    in_dir: Location,
    out_dir: Location,
    rules: FilterRules | None = None,  # noqa: A001 - the command's name
    annotators: Iterable[Annotator] = (),
    blocklist: frozenset[str] = frozenset(),
    *,
    copy_images: bool = False,
    overwrite: bool = False,
    allow_incomplete: bool = False,
    processes: int = 1,
    executor: Executor | None = None,
    progress: Progress | None = None,
) -> FilterResult:
    """Keep the samples that pass ``rules`` (cheap, on columns) and then ``annotators`` (on pixels)."""
    from dataclasses import asdict

    from lenscap.core.dataset import Dataset
    from lenscap.core.job import run_stage
    from lenscap.core.progress import make_progress

    stage = _filter_stage(in_dir, rules, annotators, blocklist)
    stage.copy_images = copy_images
    result = run_stage(
        stage,
        in_dir,
        out_dir,
        processes,
        progress or make_progress("filter", True),
        executor,
        overwrite=overwrite,
        allow_incomplete=allow_incomplete,
    )
    reasons: Counter[str] = Counter()
    out = Dataset(out_dir)
    for shard_id in out.completed_ids():
        reasons.update(out.read_stats(shard_id).get("filter_reasons", {}))
    return FilterResult(**asdict(result), kept=reasons.get("kept", 0), reasons=dict(reasons.most_common()))


def filter_counts(
    in_dir: Location,
    rules: FilterRules | None = None,
    annotators: Iterable[Annotator] = (),
    blocklist: frozenset[str] = frozenset(),
) -> Counter[str]:
    """What ``filter`` would decide, counted per reason (``kept``, ``error``, or a rule); writes nothing."""
    from lenscap.core.dataset import Dataset

    stage = _filter_stage(in_dir, rules, annotators, blocklist)
    stage.setup()
    src = Dataset.open(in_dir)
    counts: Counter[str] = Counter()
    for shard_id in src.completed_ids():
        counts.update(stage.count_shard(src, shard_id))
    return counts


def _filter_stage(in_dir: Location, rules: FilterRules | None, annotators: Iterable[Annotator], blocklist: frozenset[str]) -> Any:
    from lenscap.core.dataset import Dataset
    from lenscap.filter.stage import FilterStage

    stage = FilterStage(rules or FilterRules(), list(annotators), blocklist)
    stage.check_rules(Dataset.open(in_dir))  # bad values or a bad --where fail here, before any work
    return stage


def backend(name: str = "openai", **options: Any) -> CaptionBackend:
    """A caption backend by name (a built-in or a plugin), its options as keywords (``model=...``)."""
    from lenscap.caption.backends import backend_class

    return backend_class(name).from_options(options)


def caption(
    in_dir: Location,
    out_dir: Location,
    captioner: CaptionBackend,
    prompt: str = "lens",
    *,
    hints: tuple[str, ...] = (),
    max_cost: float | None = None,
    cache: bool = True,
    cache_dir: Location | None = None,
    copy_images: bool = False,
    overwrite: bool = False,
    allow_incomplete: bool = False,
    retry_errors: bool = False,
    redo: str | None = None,
    processes: int = 1,
    executor: Executor | None = None,
    progress: Progress | None = None,
) -> CaptionResult | BatchResult:
    """Recaption with ``captioner`` (``backend(...)``); ``prompt``: a preset or a prompt file. Nothing
    already paid for is asked again on a rerun. ``cache``: the response cache, in ``cache_dir`` (default
    ``$LENSCAP_CACHE_DIR`` or ``~/.cache/lenscap``). ``retry_errors``: in an output captioned before,
    ask again the samples whose caption is an error, and only them. ``redo``: an SQL expression over
    the columns of ``in_dir``, a captioned dataset; only its rows where it is true are captioned again
    (never from the cache), the others are carried over, and ``caption_run`` says which run wrote each
    caption. A batch backend returns the batch job's state."""
    from dataclasses import asdict

    from lenscap.caption.cache import default_cache_dir
    from lenscap.caption.prompts import load_prompt
    from lenscap.caption.stage import CaptionStage
    from lenscap.core.dataset import Dataset
    from lenscap.core.errors import BudgetReached, UsageError
    from lenscap.core.job import run_stage
    from lenscap.core.progress import make_progress

    if max_cost is not None and max_cost <= 0:
        raise UsageError(f"--max-cost must be positive, not {max_cost}")
    directory = None if not cache else Path(cache_dir) if cache_dir is not None else default_cache_dir()
    captioner.set_processes(processes)
    if redo is not None and retry_errors:
        raise UsageError(
            "--redo and --retry-errors do not go together: --redo writes a new output from a captioned "
            "input; to ask its errors again there, give --redo \"caption_status = 'error'\""
        )
    if redo is not None and captioner.runs_as_batch:
        raise UsageError(f"--redo is for the request-by-request backends; {captioner.name} runs as batch jobs")
    stage = CaptionStage(captioner, load_prompt(prompt), directory, max_cost, hints=hints, redo=redo)
    stage.copy_images = copy_images
    stage.retry_errors = retry_errors
    if retry_errors and captioner.runs_as_batch:
        raise UsageError(
            "--retry-errors is for the request-by-request backends; a batch job asks its failed requests "
            "again itself, in new rounds (--max-retries)"
        )
    if redo is not None:
        stage.check_redo(Dataset.open(in_dir))  # a bad expression or an uncaptioned input fails here, before any request
    progress = progress or make_progress("caption", True)
    try:
        if captioner.runs_as_batch:
            from lenscap.caption.batch import run_batch_caption
            from lenscap.core.executors import LocalExecutor

            return run_batch_caption(
                stage,
                in_dir,
                out_dir,
                progress,
                executor=executor or LocalExecutor(processes),
                overwrite=overwrite,
                allow_incomplete=allow_incomplete,
            )
        result = run_stage(
            stage, in_dir, out_dir, processes, progress, executor, overwrite=overwrite, allow_incomplete=allow_incomplete
        )
    except BudgetReached as e:
        e.spent_usd = stage.budget.spent if stage.budget else 0.0  # what the caller reports
        raise
    return CaptionResult(**asdict(result), spent_usd=stage.budget.spent if stage.budget else 0.0)


def dedup(
    in_dir: Location,
    out_dir: Location,
    options: DedupOptions | None = None,
    against: Iterable[Location] = (),
    *,
    copy_images: bool = False,
    overwrite: bool = False,
    allow_incomplete: bool = False,
    processes: int = 1,
    executor: Executor | None = None,
    quiet: bool = True,
) -> DedupResult:
    """Mark (and drop) exact, perceptual and caption duplicates, also against earlier ``against`` datasets."""
    from lenscap.dedup.stage import DedupStage, run_dedup

    stage = DedupStage(options or DedupOptions(), [os.fspath(a) for a in against])
    stage.copy_images = copy_images
    return run_dedup(stage, in_dir, out_dir, processes, quiet, executor, overwrite=overwrite, allow_incomplete=allow_incomplete)


def shard(
    in_dir: Location,
    out_dir: Location,
    options: ExportOptions | None = None,
    *,
    overwrite: bool = False,
    allow_incomplete: bool = False,
    processes: int = 1,
    executor: Executor | None = None,
    quiet: bool = True,
) -> ExportResult:
    """Export the kept, captioned samples to training-ready shards (their images copied once, here)."""
    from lenscap.shard.command import run_export

    return run_export(
        options or ExportOptions(),
        in_dir,
        out_dir,
        processes,
        quiet,
        executor,
        overwrite=overwrite,
        allow_incomplete=allow_incomplete,
    )


def run_stage(
    stage: Stage,
    in_dir: Location,
    out_dir: Location,
    *,
    copy_images: bool = False,
    overwrite: bool = False,
    allow_incomplete: bool = False,
    processes: int = 1,
    executor: Executor | None = None,
    progress: Progress | None = None,
) -> JobResult:
    """Run your own per-shard stage (a ``ShardStage`` subclass) with every guarantee the built-in ones have."""
    from lenscap.core.job import run_stage as run
    from lenscap.core.progress import make_progress

    stage.copy_images = copy_images or stage.copy_images
    return run(
        stage,
        in_dir,
        out_dir,
        processes,
        progress or make_progress(stage.name, True),
        executor,
        overwrite=overwrite,
        allow_incomplete=allow_incomplete,
    )


def report(
    path: Location, out: Location | None = None, sample: int = 24, seed: int = 0, png: Location | None = None
) -> dict[str, Any]:
    """Write the HTML report of a dataset (default ``DIR/report.html``), and a PNG contact sheet if asked."""
    from lenscap.report.html import write_report

    return write_report(path, out, sample, seed, png)


def audit(
    path: Location,
    options: AuditOptions | None = None,
    *,
    compare_with: Location | None = None,
    out: Location | None = None,
    processes: int = 1,
    executor: Executor | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Measure the captions of ``path`` (``lenscap audit``): the ``--json`` object, whose ``exit_code``
    is 6 when an ``options.fail_on`` rule is broken. ``compare_with``: a second captioning of the same
    images (rules judge it). ``out``: also write ``path`` with one ``audit_<flag>`` column per flag there."""
    from lenscap.audit import audit as run_audit
    from lenscap.core.executors import LocalExecutor

    return run_audit(
        path,
        options,
        compare_with=compare_with,
        out=out,
        executor=executor or LocalExecutor(processes),
        progress=progress,
        overwrite=overwrite,
    )


def run(
    recipe: str,
    overrides: Iterable[str] = (),
    *,
    input: str | None = None,  # noqa: A002 - the recipe's word
    work_dir: Location | None = None,
    quiet: bool = True,
) -> dict[str, Any]:
    """Run (or resume) a recipe: a file, or a shipped one by name; ``overrides`` as ``STAGE.OPTION=VALUE``."""
    from lenscap.run.recipe import load_recipe, run_recipe

    loaded = load_recipe(recipe, list(overrides), os.fspath(work_dir) if work_dir is not None else None, input)
    return run_recipe(loaded, quiet)


def inspect(path: Location) -> dict[str, Any]:
    """A summary of a dataset: shards, samples, statuses, errors, caption lengths, where its images live."""
    from lenscap.inspect import inspect_dataset

    return inspect_dataset(path)
