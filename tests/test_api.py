"""lenscap.api: the library surface the CLI and the README's "As a library" use, without the CLI."""

from __future__ import annotations

import json

import pytest

import lenscap.api as lc
from lenscap.core.dataset import Dataset
from lenscap.core.errors import DatasetError, UsageError
from lenscap.demo.datasets import write_image_dataset


def test_a_pipeline_through_the_api_returns_typed_results(tmp_path):
    src = write_image_dataset(tmp_path / "raw", 12, per_shard=6, failed=lambda i: i == 5)
    kept = lc.filter(src.path, tmp_path / "filtered", lc.FilterOptions(min_side=100))
    assert isinstance(kept, lc.JobResult) and kept.exit_code == 0
    assert (kept.kept, kept.reasons) == (11, {"kept": 11, "status": 1})
    assert lc.filter(src.path, tmp_path / "unused", min_side=100, dry_run=True).reasons == {"kept": 11, "status": 1}

    captioned = lc.caption(tmp_path / "filtered", tmp_path / "captioned", backend="describe", no_cache=True)
    assert isinstance(captioned, lc.JobResult) and captioned.spent_usd == 0.0
    assert captioned.counts["caption_status"] == {"ok": 11, "skipped": 1}
    audit = lc.audit(tmp_path / "captioned", lc.AuditOptions(target_words=20, fail_on="words_p50<1"))
    assert audit["captions"] == 11 and audit["exit_code"] == 0 and audit["failed_rules"] == []

    deduped = lc.dedup(tmp_path / "captioned", tmp_path / "deduped", lc.DedupOptions(processes=1))
    assert isinstance(deduped, lc.JobResult) and deduped.exit_code == 0
    exported = lc.shard(tmp_path / "deduped", tmp_path / "release", lc.ShardOptions(format="webdataset"))
    assert isinstance(exported, lc.JobResult) and exported.samples == 11 - deduped.duplicates
    assert json.loads((tmp_path / "release" / "shards.json").read_text())["samples"] == exported.samples

    info = lc.inspect(tmp_path / "deduped")
    assert info["images"] == {"held": False, "location": str(src.path), "problem": None}
    assert info["history"] == ["download", "filter", "caption", "dedup"]

    # One result type: every command's has the shared fields, and its exit code, from one place.
    for result, shards, samples in (
        (kept, 2, 12),
        (captioned, 2, 12),
        (deduped, 2, 12),
        (exported, exported.shards_total, exported.samples),
    ):
        assert isinstance(result, lc.JobResult) and result.exit_code == 0
        assert (result.shards_total, result.shards_completed, result.samples, result.failed_shards) == (
            shards,
            shards,
            samples,
            {},
        )


def test_errors_are_the_lenscap_hierarchy_not_exits(tmp_path):
    src = write_image_dataset(tmp_path / "raw", 4, per_shard=4)
    with pytest.raises(UsageError, match="is the input"):
        lc.filter(src.path, src.path)
    lc.filter(src.path, tmp_path / "out", lc.FilterOptions(min_side=10))
    with pytest.raises(DatasetError, match=r"rules.min_side: 10 -> 20.*--overwrite"):
        lc.filter(src.path, tmp_path / "out", lc.FilterOptions(min_side=20))
    result = lc.filter(src.path, tmp_path / "out", lc.FilterOptions(min_side=20), overwrite=True)
    assert result.kept == 4 and Dataset.open(tmp_path / "out").read_manifest()["parameters"]["rules"] == {
        "min_side": 20,
        "status": "success",
    }
    with pytest.raises(UsageError, match="needs a URL list"):
        lc.download(None, tmp_path / "dl")


def test_a_library_call_runs_in_this_process_and_the_cli_and_recipes_on_all_cores():
    """``processes`` left unset: one process from the library (as lenscap.api always has), the flag's
    default from the command line and recipes (all cores; caption: one, a batch backend all cores)."""
    import os

    from lenscap.api import _here

    cores = os.cpu_count() or 1
    assert _here(lc.FilterOptions()).processes == 1 and _here(lc.FilterOptions(processes=3)).processes == 3
    assert _here(lc.DedupOptions(executor="ray")).processes is None  # Ray decides
    assert lc.FilterOptions().with_default_processes().processes == cores
    assert lc.CaptionOptions(backend="describe").with_default_processes().processes == 1
    assert lc.CaptionOptions(backend="batch-files").with_default_processes().processes == cores
