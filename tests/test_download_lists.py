"""What a user's own URL list holds early on: a header row, a repeated URL, a line that is not UTF-8, and
no captions (issue 29, item 8). One download through img2dataset from the loopback server."""

from __future__ import annotations

import json

from conftest import run_cli

from lenscap.core.dataset import Dataset
from lenscap.demo.pictures import jpeg_bytes, scene
from lenscap.demo.server import ImageServer, Route
from lenscap.download.command import NOT_UTF8_MESSAGE
from lenscap.download.inputs import NOT_UTF8


def images_asked(server: ImageServer) -> dict[str, int]:
    """The server's hits but for robots.txt, which a download asks once per host before any image."""
    return {path: n for path, n in server.hits.items() if path != "/robots.txt"}


def test_a_headed_list_with_a_repeat_and_a_bad_line_downloads_each_url_once(tmp_path):
    routes = {f"/l/{i}.jpg": Route(jpeg_bytes(scene(i, (40, 30)))) for i in range(5)}
    with ImageServer(routes) as server:
        five = [server.url(p).encode() for p in routes]
        lines = [b"url", *five[:3], five[0], *five[3:], b"http://127.0.0.1/\xff.jpg", five[0]]
        (tmp_path / "urls.txt").write_bytes(b"".join(line + b"\n" for line in lines))
        out = tmp_path / "out"
        flags = ["--samples-per-shard", "3", "--processes", "1", "--threads", "2", "--json"]
        res = run_cli("download", str(tmp_path / "urls.txt"), str(out), *flags)
        assert res.returncode == 0, res.stderr
        assert "its first line is a header (url), not a URL: skipped" in res.stderr
        summary = json.loads(res.stdout)
        assert summary["status"] == {"success": 5, "duplicate": 2, "failed_to_download": 1}
        assert summary["errors"]["of"] == 6, "a repeat is not a download that was tried"
        assert images_asked(server) == {p: 1 for p in routes}, "each URL fetched once"

        ds = Dataset.open(out)
        rows = [r for i in ds.completed_ids() for r in ds.read_table(i).to_pylist()]
        assert len(rows) == 8, "every line but the header is a row"
        first = rows[0]
        assert first["status"] == "success" and first["url"] == five[0].decode()
        repeats = [r for r in rows if r["status"] == "duplicate"]
        assert [(r["url"], r["error_message"], r["image_size"]) for r in repeats] == [
            (five[0].decode(), f"duplicate of {first['key']}", None)
        ] * 2
        assert rows[3] == repeats[0] and rows[3]["key"] != first["key"], "in its place in the list, another shard"
        bad = next(r for r in rows if r["url"].startswith(NOT_UTF8))
        assert bad["status"] == "failed_to_download" and bad["error_message"] == NOT_UTF8_MESSAGE
        assert bad["url"] == NOT_UTF8 + "http://127.0.0.1/\\xff.jpg"

        # A retry asks neither the repeats nor the bad line again.
        again = run_cli("download", "--retry-failed", str(out), "--json")
        assert again.returncode == 0 and json.loads(again.stdout)["status"] == summary["status"], again.stderr
        assert images_asked(server) == {p: 1 for p in routes}

        shown = run_cli("inspect", str(out))
        assert shown.returncode == 0 and "no captions" in shown.stdout and "caption words mean" not in shown.stdout
        info = json.loads(run_cli("inspect", str(out), "--json").stdout)
        assert info["caption_words"]["count"] == 0 and info["status"]["duplicate"] == 2
        assert info["skips"] == {"download: a repeated URL, fetched once for its first row": 2}
        assert list(info["errors"]) == [NOT_UTF8_MESSAGE], "a repeat is no error"


def test_a_recipe_s_download_line_counts_repeats_apart_from_failures():
    from lenscap.run.outcomes import outcome

    status = {"success": 5, "duplicate": 2, "failed_to_download": 1}
    assert outcome("download", [], {"samples": 8, "status": status}) == (
        "8 URLs, 5 downloaded, 1 failed (1 failed_to_download), 2 repeats of a URL above"
    )
