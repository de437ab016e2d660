"""SIGKILL a running download at an arbitrary point; the rerun finishes it with the same result."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

from lenscap.core.dataset import Dataset
from lenscap.demo.pictures import jpeg_bytes, scene
from lenscap.demo.server import ImageServer, Route
from lenscap.download.command import download
from lenscap.download.options import DownloadOptions

ARGS = ["--samples-per-shard", "10", "--processes", "1", "--threads", "2", "--allow-private-network", "--quiet"]


def _shard_contents(ds: Dataset) -> dict[int, tuple[list[dict], dict[str, bytes]]]:
    """Rows and tar members; each row's offset checked against its image, then left out (img2dataset
    writes a tar in the order downloads finish, so two runs place the same images differently)."""
    out = {}
    for shard_id in ds.completed_ids():
        with tarfile.open(ds.tar_path(shard_id)) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        rows = ds.read_table(shard_id).to_pylist()
        images = {s.key: s.image for s in ds.iter_samples(shard_id) if s.has_image}
        assert images == {name[:-4]: data for name, data in members.items() if name.endswith(".jpg")}
        out[shard_id] = ([{k: v for k, v in r.items() if k != "image_offset"} for r in rows], members)
    return out


def _img2dataset_session(lenscap_pid: int) -> int | None:
    """The PID of the img2dataset subprocess that ``lenscap_pid`` started (it leads its own session)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(b"lenscap.download.img2dataset_hooks" in part for part in cmd) and str(lenscap_pid).encode() in cmd:
                return int(entry.name)
    return None


