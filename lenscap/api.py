"""lenscap as a library: one function per command, its options object in, a typed result out.

    import lenscap.api as lc

    lc.download("urls.csv", "data/raw", lc.DownloadOptions(samples_per_shard=5000))
    lc.filter("data/raw", "data/filtered", min_side=256)            # the options' fields as keywords
    lc.caption("data/filtered", "data/captioned", model="gpt-4.1-mini", max_cost=20.0)
    lc.dedup("data/captioned", "data/deduped")
    lc.shard("data/deduped", "release", lc.ShardOptions(format="parquet"))
    print(lc.inspect("data/deduped")["caption_words"])

Each function takes its command's options object (``lenscap.<command>.options``: the same fields as the
command's flags, with the same defaults and checks), or its fields as keywords, or both (the keywords
change the object's). The command line is a thin layer over these functions, and a recipe's stages
call them. Every function that writes a dataset returns a ``JobResult`` (``exit_code`` is the code the
CLI exits with, ``summary()`` its ``--json`` object). ``quiet``: no progress on stderr. Errors are the
``lenscap.core.errors`` hierarchy (``UsageError`` and its kinds for a job that cannot run as asked).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any, TypeVar

from lenscap.audit.command import audit as _audit
from lenscap.audit.options import AuditOptions
from lenscap.caption.backends.base import CaptionBackend
from lenscap.caption.command import build_backend, run_caption
from lenscap.caption.options import CaptionOptions
from lenscap.core.executors import Executor
from lenscap.core.job import run_stage as _run_stage
from lenscap.core.options import Executed
from lenscap.core.progress import make_progress
from lenscap.core.record import Sample
from lenscap.core.result import JobResult
from lenscap.core.stage import ShardStage, Stage
from lenscap.dedup.command import run_dedup
from lenscap.dedup.options import DedupOptions
from lenscap.download.command import run_download
from lenscap.download.img2dataset_process import Img2datasetProcess
from lenscap.download.options import DownloadOptions
from lenscap.estimate.cost import estimate as _estimate
from lenscap.estimate.options import EstimateOptions
from lenscap.filter.annotators.base import Annotator
from lenscap.filter.command import run_filter
from lenscap.filter.options import FilterOptions
from lenscap.inspect.summary import inspect_dataset
from lenscap.report.html import run_report
from lenscap.report.options import ReportOptions
from lenscap.run.options import RunOptions
from lenscap.run.pipeline import run_recipe
from lenscap.run.recipe import load_recipe
from lenscap.shard.command import run_shard
from lenscap.shard.options import ShardOptions
from lenscap.verify.command import verify as _verify
from lenscap.verify.options import VerifyOptions

__all__ = [
    "download",
    "filter",
    "caption",
    "dedup",
    "shard",
    "inspect",
    "verify",
    "report",
    "audit",
    "estimate",
    "run",
    "run_stage",
    "backend",
    "COMMANDS",
    "DownloadOptions",
    "FilterOptions",
    "CaptionOptions",
    "DedupOptions",
    "ShardOptions",
    "ReportOptions",
    "AuditOptions",
    "EstimateOptions",
    "VerifyOptions",
    "RunOptions",
    "JobResult",
    "ShardStage",
    "Stage",
    "Sample",
]

Location = str | os.PathLike[str]
OptionsT = TypeVar("OptionsT", bound=Executed)


def _here(options: OptionsT) -> OptionsT:
    """A library call runs in this process unless it asks for more (``processes``, or ``executor="ray"``):
    no worker to spawn, nothing to pickle, and a script needs no ``__main__`` guard. The CLI and recipes
    fill in the flag's default first (all cores; ``Executed.with_default_processes``)."""
    if options.processes is None and options.executor == "local":
        return dataclasses.replace(options, processes=1)
    return options


def download(
    source: Location | None,
    out_dir: Location,
    options: DownloadOptions | None = None,
    /,
    *,
    quiet: bool = True,
    img2dataset: Img2datasetProcess | None = None,
    given: Iterable[str] | None = None,
    **fields: Any,
) -> JobResult:
    """Download ``source`` (a URL list) into ``out_dir``; with ``retry_failed``, then fetch the failed
    downloads of completed shards again (``source`` None: only that, with the last run's fetch options,
    such as ``allow_private_network`` and ``timeout``, but for the fields ``given``: by default the
    keywords passed, or with ``options``, its fields that differ from the defaults). ``img2dataset``: an
    ``Img2datasetProcess`` started earlier, to overlap its start-up with the caller's."""
    source = os.fspath(source) if source is not None else None
    if given is None and options is None:
        given = fields
    return run_download(
        source,
        out_dir,
        DownloadOptions.of(options, **fields),
        quiet=quiet,
        img2dataset=img2dataset,
        given=None if given is None else set(given),
    )


def filter(  # noqa: A001 - the command's name
    in_dir: Location,
    out_dir: Location,
    options: FilterOptions | None = None,
    /,
    *,
    quiet: bool = True,
    annotators: list[Annotator] | None = None,
    **fields: Any,
) -> JobResult:
    """Keep the samples that pass the cheap rules and then the annotators; with ``dry_run``, count what
    would be dropped per reason and write nothing (the result's ``kept`` and ``reasons``).
    ``annotators``: annotators built here (``annotator_class(name)(threshold, **arguments)``), run
    besides those the options name: a plugin's with arguments of its own."""
    return run_filter(in_dir, out_dir, _here(FilterOptions.of(options, **fields)), quiet=quiet, annotators=annotators)


