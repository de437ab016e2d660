"""A download that fetched nothing says why, last; a rerun with other fetch options offers --retry-failed;
and ``--retry-failed`` alone replays every option of the run before it (issue 29, items 2 and 3)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from conftest import run_cli, run_cli_here

import lenscap.download.command as download_stage
from lenscap.core.result import JobResult
from lenscap.demo.pictures import jpeg_bytes, scene
from lenscap.demo.server import ImageServer, Route
from lenscap.download.options import FETCH_FIELDS, DownloadOptions

FAST = ["--processes", "1", "--threads", "4", "--timeout", "3", "--retries", "0"]


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_a_refused_list_fails_naming_the_flag_and_retry_failed_alone_then_fetches_it(tmp_path):
    routes = {f"/a/{i}.jpg": Route(jpeg_bytes(scene(i, (48, 32)))) for i in range(19)}
    with ImageServer(routes) as server:
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(server.url(f"/a/{i}.jpg") + "\n" for i in range(20)))  # /a/19.jpg: not there yet
        out = str(tmp_path / "out")

        refused = run_cli("download", str(urls), out, *FAST, "--no-allow-private-network")
        assert refused.returncode == 1, refused.stderr
        assert _lines(refused.stderr)[-1].endswith(
            "lenscap: 20 of 20 refused: loopback address; pass --allow-private-network if that is meant"
        ), refused.stderr
        as_json = run_cli("download", str(urls), out, *FAST, "--no-allow-private-network", "--json")
        summary = json.loads(as_json.stdout)
        assert as_json.returncode == 1 and summary["ok"] is False
        assert summary["errors"]["commonest"] == "refused: loopback address" and summary["errors"]["exceeded"] is True
        assert "--allow-private-network" in summary["errors"]["message"]
        assert "other options" not in as_json.stderr, "the same options again: nothing to hint"

        # The flag alone finds the shards done: it says, in one line, to add --retry-failed.
        rerun = run_cli("download", str(urls), out, *FAST, "--allow-private-network")
        assert rerun.returncode == 1 and server.hits == {}, rerun.stderr
        hint = [line for line in _lines(rerun.stderr) if "--retry-failed" in line and "other options" in line]
        assert len(hint) == 1 and "20 failed downloads" in hint[0] and "--allow-private-network" in hint[0], rerun.stderr

        # --retry-failed alone (no flag appended: the test helpers would add one) replays the recorded flag.
        env = os.environ | {"PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
        alone = [sys.executable, "-m", "lenscap.cli", "download", "--retry-failed", out, "--json"]
        first = subprocess.run(alone, capture_output=True, text=True, env=env, timeout=180, stdin=subprocess.DEVNULL)
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout)["status"] == {"success": 19, "failed_to_download": 1}
        server.routes["/a/19.jpg"] = Route(jpeg_bytes(scene(19, (48, 32))))  # the missing image appears
        second = subprocess.run(alone, capture_output=True, text=True, env=env, timeout=180, stdin=subprocess.DEVNULL)
        assert second.returncode == 0, second.stderr
        assert json.loads(second.stdout)["status"] == {"success": 20}
        assert server.hits["/a/19.jpg"] == 2 and server.hits["/a/0.jpg"] == 1


# Every option of the first run, none at its default: what a retry must keep.
ORIGINAL = DownloadOptions(
    allow_private_network=True,
    timeout=7,
    max_retries=5,
    threads=3,
    processes=2,
    max_error_share=0.9,
    per_host_rps=2.5,
    per_host_concurrency=3,
    executor="ray",
    ray_address="auto",
    url_col="link",
    caption_col="alt",
    extra_cols="a,b",
    samples_per_shard=7,
    image_size=256,
    resize_mode="border",
    upscale=True,
    min_side=10,
    max_aspect=3.0,
    max_pixels=1000,
    user_agent_token="me",
    respect_opt_out=False,
    encode_quality=80,
    ignore_robots=True,
    contact="mailto:me@example.org",
    user_agent="ExampleBot/2",
)
PER_RUN = {"retry_failed", "overwrite"}  # what one invocation does, not how its URLs are fetched
KEPT = [f.name for f in dataclasses.fields(DownloadOptions) if f.name not in PER_RUN]


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """An output whose first run had ``ORIGINAL``'s options (no fetching: only what a run records), and
    the options each later retry runs with."""
    used: list[DownloadOptions] = []

    def fake(job, options):
        used.append(options)
        return JobResult("download", str(job.out.location), failed_shards={0: "not run here"})

    monkeypatch.setattr(download_stage, "_download", lambda job, source, options, progress, img2dataset: fake(job, options))
    monkeypatch.setattr(download_stage, "_retry_failed", lambda job, options, progress: fake(job, options))
    monkeypatch.setattr(download_stage, "_cluster", lambda options: None)  # no Ray started for executor="ray"
    (tmp_path / "urls.csv").write_text("link,alt,a,b\nhttp://example.com/a.jpg,a,1,2\n")
    download_stage.download(str(tmp_path / "urls.csv"), tmp_path / "out", ORIGINAL)
    used.clear()
    return tmp_path / "out", used


@pytest.mark.parametrize("name", KEPT)
def test_retry_failed_alone_replays_every_recorded_option(recorded, name):
    out, used = recorded
    download_stage.run_download(None, out, DownloadOptions(retry_failed=True), given={"retry_failed"})
    assert getattr(used[-1], name) == getattr(ORIGINAL, name)
    if name in FETCH_FIELDS:  # one given on this run wins, even at its default value
        default = next(f.default for f in dataclasses.fields(DownloadOptions) if f.name == name)
        download_stage.run_download(None, out, DownloadOptions(retry_failed=True), given={"retry_failed", name})
        assert getattr(used[-1], name) == default


def test_the_command_line_replays_what_it_was_not_given(recorded):
    out, used = recorded
    code, _, err = run_cli_here("download", "--retry-failed", str(out), "--timeout", "10", "--no-allow-private-network")
    assert code == 1, err
    options = used[-1]
    assert (options.timeout, options.allow_private_network) == (10, False), "typed, at the default: this run's"
    assert (options.threads, options.max_retries, options.processes) == (3, 5, 2), "not typed: the recorded ones"
