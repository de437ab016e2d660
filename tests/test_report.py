"""lenscap report: the self-contained HTML page (checked in a real headless Chromium) and the PNG sheet."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image

from lenscap.audit.measures import FLAGS
from lenscap.core.dataset import Dataset
from lenscap.core.record import Sample
from lenscap.demo.pictures import jpeg_bytes, photo
from lenscap.report.html import audit_thumbnails, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def captioned(path: Path, n: int = 30) -> Path:
    ds = Dataset.create(path)
    for shard_id in range(3):
        writer = ds.writer(shard_id)
        for i in range(shard_id * n // 3, (shard_id + 1) * n // 3):
            failed = i % 7 == 6
            row = {
                "status": "failed_to_download" if failed else "success",
                "error_message": "HTTP Error 404" if failed else None,
                "caption": f"A dense caption number {i} <script>alert(1)</script>",
                "alt_text": f"<b>alt</b> & text {i}",
                "caption_status": None if failed else "ok",
                "caption_model": "gpt-4.1-mini",
                "caption_cost_usd": 0.001,
            }
            writer.write(Sample(f"{i:09d}", row, None if failed else jpeg_bytes(photo(i, (320, 240)))))
        writer.commit({"stage": "caption"})
    ds.write_manifest("caption", {}, None, expected_shards=3)
    return ds.path


def shown_keys(html: str) -> list[str]:
    return re.findall(r"alt='sample (\d+)'", html)


# key: (caption, model, OCR text); the OCR columns are null where OCR did not run.
PLANTED = {
    "000000000": ("A photo of a red bicycle leaning on a brick wall in the afternoon sun.", "model-a", None),
    "000000001": ("A photo of two ducks crossing a quiet village road at dawn.", "model-a", None),
    "000000002": ("I'm sorry, but I can't help with that.", "model-a", None),  # refusal
    "000000003": ("A photo of a lighthouse standing over stormy grey waves.", "model-a", None),
    "000000004": ("A cat sits on a mat. " * 5, "model-b", None),  # loop
    "000000005": ("A wooden table with a bowl of green apples and a", "model-b", None),  # truncated
    "000000006": (
        'A shop sign saying open 24 hours, tea and cake, and "Fresh Bread Daily".',
        "model-b",
        "OPEN 24 HOURS <Tea & Cake>",
    ),  # ocr_invented: OCR read no bread
    "000000007": ("A photo of snowy mountains above a calm blue lake.", "model-b", ""),
}
FLAGGED = {"000000002": "refusal", "000000004": "loop", "000000005": "truncated", "000000006": "ocr_invented"}


def planted(path: Path) -> Path:
    ds = Dataset.create(path)
    keys = sorted(PLANTED)
    for shard_id, part in enumerate((keys[:4], keys[4:])):
        writer = ds.writer(shard_id)
        for key in part:
            caption, model, ocr = PLANTED[key]
            row = {
                "status": "success",
                "caption": caption,
                "caption_status": "ok",
                "caption_model": model,
                "alt_text": None,
                "ocr_text": ocr,
                "ocr_text_area": None if ocr is None else 0.1,
            }
            writer.write(Sample(key, row, jpeg_bytes(photo(int(key), (64, 48)))))
        writer.commit({"stage": "caption"})
    ds.write_manifest("caption", {}, None, expected_shards=2)
    return ds.path


def uncaptioned(path: Path, n: int = 4) -> Path:
    ds = Dataset.create(path)
    writer = ds.writer(0)
    for i in range(n):
        writer.write(
            Sample(f"{i:09d}", {"status": "success", "url": f"http://example.invalid/{i}.jpg"}, jpeg_bytes(photo(i, (64, 48))))
        )
    writer.commit({"stage": "download"})
    ds.write_manifest("download", {}, None, expected_shards=1)
    return ds.path


def test_report_html_and_contact_sheet(tmp_path):
    src = captioned(tmp_path / "ds")
    r = run_cli("report", str(src), "--sample", "10", "--png", str(tmp_path / "sheet.png"), "--json")
    assert r.returncode == 0, r.stderr
    written = json.loads(r.stdout)
    assert written["html"] == str(src / "report.html") and written["samples_shown"] == 10
    assert written["audit"] == {"captions": 26, "flagged_shown": 10}  # every caption ends mid-tag: truncated
    html = (src / "report.html").read_text()
    keys = shown_keys(html)
    assert len(keys) == 10 and all(int(k) % 7 != 6 for k in keys)  # only samples with images
    assert html.count("<img ") == 10 + 10  # the sample's, and the flagged captions'
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # text is escaped, never markup
    assert "&lt;b&gt;alt&lt;/b&gt; &amp; text" in html and "original alt-text" in html
    for heading in ("Summary", "Outcomes", "Caption length", "Audit", "Most common errors", "Pipeline", "10 sampled images"):
        assert heading in html
    assert html.index("Caption length") < html.index("<h2>Audit") < html.index("Most common errors")
    assert "http://" not in html and "https://" not in html  # self-contained
    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.size[0] > 6 * 256 and sheet.size[1] > 2 * 256


def test_same_seed_same_samples(tmp_path):
    src = captioned(tmp_path / "ds")
    picks = []
    for seed, name in ((1, "a"), (1, "b"), (2, "c")):
        assert (
            run_cli("report", str(src), "--sample", "8", "--seed", str(seed), "--out", str(tmp_path / f"{name}.html")).returncode
            == 0
        )
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
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
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
    assert loaded == figures == 12 + 12  # the sample, and the flagged captions (all of them truncated)
    assert title == "lenscap report: ds" and bars > 0
    assert all(u.startswith(("file:", "data:")) for u in requests)  # nothing fetched from anywhere


def test_a_report_that_cannot_be_written_is_a_one_line_error(tmp_path):
    """A read-only place (sysfs refuses even root) is the user's to fix: exit 2, one line, no traceback."""
    from conftest import run_cli_here

    from lenscap.demo.datasets import write_image_dataset

    src = write_image_dataset(tmp_path / "ds", 4, per_shard=2)
    code, _, err = run_cli_here("report", str(src.path), "--out", "/sys/lenscap-report.html")
    assert code == 2 and err.strip() == "lenscap: error: cannot write /sys/lenscap-report.html: Permission denied", err


