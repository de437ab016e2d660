"""lenscap report: the self-contained HTML page (checked in a real headless Chromium) and the PNG sheet."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_cli
from lenscap.dataset import Dataset
from lenscap.demo.images import jpeg_bytes, photo
from lenscap.record import Sample

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def captioned(path: Path, n: int = 30) -> Path:
    ds = Dataset.create(path)
    for shard_id in range(3):
        writer = ds.writer(shard_id)
        for i in range(shard_id * n // 3, (shard_id + 1) * n // 3):
            failed = i % 7 == 6
            row = {"status": "failed_to_download" if failed else "success", "error_message": "HTTP Error 404" if failed else None,
                   "caption": f"A dense caption number {i} <script>alert(1)</script>", "alt_text": f"<b>alt</b> & text {i}",
                   "caption_status": None if failed else "ok", "caption_model": "gpt-4.1-mini", "caption_cost_usd": 0.001}
            writer.write(Sample(f"{i:09d}", row, None if failed else jpeg_bytes(photo(i, (320, 240)))))
        writer.commit({"stage": "caption"})
    ds.write_manifest("caption", {}, None, expected_shards=3)
    return ds.path


def shown_keys(html: str) -> list[str]:
    return re.findall(r"alt='sample (\d+)'", html)


def test_report_html_and_contact_sheet(tmp_path):
    src = captioned(tmp_path / "ds")
    r = run_cli("report", str(src), "--sample", "10", "--png", str(tmp_path / "sheet.png"), "--json")
    assert r.returncode == 0, r.stderr
    written = json.loads(r.stdout)
    assert written["html"] == str(src / "report.html") and written["samples_shown"] == 10
    html = (src / "report.html").read_text()
    keys = shown_keys(html)
    assert len(keys) == 10 == html.count("<img ") and all(int(k) % 7 != 6 for k in keys)  # only samples with images
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # text is escaped, never markup
    assert "&lt;b&gt;alt&lt;/b&gt; &amp; text" in html and "original alt-text" in html
    for heading in ("Summary", "Outcomes", "Caption length", "Most common errors", "Pipeline", "10 sampled images"):
        assert heading in html
    assert "http://" not in html and "https://" not in html  # self-contained
    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.size[0] > 6 * 256 and sheet.size[1] > 2 * 256


def test_same_seed_same_samples(tmp_path):
    src = captioned(tmp_path / "ds")
    picks = []
    for seed, name in ((1, "a"), (1, "b"), (2, "c")):
        assert run_cli("report", str(src), "--sample", "8", "--seed", str(seed), "--out", str(tmp_path / f"{name}.html")).returncode == 0
        picks.append(shown_keys((tmp_path / f"{name}.html").read_text()))
    assert picks[0] == picks[1] and picks[0] != picks[2]
    assert run_cli("report", str(src), "--sample", "100", "--out", str(tmp_path / "all.html")).returncode == 0
    assert len(shown_keys((tmp_path / "all.html").read_text())) == sum(1 for i in range(30) if i % 7 != 6)


def test_bad_input(tmp_path):
    r = run_cli("report", str(tmp_path / "nope"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    src = captioned(tmp_path / "ds", 6)
    r = run_cli("report", str(src), "--out", str(tmp_path / "missing" / "r.html"))
    assert r.returncode == 2 and "its directory does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found: install Debian's chromium package (.ci/run does)")
def test_report_renders_in_headless_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    src = captioned(tmp_path / "ds")
    assert run_cli("report", str(src), "--sample", "12").returncode == 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            problems, requests = [], []
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda req: requests.append(req.url))
            page.goto((src / "report.html").as_uri(), wait_until="load")
            loaded = page.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length")
            figures = page.locator("figure").count()
            title = page.title()
            bars = page.locator("svg rect").count()
        finally:
            browser.close()
    assert problems == []
    assert loaded == figures == 12
    assert title == "lenscap report: ds" and bars > 0
    assert all(u.startswith(("file:", "data:")) for u in requests)  # nothing fetched from anywhere


def test_a_report_that_cannot_be_written_is_a_one_line_error(tmp_path):
    """A read-only place (sysfs refuses even root) is the user's to fix: exit 2, one line, no traceback."""
    from conftest import run_cli_here
    from lenscap.demo.datasets import write_image_dataset

    src = write_image_dataset(tmp_path / "ds", 4, per_shard=2)
    code, _, err = run_cli_here("report", str(src.path), "--out", "/sys/lenscap-report.html")
    assert code == 2 and err.strip() == "lenscap: error: cannot write /sys/lenscap-report.html: Permission denied", err
