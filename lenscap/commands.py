"""Every command's options class, by name: what the CLI generates its commands from, and what a recipe
checks each stage's table with. Each class lives with its command (``lenscap.<command>.options``)."""

from __future__ import annotations

from lenscap.audit.options import AuditOptions
from lenscap.caption.options import CaptionOptions
from lenscap.core.options import Options
from lenscap.dedup.options import DedupOptions
from lenscap.demo.options import DemoOptions
from lenscap.download.options import DownloadOptions
from lenscap.estimate.options import EstimateOptions
from lenscap.filter.options import FilterOptions
from lenscap.inspect.options import InspectOptions
from lenscap.report.options import ReportOptions
from lenscap.run.options import RunOptions
from lenscap.shard.options import ShardOptions
from lenscap.verify.options import VerifyOptions

__all__ = ["OPTIONS"]

OPTIONS: dict[str, type[Options]] = {
    cls.command: cls
    for cls in (
        DownloadOptions,
        CaptionOptions,
        FilterOptions,
        DedupOptions,
        ShardOptions,
        ReportOptions,
        AuditOptions,
        EstimateOptions,
        InspectOptions,
        VerifyOptions,
        RunOptions,
        DemoOptions,
    )
}
