"""``lenscap audit``: how good a dataset's captions are, measured out of core, before training on them.

    scan (every shard, on the executor)  ->  global pass (hash-partitioned spill files)  ->  summary
                                                                                         ->  --out: a dataset with per-caption flags

``lenscap.audit.source`` opens what is audited; ``lenscap.audit.measures`` defines each flag;
``lenscap.audit.text`` turns text into hashes; ``lenscap.audit.scan`` runs the scan;
``lenscap.audit.spill`` groups by hash out of core; ``lenscap.audit.summary`` builds the numbers,
the ``--fail-on`` rules and the comparison of two datasets; ``lenscap.audit.render`` prints them.
Nothing is written into the audited dataset: the spill files live in a temporary directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lenscap.audit.measures import FLAGS, READ_COLUMNS, AuditSettings, measure
from lenscap.audit.options import AuditOptions
from lenscap.audit.scan import scan
from lenscap.audit.source import ParquetFiles, open_captioned
from lenscap.audit.summary import check_rules, compare, find_duplicates, parse_rules, summarise, top_openings
from lenscap.core.dataset import Dataset
from lenscap.core.errors import UsageError
from lenscap.core.executors import Executor, executor_for
from lenscap.core.job import Job
from lenscap.core.progress import Progress, say
from lenscap.core.schema import Column
from lenscap.core.stage import Stage

__all__ = ["audit", "AuditStage", "FLAGS", "EXIT_RULE_BROKEN"]

EXIT_RULE_BROKEN = 6  # --fail-on: a rule was broken (the audit itself ran to the end)


def audit(
    path: str | os.PathLike[str],
    options: AuditOptions,
    *,
    compare_with: str | os.PathLike[str] | None = None,
    quiet: bool = True,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Audit the captions of ``path`` (and compare them with ``compare_with``'s); with ``--out``, also
    write the dataset with one column per flag there. Returns the ``--json`` object; its
    ``exit_code`` is 6 when a ``fail_on`` rule is broken, 1 when a shard could not be read."""
    rules = parse_rules(options.fail_on)
    out = options.out
    if out is not None and compare_with is not None:
        raise UsageError("--out writes one audited dataset: give it with one DIR")
    src = open_captioned(path)
    if out is not None and isinstance(src, ParquetFiles):
        raise UsageError(f"--out writes a lenscap dataset from a lenscap dataset, and {path} is plain Parquet files")
    other = open_captioned(compare_with) if compare_with is not None else None
    job = Job("audit", executor or executor_for(options), quiet)
    progress = job.progress("audit")
    with tempfile.TemporaryDirectory(prefix="lenscap-audit-") as tmp:
        spill = Path(tmp)
        result, first = _audit_one(src, options, job, spill / "a", progress, rows=other is not None)
        head, failed = result, dict(first.failed)
        if other is not None:
            # Rules judge B, the candidate; A is the baseline it is compared with.
            head, second = _audit_one(other, options, job, spill / "b", progress, rows=True)
            failed |= second.failed
            comparison = compare(result, head, first.rows, second.rows, spill, options.memory_limit, options.sample, options.seed)
            _read_differences(comparison, src, other)
            result = {"a": result, "b": head, **comparison}
        written = _write_out(src, out, options, first, job, progress) if out is not None else None
    result = {"command": "audit", **result}
    checked = check_rules(head, rules)
    result["rules"] = checked
    result["failed_rules"] = [c["rule"] for c in checked if c["broken"]]
    if written is not None:
        result["out"] = written
    result["exit_code"] = EXIT_RULE_BROKEN if result["failed_rules"] else 1 if failed or (written or {}).get("exit_code") else 0
    for rule in checked:
        if rule["broken"]:
            say(f"audit: rule broken: {rule['rule']} (measured {rule['value']})")
    return result


def _audit_one(
    ds: Dataset | ParquetFiles, options: AuditOptions, job: Job, spill: Path, progress: Progress | None, rows: bool
) -> tuple[dict[str, Any], Any]:
    scanned = scan(ds, options.settings, job, spill, sample=options.sample, seed=options.seed, rows=rows, progress=progress)
    duplicates, top = find_duplicates(scanned, spill), top_openings(scanned)
    scanned.duplicates = duplicates
    summary = summarise(ds.location, scanned, duplicates, top, options.target_words, options.script)
    expected = ((ds.read_manifest() or {}).get("shards") or {}).get("expected")
    # Shards a stage is still writing are not audited: said, so a gate on a partial dataset is seen as one.
    summary["incomplete_shards"] = len(ds.incomplete_ids(range(expected) if expected else None))
    summary["layout"] = "lenscap" if isinstance(ds, Dataset) else "parquet files"
    return summary, scanned