def test_audit_section_shows_planted_flags_beside_their_images(tmp_path):
    src = planted(tmp_path / "ds")
    written = write_report(src, n=10)
    html = (src / "report.html").read_text()
    assert written["audit"] == {"captions": 8, "flagged_shown": len(re.findall(r"alt='flagged (\d+)'", html))}
    audit = html[html.index("<h2>Audit") : html.index("sampled images</h2>")]
    counts = dict(re.findall(r"<tr><td>([a-z_]+)</td><td>(\d+)</td>", audit))
    for flag in FLAGGED.values():
        assert counts[flag] == "1", (flag, counts)
    assert list(counts) == [f for f in FLAGS if f in counts] and "0" not in counts.values()  # fixed order, counted flags only
    assert "<td>a photo of</td><td>4</td><td><span class='bar' style='width:150px'></span> 50.0%" in audit  # top opening
    assert "distinct-1" in audit and "by model and prompt" in audit and "model-b" in audit
    figures = {re.search(r"<div class='key'>(\d+) ", f).group(1): f for f in audit.split("<figure>")[1:]}
    assert set(FLAGGED) <= set(figures)
    for key, flag in FLAGGED.items():
        assert "<img src='data:image/jpeg;base64," in figures[key] and f"alt='flagged {key}'" in figures[key]
        assert f"<span class='flag'>{flag}</span>" in figures[key]
    assert "I&#x27;m sorry, but I can&#x27;t help with that." in audit
    assert "OCR text" in audit and "OPEN 24 HOURS &lt;Tea &amp; Cake&gt;" in audit and "<Tea" not in html
    assert "&quot;Fresh Bread Daily&quot;" in audit


