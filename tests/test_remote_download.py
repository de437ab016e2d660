"""`lenscap download` into an S3 bucket (a local S3-compatible store: moto's server), through the CLI:
the same shards as a local download; a SIGKILL mid-run, or a failure mid-upload, then a rerun
finishes it without downloading anything again; `inspect` reads it; `--retry-failed` merges into
the remote shards; and on Ray, img2dataset stages in the bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from types import SimpleNamespace

import pytest
from conftest import run_cli

from lenscap.core.dataset import Dataset
from lenscap.demo.pictures import jpeg_bytes, scene
from lenscap.demo.server import Route
from lenscap.inspect.summary import inspect_dataset

SHARDS = 10
ARGS = (
    "--samples-per-shard",
    "5",
    "--processes",
    "1",
    "--threads",
    "4",
    "--timeout",
    "5",
    "--retries",
    "0",
    "--allow-private-network",
    "--quiet",
)
COLUMNS = ("status", "error_message", "width", "height", "sha256")
SHARD_FILES = {f"{i:05d}{ext}" for i in range(SHARDS) for ext in (".tar", ".parquet", "_stats.json")}
# A finished download also holds its manifest, and its card (README.md) for datasets.load_dataset.
FINISHED = SHARD_FILES | {"lenscap.json", "README.md"}
SECRET = "lenscap-test-secret"  # the store's test secret key (conftest's s3_store)


@pytest.fixture
def bucket(s3_store, tmp_path, monkeypatch):
    """A fresh prefix in the bucket as an s3:// URL, and a local work directory of this test's own."""
    monkeypatch.setenv("LENSCAP_WORK_DIR", str(tmp_path / "work"))
    prefix = f"lenscap/t{uuid.uuid4().hex[:8]}"
    yield f"s3://{prefix}"
    if s3_store.exists(prefix):
        s3_store.rm(prefix, recursive=True)


@pytest.fixture(scope="module")
def url_list(image_server, tmp_path_factory):
    """50 URLs in 10 shards of 5. The first 2 shards: successes, bad bytes, an opt-out, a 404, and
    two URLs that answer 503 once (``reset()`` them before a run they should fail in). Then slow
    images, so that a run can be killed mid-way."""
    flaky = [f"/remote-dl/flaky/{i}.jpg" for i in range(2)]
    slow = [f"/remote-dl/slow/{i}.jpg" for i in range(40)]
    for i, path in enumerate(flaky):
        image_server.routes[path] = Route(jpeg_bytes(scene(200 + i, (64, 48))), fail_first=1)
    for i, path in enumerate(slow):
        image_server.routes[path] = Route(jpeg_bytes(scene(300 + i, (48, 48))), delay_s=0.1)
    paths = [
        "/ok/0.jpg",
        "/html.jpg",
        flaky[0],
        "/truncated.jpg",
        "/noai.jpg",
        "/remote-dl/missing.jpg",
        "/ok/1.jpg",
        flaky[1],
        "/small.png",
        "/big.jpg",
        *slow,
    ]
    file = tmp_path_factory.mktemp("urls") / "urls.txt"
    file.write_text("".join(image_server.url(p) + "\n" for p in paths))

    def reset() -> None:
        for p in flaky:
            image_server.hits.pop(p, None)

    return SimpleNamespace(file=file, paths=paths, flaky=flaky, reset=reset)


@pytest.fixture(scope="module")
def reference(url_list, tmp_path_factory):
    """A local download of the list: its shards before and after --retry-failed, and its directory."""
    out = tmp_path_factory.mktemp("local") / "raw"
    url_list.reset()
    r = run_cli("download", str(url_list.file), str(out), *ARGS)
    assert r.returncode == 0, r.stderr
    before = snapshot(str(out))
    r = run_cli("download", "--retry-failed", str(out), *ARGS)
    assert r.returncode == 0, r.stderr
    return SimpleNamespace(before=before, after=snapshot(str(out)), path=out)


def snapshot(location: str) -> dict[int, tuple[dict[str, dict], dict[str, bytes], dict]]:
    """Each complete shard: its rows by key (the outcome columns), its tar members, its counts."""
    ds = Dataset.open(location)
    shards = {}
    for shard_id in ds.completed_ids():
        rows = {r["key"]: {c: r.get(c) for c in COLUMNS} for r in ds.read_table(shard_id).to_pylist()}
        with ds.open_tar(shard_id) as f, tarfile.open(fileobj=f) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
        stats = ds.read_stats(shard_id)
        shards[shard_id] = (rows, members, {k: stats.get(k) for k in ("count", "status", "retried")})
    return shards


def remote_names(s3_store, url: str) -> set[str]:
    try:
        return {p.rsplit("/", 1)[-1] for p in s3_store.ls(url.removeprefix("s3://"), detail=False, refresh=True)}
    except FileNotFoundError:
        return set()