def _caption_at(ds: Dataset | ParquetFiles, shard_id: int, row: int) -> dict[str, Any]:
    table = ds.read_table(
        shard_id,
        columns=[c for c in ("key", "caption", "caption_model", "caption_prompt") if c in ds.read_schema(shard_id).names],
    )
    return table.slice(row, 1).to_pylist()[0]


def _read_differences(comparison: dict[str, Any], a: Dataset | ParquetFiles, b: Dataset | ParquetFiles) -> None:
    """The sampled differing images get their two captions, to read side by side."""
    for d in comparison["differences"]:
        for side, ds in (("a", a), ("b", b)):
            row = _caption_at(ds, d[side].pop("shard"), d[side].pop("row"))
            d[side] |= {"caption": row.get("caption"), "model": row.get("caption_model"), "prompt": row.get("caption_prompt")}


# -- --out: the dataset with the flags as columns ----------------------------------------------

AUDIT_COLUMNS = [
    pa.field("audit_words", pa.int64()),
    pa.field("audit_repeat_share", pa.float64()),
    *(pa.field(f"audit_{name}", pa.bool_()) for name in FLAGS),
    pa.field("audit_flagged", pa.bool_()),
]


class AuditStage(Stage):
    """Writes each input row with the audit's columns: ``audit_words``, ``audit_repeat_share``, one
    boolean ``audit_<flag>`` per flag, and ``audit_flagged`` (any of them); null where the row is
    not a caption. The rows of the duplicates found by the global pass come with the stage."""

    name = "audit"
    needs = (*Stage.needs, Column("caption", "string", optional=True))

    def __init__(self, settings: AuditSettings, duplicates: dict[int, np.ndarray]) -> None:
        self.audit_settings = settings
        self.duplicates = duplicates  # shard -> sorted row numbers (4 bytes each)

    def parameters(self) -> dict[str, Any]:
        return {"target_words": self.audit_settings.target_words, "script": self.audit_settings.script}

    def columns(self, input_schema: pa.Schema) -> list[pa.Field]:
        return list(AUDIT_COLUMNS)

    def run_shard(self, src: Dataset, dst: Dataset, shard_id: int) -> dict[str, Any]:
        names = src.read_schema(shard_id).names
        m = measure(src.read_table(shard_id, columns=[c for c in READ_COLUMNS if c in names]), self.audit_settings)
        m.flags["duplicate"][self.duplicates.get(shard_id, np.zeros(0, np.int64))] = True
        flagged = np.zeros(len(m.audited), bool)
        for name in FLAGS:
            flagged |= m.flags[name]
        writer = self.writer(src, dst, shard_id)
        try:
            for i, sample in enumerate(src.iter_samples(shard_id)):
                row = sample.row
                row["audit_status"], row["audit_error"] = ("ok" if m.audited[i] else "skipped"), None
                caption = bool(m.audited[i])
                row["audit_words"] = int(m.words[i]) if m.text[i] else None
                row["audit_repeat_share"] = round(float(m.repeat_share[i]), 4) if m.text[i] else None
                for name in FLAGS:
                    row[f"audit_{name}"] = bool(m.flags[name][i]) if caption else None
                row["audit_flagged"] = bool(flagged[i]) if caption else None
                writer.write(sample)
        except BaseException:
            writer.abort()
            raise
        return writer.commit({"stage": self.name})


def _write_out(
    src: Dataset,
    out: str | os.PathLike[str],
    options: AuditOptions,
    scanned: Any,
    job: Job,
    progress: Progress,
) -> dict[str, Any]:
    samples = np.sort(np.fromfile(scanned.duplicates.file, np.int64))
    shards, starts = np.unique(samples >> 32, return_index=True)
    rows = np.split(samples & 0xFFFFFFFF, starts[1:]) if samples.size else []  # split([]) is one empty part
    stage = AuditStage(options.settings, {int(shard): r for shard, r in zip(shards, rows, strict=True)})
    with job.stage_output(stage, src, out, overwrite=options.overwrite) as run:
        return job.run_shards(run, progress).summary()