def _session_members(sid: int) -> list[int]:
    """Live processes of session ``sid``: img2dataset, its logger and its spawned workers."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: the session id
                members.append(int(entry.name))
    return members


def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path):
    routes = {f"/i/{i}.jpg": Route(jpeg_bytes(scene(i, (64, 48))), delay_s=0.03) for i in range(200)}
    routes["/i/404.jpg"] = Route(b"no", "text/plain", 404)
    with ImageServer(routes) as server:
        urls = [server.url(p) for p in routes]
        (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")

        reference = tmp_path / "reference"
        opts = DownloadOptions(samples_per_shard=10, processes=1, threads=2, allow_private_network=True)
        assert download(str(tmp_path / "urls.txt"), reference, opts).exit_code == 0
        hits_after_reference = dict(server.hits)

        out = tmp_path / "killed"
        cmd = [sys.executable, "-m", "lenscap.cli", "download", str(tmp_path / "urls.txt"), str(out), *ARGS]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(out.glob("*_stats.json"))) < 4:
            time.sleep(0.02)
        session = _img2dataset_session(proc.pid)
        assert session is not None and len(_session_members(session)) >= 2, "img2dataset and its workers run"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done_at_kill = Dataset(out).completed_ids()
        assert 4 <= len(done_at_kill) < 21, "killed mid-way"

        # img2dataset and its workers die with lenscap: nothing keeps writing behind a rerun's back.
        # The server now answers slowly, so a survivor would still be at work after the deadline.
        for route in routes.values():
            route.delay_s = 2.0
        deadline = time.monotonic() + 3
        while _session_members(session) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _session_members(session) == []
        for route in routes.values():
            route.delay_s = 0.03

        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr

    assert _shard_contents(Dataset(out)) == _shard_contents(Dataset(reference))
    # Shards complete before the kill were not downloaded again.
    for shard_id in done_at_kill:
        for i in range(10):
            url_path = list(routes)[shard_id * 10 + i]
            assert server.hits[url_path] - hits_after_reference[url_path] == 1, url_path
    manifest = Dataset(out).read_manifest()
    assert manifest["complete"] and manifest["counts"]["samples"] == 201


@contextlib.contextmanager
def _download_under_way(tmp_path: Path):
    """A CLI download of 120 slow images in 12 shards, yielded once 2 shards are complete."""
    routes = {f"/j/{i}.jpg": Route(jpeg_bytes(scene(i, (48, 48))), delay_s=0.05) for i in range(120)}
    with ImageServer(routes) as server:
        (tmp_path / "urls.txt").write_text("\n".join(server.url(p) for p in routes) + "\n")
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "lenscap.cli", "download", str(tmp_path / "urls.txt"), str(out), *ARGS]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(out.glob("*_stats.json"))) < 2:
            time.sleep(0.02)
        yield proc, out, cmd


def _rerun_finishes(cmd: list[str], out: Path) -> None:
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert Dataset(out).completed_ids() == list(range(12))
    assert Dataset(out).read_manifest()["counts"]["status"] == {"success": 120}


def test_img2dataset_dying_mid_run_exits_1_and_a_rerun_finishes(tmp_path):
    with _download_under_way(tmp_path) as (proc, out, cmd):
        session = _img2dataset_session(proc.pid)
        assert session is not None
        os.killpg(session, signal.SIGKILL)  # img2dataset dies; lenscap lives
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 1, stderr
        assert "did not complete" in stderr and "rerun the same command" in stderr  # even with --quiet
        assert 2 <= len(Dataset(out).completed_ids()) < 12
        _rerun_finishes(cmd, out)


def test_ctrl_c_exits_130_ends_img2dataset_and_a_rerun_finishes(tmp_path):
    with _download_under_way(tmp_path) as (proc, out, cmd):
        session = _img2dataset_session(proc.pid)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert "interrupted; rerun the same command to resume" in stderr and "Traceback" not in stderr
        assert session is not None
        deadline = time.monotonic() + 3  # SIGKILLed workers take a moment to be gone
        while _session_members(session) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _session_members(session) == []
        _rerun_finishes(cmd, out)


def test_sigkill_mid_lopsided_multi_host_job_then_rerun_fetches_each_image_once(tmp_path):
    """A list grouped by host (60 URLs on one, 10 on each of 4 others, one missing), planned so that
    hosts interleave: after a SIGKILL the rerun keeps the plan, asks nothing of the shards complete at
    the kill, and the output holds every image exactly once."""
    hosts = ["127.0.0.2"] * 60 + [f"127.0.0.{3 + h}" for h in range(4) for _ in range(10)]
    routes = {f"/h{h}/{i}.jpg": Route(jpeg_bytes(scene(i, (48, 40))), delay_s=0.03) for i, h in enumerate(hosts)}
    with ImageServer(routes, hosts=True) as server:
        urls = [server.url(p, host=h) for p, h in zip(routes, hosts)] + [server.url("/missing.jpg", host="127.0.0.3")]
        (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "lenscap.cli", "download", str(tmp_path / "urls.txt"), str(out), *ARGS]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(out.glob("*_stats.json"))) < 3:
            time.sleep(0.02)
        session = _img2dataset_session(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while session is not None and _session_members(session) and time.monotonic() < deadline:
            time.sleep(0.05)
        done_at_kill = Dataset(out).completed_ids()
        assert 3 <= len(done_at_kill) < 11, "killed mid-way"
        # The plan spread the big host: every shard complete at the kill holds it and another host.
        for shard_id in done_at_kill:
            shard_hosts = {u.split("/")[2].split(":")[0] for u in Dataset(out).read_table(shard_id).column("url").to_pylist()}
            assert "127.0.0.2" in shard_hosts and len(shard_hosts) >= 2, shard_hosts
        fetched = {r["url"] for i in done_at_kill for r in Dataset(out).read_table(i).to_pylist()}
        asked_before = len(server.requests)

        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        asked_again = {server.url(r.path, host=r.host) for r in server.requests[asked_before:]}

    assert not asked_again & fetched, "no URL of a shard complete at the kill is requested again"
    ds = Dataset(out)
    rows = [r for i in ds.completed_ids() for r in ds.read_table(i).to_pylist()]
    assert sorted(r["url"] for r in rows) == sorted(urls), "every URL of the list once"
    images: Counter[str] = Counter()
    for shard_id in ds.completed_ids():
        with tarfile.open(ds.tar_path(shard_id)) as tar:
            images.update(m.name for m in tar if m.name.endswith(".jpg"))
    successes = {r["url"] for r in rows if r["status"] == "success"}
    assert successes == set(urls[:-1]), "every image downloaded; the missing one failed"
    url_of = {r["key"]: r["url"] for r in rows}
    assert set(images.values()) == {1} and sorted(url_of[name[:-4]] for name in images) == sorted(successes), (
        "every image exactly once"
    )