def test_audit_section_only_where_there_are_captions(tmp_path):
    src = uncaptioned(tmp_path / "plain")
    written = write_report(src, n=4)
    html = (src / "report.html").read_text()
    assert written["audit"] is None and "Audit" not in html and written["samples_shown"] == 4
    # Captions, but none answered: nothing for the audit to measure, so no section.
    ds = Dataset.create(tmp_path / "unanswered")
    writer = ds.writer(0)
    for i in range(3):
        writer.write(
            Sample(
                f"{i:09d}",
                {"status": "success", "caption": "Old alt text.", "caption_status": "failed"},
                jpeg_bytes(photo(i, (64, 48))),
            )
        )
    writer.commit({"stage": "caption"})
    written = write_report(ds.path, n=3)
    assert written["audit"] == {"captions": 0, "flagged_shown": 0}
    assert "<h2>Audit" not in (ds.path / "report.html").read_text()


@pytest.mark.parametrize("make", [planted, uncaptioned])
def test_report_with_sample_0(tmp_path, make):
    """--sample 0 once crashed (exit 3): the sample's heap was read before anything went into it."""
    src = make(tmp_path / "ds")
    r = run_cli("report", str(src), "--sample", "0", "--json")
    assert r.returncode == 0, r.stderr
    written = json.loads(r.stdout)
    html = (src / "report.html").read_text()
    assert written["samples_shown"] == 0 and "<img " not in html and "sampled images" not in html
    if make is planted:
        assert written["audit"] == {"captions": 8, "flagged_shown": 0} and "<h2>Audit" in html and "refusal" in html
    else:
        assert written["audit"] is None and "Audit" not in html


def test_audit_thumbnails_read_only_the_shards_holding_the_samples(tmp_path, monkeypatch):
    ds = Dataset.open(planted(tmp_path / "ds"))
    keys = [str(k) for k in ds.read_table(1, columns=["key"]).column("key").to_pylist()]
    samples = [{"key": k, "shard": 1, "row": keys.index(k)} for k in ("000000005", "000000006")]
    located = []
    real = Dataset.image_locations

    def image_locations(self, shard_id, table):
        located.append(shard_id)
        return real(self, shard_id, table)

    monkeypatch.setattr(Dataset, "image_locations", image_locations)
    thumbs = audit_thumbnails(ds, samples)
    assert located == [1] and set(thumbs) == {"000000005", "000000006"}
    assert all(Image.open(io.BytesIO(t)).format == "JPEG" for t in thumbs.values())


def staged(path: Path) -> Path:
    """download -> filter -> caption -> dedup rows: a failed download and a filtered sample are skipped by
    caption (with why), one caption is an error."""
    ds = Dataset.create(path)
    writer = ds.writer(0)
    for i in range(8):
        ok = i != 0
        row = {
            "status": "success" if ok else "failed_to_download",
            "error_message": None if ok else "HTTP Error 404",
            "filter_status": "dropped" if i == 1 else "kept",
            "filter_reason": "min-side" if i == 1 else None,
            "caption": f"A photo number {i} of a quiet street.",
            "alt_text": f"alt {i}",
            "caption_status": "skipped" if i in (0, 1) else "error" if i == 2 else "ok",
            "caption_error": (
                "no image (download status: failed_to_download)"
                if i == 0
                else "no image (filter: min-side)"
                if i == 1
                else "HTTP 500 after 3 tries"
                if i == 2
                else None
            ),
            "dedup_status": "duplicate" if i == 7 else "unique",
        }
        writer.write(Sample(f"{i:09d}", row, jpeg_bytes(photo(i, (64, 48))) if ok else None))
    writer.commit({"stage": "dedup"})
    ds.write_manifest("dedup", {}, None, expected_shards=1)
    manifest = json.loads((ds.path / "lenscap.json").read_text())
    manifest["history"] = [{"stage": s} for s in ("download", "filter", "caption", "dedup")]
    (ds.path / "lenscap.json").write_text(json.dumps(manifest))
    return ds.path


