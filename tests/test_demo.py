"""The quickstart's demo: the demo recipe offline, no key, the whole pipeline, one JSON summary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
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
    # dedup before caption, as the README advises: no caption is asked for a duplicate image
    assert [s["stage"] for s in summary["stages"]] == ["download", "filter", "dedup", "caption", "shard", "report"]
    assert summary["deduped"]["history"] == ["download", "filter", "dedup"]
    assert captioned["history"] == ["download", "filter", "dedup", "caption"]
    shards = json.loads((tmp_path / "demo" / "shard" / "shards.json").read_text())
    assert shards["samples"] == 12 - summary["deduped"]["dedup"]["duplicates"]
    report = (tmp_path / "demo" / "report.html").read_text()
    assert report.count("alt='sample ") == 12 - summary["deduped"]["dedup"]["duplicates"]
    assert "12 captions audited" in report  # the demo's captions, measured
    _describe_tells_one_story(tmp_path / "demo", report)

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


def _describe_tells_one_story(demo: Path, report: str) -> None:
    """describe sends no prompt: the rows, the manifest and the card record none, and the audit holds its
    captions to no prompt's length; the report says which duplicates are images and which captions."""
    rows = pq.read_table(demo / "caption" / "00000.parquet").to_pylist()
    assert {(r["caption_prompt"], r["caption_prompt_sha"]) for r in rows} == {(None, None)}
    parameters = json.loads((demo / "caption" / "lenscap.json").read_text())["parameters"]
    assert (parameters["backend"], parameters["prompt"], parameters["prompt_sha"]) == ("describe", None, None)
    card = (demo / "shard" / "README.md").read_text()
    assert '`caption` {"backend": "describe"' in card and '"prompt"' not in card
    assert "| caption model | prompt sent | captions |" in card and re.search(r"\| describe-1\S* \| none \| \d+ \|", card)
    assert "no length target" in report and ">off_length<" not in report
    assert "<span class='label'>duplicate images</span>" in report
    # describe's templated captions nearly repeat one another: the audit flags them, and says it counts captions
    assert ">duplicate<" in report and "duplicate counts captions whose text nearly repeats another caption's" in report


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
    assert captioned["history"] == ["download", "filter", "dedup", "caption"]
    assert captioned["caption_cost"]["usd"] > 0
    # a backend that is sent the prompt records it, and the audit holds it to the prompt's length
    parameters = json.loads((tmp_path / "demo" / "caption" / "lenscap.json").read_text())["parameters"]
    assert parameters["prompt"] == "lens" and len(parameters["prompt_sha"]) == 16
    assert "target 109 words" in (tmp_path / "demo" / "report.html").read_text()
    assert "| gpt-4.1-mini | lens | " in (tmp_path / "demo" / "shard" / "README.md").read_text()
    assert not (tmp_path / "cache").exists(), "the demo leaves the user's response cache alone"