def backend(name: str = "openai", **options: Any) -> CaptionBackend:
    """A caption backend by name (a built-in or a plugin), its options as keywords (``model=...``)."""
    return build_backend(name, options)


def caption(
    in_dir: Location,
    out_dir: Location,
    options: CaptionOptions | None = None,
    /,
    *,
    quiet: bool = True,
    captioner: CaptionBackend | None = None,
    **fields: Any,
) -> JobResult:
    """Recaption with the backend the options name (``captioner``: one built with ``backend(...)``
    instead). Nothing already paid for is asked again on a rerun. A batch backend's result says whether
    every batch is in (``complete``)."""
    return run_caption(in_dir, out_dir, _here(CaptionOptions.of(options, **fields)), quiet=quiet, backend=captioner)


def dedup(
    in_dir: Location, out_dir: Location, options: DedupOptions | None = None, /, *, quiet: bool = True, **fields: Any
) -> JobResult:
    """Mark (and drop) exact, perceptual and caption duplicates, also against earlier ``against`` datasets."""
    return run_dedup(in_dir, out_dir, _here(DedupOptions.of(options, **fields)), quiet=quiet)


def shard(
    in_dir: Location, out_dir: Location, options: ShardOptions | None = None, /, *, quiet: bool = True, **fields: Any
) -> JobResult:
    """Export the kept, captioned samples to training-ready shards (their images copied once, here)."""
    return run_shard(in_dir, out_dir, _here(ShardOptions.of(options, **fields)), quiet=quiet)


def report(path: Location, options: ReportOptions | None = None, /, **fields: Any) -> dict[str, Any]:
    """Write the HTML report of a dataset (default ``DIR/report.html``), and a PNG contact sheet if asked."""
    return run_report(path, ReportOptions.of(options, **fields))


def audit(
    path: Location,
    options: AuditOptions | None = None,
    /,
    *,
    compare_with: Location | None = None,
    quiet: bool = True,
    **fields: Any,
) -> dict[str, Any]:
    """Measure the captions of ``path`` (``lenscap audit``): the ``--json`` object, whose ``exit_code``
    is 6 when a ``fail_on`` rule is broken. ``compare_with``: a second captioning of the same images
    (rules judge it). ``out``: also write ``path`` with one ``audit_<flag>`` column per flag there."""
    return _audit(path, _here(AuditOptions.of(options, **fields)), compare_with=compare_with, quiet=quiet)


def estimate(options: EstimateOptions | None = None, /, **fields: Any) -> dict[str, Any]:
    """Tokens, cost and wall time of captioning (``images=``, or ``from_dir`` and ``where``), before spending anything."""
    return {"command": "estimate", **_estimate(EstimateOptions.of(options, **fields)), "exit_code": 0}


def inspect(path: Location) -> dict[str, Any]:
    """A summary of a dataset: shards, samples, statuses, errors, caption lengths, where its images live."""
    return {"command": "inspect", **inspect_dataset(path)}


def verify(path: Location, options: VerifyOptions | None = None, /, *, quiet: bool = True, **fields: Any) -> dict[str, Any]:
    """Read every byte of a dataset's complete shards and check each file against the size and SHA-256
    its commit recorded: the ``--json`` object, whose ``exit_code`` is 1 when a shard is damaged
    (``damaged_shards``). ``repair``: make the damaged shards incomplete, for the next run to write again."""
    return _verify(path, _here(VerifyOptions.of(options, **fields)), quiet=quiet)


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
    quiet: bool = True,
) -> JobResult:
    """Run your own per-shard stage (a ``ShardStage`` subclass) with every guarantee the built-in ones have."""
    stage.copy_images = copy_images or stage.copy_images
    return _run_stage(
        stage,
        in_dir,
        out_dir,
        processes,
        make_progress(stage.name, quiet),
        executor,
        overwrite=overwrite,
        allow_incomplete=allow_incomplete,
    )


# What a recipe's stages call, by command (lenscap.run.recipe takes it: a recipe imports no command),
# with --processes as the command line has it.
COMMANDS = {
    "download": lambda paths, options, quiet: download(*paths, options.with_default_processes(), quiet=quiet),
    "filter": lambda paths, options, quiet: filter(*paths, options.with_default_processes(), quiet=quiet),
    "caption": lambda paths, options, quiet: caption(*paths, options.with_default_processes(), quiet=quiet),
    "dedup": lambda paths, options, quiet: dedup(*paths, options.with_default_processes(), quiet=quiet),
    "shard": lambda paths, options, quiet: shard(*paths, options.with_default_processes(), quiet=quiet),
    "report": lambda paths, options, quiet: report(*paths, options),
    "audit": lambda paths, options, quiet: audit(*paths, options.with_default_processes(), quiet=quiet),
}


def run(recipe: str, options: RunOptions | None = None, /, *, quiet: bool = True, **fields: Any) -> dict[str, Any]:
    """Run (or resume) a recipe: a file, or a shipped one by name; ``set`` overrides as ``STAGE.OPTION=VALUE``."""
    options = RunOptions.of(options, **fields)
    return run_recipe(load_recipe(recipe, options.set, options.work_dir, options.input), COMMANDS, quiet)
