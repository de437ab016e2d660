"""``lenscap dedup`` as a job: signatures per shard, the global search, then the output shards
(``dedup.stage`` says what each pass keeps and where)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from lenscap.core.commits import atomic_write_json
from lenscap.core.dataset import Dataset
from lenscap.core.errors import UsageError
from lenscap.core.executors import Executor, executor_for
from lenscap.core.job import Job, StageRun
from lenscap.core.progress import say
from lenscap.core.result import JobResult
from lenscap.core.storage import redact_url
from lenscap.dedup.embedding import EmbeddingPlan
from lenscap.dedup.folder import ImageFolder, hash_folder, open_against
from lenscap.dedup.options import DedupOptions
from lenscap.dedup.phash import ALGORITHM
from lenscap.dedup.search import Source, find_duplicates
from lenscap.dedup.signatures import SignatureStage, signature_algorithm
from lenscap.dedup.stage import REPORT_FILES, DedupStage, report_dir, work_dir
from lenscap.embed.store import KeptEmbeddings

__all__ = ["run_dedup"]


def _against_dir(dst: Dataset, resolved: str) -> Path:
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:12]
    return work_dir(dst) / "against" / f"{PurePosixPath(resolved).name}-{digest}"


def _fingerprint(sources: list[Source]) -> list[dict[str, Any]]:
    out = []
    for s in sources:
        ids = s.signatures.completed_ids()
        out.append({"source": s.index, "shards": len(ids), "rows": sum(s.signatures.read_stats(i)["count"] for i in ids)})
    return out


def run_dedup(
    in_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: DedupOptions,
    *,
    quiet: bool = True,
    executor: Executor | None = None,
) -> JobResult:
    # Any of them may be remote; the search runs on local files (the output's work directory).
    stage = DedupStage(options)
    src = Dataset.open(in_dir)
    inputs = [open_against(p) for p in stage.against]
    out_resolved = Dataset(out_dir).resolved
    for label, ds in zip(stage.against, inputs):
        if ds.resolved in (src.resolved, out_resolved):
            raise UsageError(
                f"--against {redact_url(label)} is the {'input' if ds.resolved == src.resolved else 'output'} itself"
            )
    job = Job("dedup", executor or executor_for(options), quiet)
    with job.stage_output(stage, src, out_dir, overwrite=options.overwrite, allow_incomplete=options.allow_incomplete) as run:
        return _passes(job, run, inputs, redact_url(os.fspath(in_dir)))


def _passes(job: Job, run: StageRun, inputs: list[Dataset | ImageFolder], in_label: str) -> JobResult:
    stage, dst = run.stage, run.dst
    assert isinstance(stage, DedupStage)
    # A remote output holding nothing forgets its work directory at every recover (pass 3's included),
    # which would lose the signatures and decisions below: the manifest, written now, claims them.
    run.write_manifest()
    sources, failed = _signatures(job, run, inputs, in_label)
    if failed:
        for label, shards in failed.items():
            say(f"dedup: {len(shards)} shard(s) of {label} could not be hashed; nothing written yet; rerun to resume")
        hashing_failed = {label: {str(i): m for i, m in shards.items()} for label, shards in failed.items()}
        failed_shards = {i: m for shards in failed.values() for i, m in shards.items()}
        return JobResult("dedup", dst.location, failed_shards=failed_shards, details=_details(dst, None, hashing_failed))
    if stage.options.semantic:
        kept = KeptEmbeddings.find(sources[0].signatures, stage.options.model)
        stage.embedding_dim = kept.dim if kept is not None else None
    report = _decisions(job, run, sources)
    if stage.options.semantic:  # how many of the input's embeddings pass 1 computed, and how many it reused
        report = report | {"semantic": (report.get("semantic") or {}) | _embedding_counts(sources[0].signatures)}
    result = job.run_shards(run, job.progress("dedup: writing"))
    result.details = _details(dst, report, {})
    return result


def _embedding_counts(signatures: Dataset) -> dict[str, int]:
    stats = [s.get("embeddings") or {} for s in signatures.read_all_stats(signatures.completed_ids())]
    return {"embedded": sum(s.get("computed", 0) for s in stats), "reused": sum(s.get("reused", 0) for s in stats)}


def _signatures(
    job: Job, run: StageRun, inputs: list[Dataset | ImageFolder], in_label: str
) -> tuple[list[Source], dict[str, dict[int, str]]]:
    """Pass 1: the signatures of the input and of each --against dataset or image folder; the shards
    (or groups of files) that failed, by input."""
    stage, src, dst = run.stage, run.src, run.dst
    assert isinstance(stage, DedupStage)
    failed: dict[str, dict[int, str]] = {}
    sources = []
    targets = [(src, work_dir(dst) / "signatures")] + [(d, _against_dir(dst, d.resolved)) for d in inputs]
    for index, (dataset, target) in enumerate(targets):
        label = in_label if index == 0 else redact_url(stage.against[index - 1])
        _forget_other_algorithm(target, label)
        if isinstance(dataset, ImageFolder):
            failed_shards = hash_folder(job, dataset, target, label, stage.options.model if stage.options.semantic else None)
        else:
            with job.internal_output(SignatureStage(_embedding(stage.options, dataset)), dataset, target) as signing:
                failed_shards = job.run_shards(signing, job.progress(f"dedup: hashing {label}")).failed_shards
        if failed_shards:
            failed[label] = failed_shards
        sources.append(Source(index, label, Dataset(target)))
    return sources, failed


def _embedding(options: DedupOptions, dataset: Dataset) -> EmbeddingPlan | None:
    """--semantic: pass 1 embeds with the model, reusing what ``dataset`` (or its inputs) keeps of it."""
    if not options.semantic:
        return None
    return EmbeddingPlan(options.model, KeptEmbeddings.find(dataset, options.model))


def _forget_other_algorithm(target: Path, label: str) -> None:
    """Signatures left by a lenscap whose hash differs (a job resumed after an upgrade) are made again:
    hashes of two algorithms are never compared."""
    found = signature_algorithm(target)
    if found is not None and found != ALGORITHM:
        say(f"dedup: the signatures of {label} were made with {found}; hashing again with {ALGORITHM}")
        shutil.rmtree(target)


def _decisions(job: Job, run: StageRun, sources: list[Source]) -> dict[str, Any]:
    """Pass 2: the decisions, unless already made from these same signatures; the report, put in
    ``dedup/`` (``REPORT_FILES``, in that order: report.json, which inspect reads, describes the
    clusters already there)."""
    stage, dst = run.stage, run.dst
    assert isinstance(stage, DedupStage)
    marker = work_dir(dst) / "decisions.json"
    fingerprint = {"options": stage.options.identity(), "sources": _fingerprint(sources)}
    done = json.loads(marker.read_text()) if marker.exists() else None
    if done is not None and done["fingerprint"] != fingerprint:
        if dst.completed_ids():
            raise UsageError(f"the input of {dst.location} changed since it was deduplicated; use a new output directory")
        done = None
    if done is not None:
        report = dict(done["report"])
    else:
        p = job.progress("dedup: searching", unit="steps")  # its status numbers the steps
        p.start(1)
        try:
            report = find_duplicates(sources, stage.options.resolved(), work_dir(dst), report_dir(dst), status=p.status, job=job)
            p.advance(shards=1)
        finally:
            p.finish()
        atomic_write_json(marker, {"fingerprint": fingerprint, "report": report})
    # The report files, from where pass 2 left them: just written, or not put in place before a kill.
    for name in REPORT_FILES:
        staged = report_dir(dst) / name
        if staged.exists():
            dst.put(staged, f"dedup/{name}")
    return report


def _details(dst: Dataset, report: dict[str, Any] | None, hashing_failed: dict[str, dict[str, str]]) -> dict[str, Any]:
    """dedup's figures: its duplicates and clusters, where the report is, and the shards that could not be hashed."""
    report = report or {}
    return {
        "duplicates": report.get("duplicates"),
        "duplicates_by_reason": report.get("duplicates_by_reason"),
        "semantic": report.get("semantic"),
        "duplicates_by_tier": report.get("duplicates_by_tier"),
        "clusters": report.get("clusters"),
        "report": f"{dst.location}/dedup/report.json" if report else None,
        "hashing_failed": hashing_failed,
    }