def test_sigkill_then_rerun_into_s3_equals_local_then_retry_failed_and_inspect(
    tmp_path, bucket, s3_store, url_list, reference, image_server
):
    out = f"{bucket}/raw"
    cmd = [sys.executable, "-m", "lenscap.cli", "download", str(url_list.file), out, *ARGS, "--json"]
    hits_before = dict(image_server.hits)
    url_list.reset()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sum(n.endswith("_stats.json") for n in remote_names(s3_store, out)) < 3:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)  # img2dataset and its workers die with it (test_download_resume.py)
    proc.wait()
    done_at_kill = Dataset.open(out).completed_ids()
    assert 3 <= len(done_at_kill) < SHARDS, "killed mid-way"

    for p in url_list.flaky:  # one fetched again (its shard was not complete) is to fail again, as in the reference
        if url_list.paths.index(p) // 5 not in done_at_kill:
            image_server.hits.pop(p, None)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["out_dir"] == out
    assert snapshot(out) == reference.before
    for shard_id in done_at_kill:  # uploaded before the kill: not downloaded again
        for p in set(url_list.paths[shard_id * 5 : (shard_id + 1) * 5]) - set(url_list.flaky):
            assert image_server.hits[p] - hits_before.get(p, 0) == 1, p

    # Only the dataset's files are remote; the job state is in its work directory here, which keeps no shard.
    assert remote_names(s3_store, out) == FINISHED
    work = Dataset(out).work_dir
    assert work.parent.parent == tmp_path / "work" and (work / "claim.json").exists()
    assert not list(work.glob("staging/*")) and not (work / "img2dataset").exists()
    manifest = Dataset.open(out).read_manifest()
    assert manifest["input"] == str(url_list.file) and manifest["complete"] and manifest["counts"]["samples"] == 50

    # --retry-failed alone, on the remote output: the 503s succeed now and are merged into their shards
    r = run_cli("download", "--retry-failed", out, *ARGS)
    assert r.returncode == 0, r.stderr
    assert snapshot(out) == reference.after
    assert [reference.after[i][2]["retried"] for i in range(3)] == [1, 1, None]
    assert remote_names(s3_store, out) == FINISHED
    assert not list(work.glob("staging/*")) and not (work / "retry").exists()

    # inspect reads it remotely and counts what it counts locally
    r = run_cli("inspect", out, "--json")
    assert r.returncode == 0, r.stderr
    remote_info, local_info = json.loads(r.stdout), inspect_dataset(reference.path)
    assert remote_info["path"] == out and remote_info["samples"] == 50
    for key in ("shards", "status", "columns", "errors"):
        assert remote_info[key] == local_info[key], key

    # The store's secret is in the environment of every process, and in nothing they wrote.
    written = b"".join(s3_store.cat_file(p) for p in s3_store.find(out.removeprefix("s3://")) if p.endswith(".json"))
    written += b"".join(p.read_bytes() for p in work.rglob("*") if p.is_file())
    assert SECRET.encode() not in written and SECRET not in r.stdout + r.stderr


def test_a_failure_mid_upload_leaves_the_shard_incomplete_and_the_rerun_uploads_it(
    bucket, s3_store, url_list, reference, image_server, monkeypatch
):
    """The upload of the last shard dies before its stats file (the completion marker) is up: that shard
    is not complete remotely, and the rerun finishes its commit from the copy staged here instead of
    downloading it (so it does not start img2dataset at all)."""
    from lenscap.download.command import download
    from lenscap.download.options import DownloadOptions

    out = f"{bucket}/raw"
    real_pipe = s3_store.pipe_file  # the one cached filesystem instance, which the stage's Dataset uses too

    def dies_on_stats(path, *args, **kwargs):
        if path.endswith(f"{SHARDS - 1:05d}_stats.json"):
            raise OSError("connection reset (simulated)")
        return real_pipe(path, *args, **kwargs)

    def opts() -> DownloadOptions:
        return DownloadOptions(samples_per_shard=5, processes=1, threads=4, timeout=5, max_retries=0, allow_private_network=True)

    url_list.reset()
    monkeypatch.setattr(s3_store, "pipe_file", dies_on_stats)
    with pytest.raises(OSError, match="simulated"):
        download(str(url_list.file), out, opts())
    monkeypatch.setattr(s3_store, "pipe_file", real_pipe)
    remote = Dataset.open(out)
    last = SHARDS - 1
    assert remote.completed_ids() == list(range(last)) and s3_store.exists(f"{out.removeprefix('s3://')}/{last:05d}.tar")
    assert (remote.work_dir / "pending" / f"{last:05d}.json").exists()  # its commit, to be finished

    hits = dict(image_server.hits)
    result = download(str(url_list.file), out, opts())
    assert result.exit_code == 0 and result.out_dir == out
    assert snapshot(out) == reference.before
    assert image_server.hits == hits, "the last shard was uploaded, not downloaded again"
    assert not list(remote.work_dir.glob("staging/*")) and not list(remote.work_dir.glob("pending/*"))


def test_download_into_s3_on_ray_stages_in_the_bucket(bucket, s3_store, url_list, reference, ray_cluster):
    out = f"{bucket}/ray"
    url_list.reset()
    r = run_cli(
        "download",
        str(url_list.file),
        out,
        *ARGS,
        "--retry-failed",
        "--executor",
        "ray",
        "--ray-address",
        ray_cluster,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert snapshot(out) == reference.after
    assert remote_names(s3_store, out) == FINISHED  # the staging in the bucket is gone
    from lenscap.download.command import _Job

    assert _Job(Dataset(out), cluster=ray_cluster).staging == f"{out}/.lenscap/img2dataset"  # where every node can write
