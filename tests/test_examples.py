"""The examples and the demo run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent


def test_library_example_runs_a_custom_stage(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "library_stage.py"), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "20 samples in 2 shards" in proc.stdout
    assert "history: download -> count_words" in proc.stdout
    table = pq.read_table(tmp_path / "counted" / "00000.parquet")
    words = table.column("caption_words").to_pylist()
    assert words == [len(c.split()) for c in table.column("caption").to_pylist()]


def test_demo_downloads_and_inspects(tmp_path):
    res = run_cli("demo", str(tmp_path / "demo"), "--images", "12", timeout=300)
    assert res.returncode == 0, res.stderr
    assert "16" in res.stdout and "success" in res.stdout  # 12 images + 4 broken links
    info = run_cli("inspect", str(tmp_path / "demo" / "download"), "--json")
    import json

    summary = json.loads(info.stdout)
    assert summary["samples"] == 16
    as_json = run_cli("demo", str(tmp_path / "demo"), "--images", "12", "--json", "--quiet", timeout=300)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["download"]["status"] == summary["status"]
    assert summary["status"] == {"success": 12, "failed_to_resize": 2, "failed_to_download": 2}
    assert summary["shards"] == {"complete": 1, "incomplete": 0, "damaged": 0, "expected": 1}
