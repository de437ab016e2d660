"""The quickstart's demo: the demo recipe offline, no key, the whole pipeline, one JSON summary."""

from __future__ import annotations

import json

from conftest import run_cli


def test_demo_without_a_key_captions_with_describe(tmp_path):
    r = run_cli(
        "demo",
        str(tmp_path / "demo"),
        "--images",
        "12",
        "--json",
        "--quiet",
        env={"OPENAI_API_KEY": None, "OPENAI_BASE_URL": None, "LENSCAP_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["captioner"] == "describe"
    assert summary["download"]["status"] == {"success": 12, "failed_to_download": 2, "failed_to_resize": 2}
    captioned = summary["captioned"]
    assert captioned["stage_status"]["caption_status"] == {"ok": 12, "skipped": 4}
    assert captioned["caption_cost"]["usd"] == 0
    assert [s["stage"] for s in summary["stages"]] == ["download", "filter", "caption", "dedup", "shard", "report"]
    assert summary["deduped"]["history"] == ["download", "filter", "caption", "dedup"]
    shards = json.loads((tmp_path / "demo" / "shard" / "shards.json").read_text())
    assert shards["samples"] == 12 - summary["deduped"]["dedup"]["duplicates"]
    report = (tmp_path / "demo" / "report.html").read_text()
    assert report.count("alt='sample ") == 12 - summary["deduped"]["dedup"]["duplicates"]
    assert "12 captions audited" in report  # the demo's captions, measured
    # a second demo starts afresh: its images are served on a new port
    r = run_cli(
        "demo",
        str(tmp_path / "demo"),
        "--images",
        "12",
        "--json",
        "--quiet",
        env={"OPENAI_API_KEY": None, "OPENAI_BASE_URL": None, "LENSCAP_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["download"]["status"]["success"] == 12


def test_demo_with_the_fake_api(tmp_path):
    r = run_cli(
        "demo",
        str(tmp_path / "demo"),
        "--images",
        "12",
        "--captioner",
        "fake",
        "--json",
        "--quiet",
        env={"OPENAI_API_KEY": None, "OPENAI_BASE_URL": None, "LENSCAP_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["download"]["status"] == {"success": 12, "failed_to_download": 2, "failed_to_resize": 2}
    captioned = summary["captioned"]
    assert captioned["stage_status"]["caption_status"] == {"ok": 12, "skipped": 4}
    assert captioned["history"] == ["download", "filter", "caption"]
    assert captioned["caption_cost"]["usd"] > 0
    assert not (tmp_path / "cache").exists(), "the demo leaves the user's response cache alone"