def test_outcomes_in_pipeline_order_and_skips_apart_from_errors(tmp_path):
    from conftest import run_cli_here

    src = staged(tmp_path / "ds")
    code, out, err = run_cli_here("report", str(src), "--sample", "0", "--json")  # in this process, as a user runs it
    assert code == 0, err
    assert json.loads(out)["samples_shown"] == 0
    html = (src / "report.html").read_text()
    outcomes = html[html.index("<h2>Outcomes") :]
    outcomes = outcomes[: outcomes.index("</section>")]
    headings = re.findall(r"<h3>([^<]+)</h3>", outcomes)
    assert headings == ["download status", "filter_status", "caption_status", "dedup_status"]
    errors = html[html.index("Most common errors") :]
    errors = errors[: errors.index("</section>")]
    skipped = html[html.index("<h2>Skipped") :]
    skipped = skipped[: skipped.index("</section>")]
    assert "HTTP 500 after 3 tries" in errors and "HTTP Error 404" in errors and "no image" not in errors
    assert "caption: no image (download status: failed_to_download)" in skipped and "no image (filter: min-side)" in skipped


def test_report_with_sample_0_in_process_with_a_png(tmp_path):
    """--sample 0 once crashed (exit 3): through the CLI in this process, with the contact sheet too."""
    from conftest import run_cli_here

    src = captioned(tmp_path / "ds", 6)
    code, out, err = run_cli_here("report", str(src), "--sample", "0", "--png", str(tmp_path / "sheet.png"), "--json")
    assert code == 0, err
    assert json.loads(out)["samples_shown"] == 0 and (tmp_path / "sheet.png").stat().st_size > 0


def test_report_replaces_only_a_report_it_wrote(tmp_path):
    """``--out``/``--png`` naming an existing file that is not lenscap's report: exit 2, one line, the file
    kept. A report or contact sheet lenscap wrote (today's, or a page from before its mark) is replaced."""
    from conftest import run_cli_here

    from lenscap.demo.datasets import write_image_dataset

    src = write_image_dataset(tmp_path / "ds", 4, per_shard=2)
    precious = tmp_path / "precious.txt"
    precious.write_text("my thesis")
    code, _, err = run_cli_here("report", str(src.path), "--out", str(precious), "--quiet")
    assert (
        code == 2
        and err.strip()
        == f"lenscap: error: {precious} exists and is not a report lenscap wrote; name another file, or move it away first"
    )
    assert precious.read_text() == "my thesis"
    photo = tmp_path / "photo.png"
    Image.new("RGB", (4, 4)).save(photo)
    code, _, err = run_cli_here("report", str(src.path), "--out", str(tmp_path / "r.html"), "--png", str(photo))
    assert code == 2 and f"{photo} exists and is not a report lenscap wrote" in err
    assert not (tmp_path / "r.html").exists(), "refused before anything is written"
    (src.path / "report.html").write_text("<html>my own page</html>")  # the default --out
    assert run_cli_here("report", str(src.path))[0] == 2
    (src.path / "report.html").unlink()

    for _ in range(2):  # its own page and sheet, written again
        code, _, err = run_cli_here("report", str(src.path), "--out", str(tmp_path / "r.html"), "--png", str(tmp_path / "s.png"))
        assert code == 0, err
    old = "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>lenscap report: ds</title></head></html>"
    (tmp_path / "r.html").write_text(old)  # a page lenscap wrote before the generator tag
    assert run_cli_here("report", str(src.path), "--out", str(tmp_path / "r.html"))[0] == 0
    assert "name='generator' content='lenscap report'" in (tmp_path / "r.html").read_text()
