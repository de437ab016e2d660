"""--executor ray on a local 2-CPU cluster: each stage's output equals the local executor's, a
worker killed mid-shard is retried without duplicates, and no paid request is repeated."""

from __future__ import annotations

import os
import signal
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli

from lenscap.core.dataset import Dataset
from lenscap.core.job import run_stage
from lenscap.core.record import Sample
from lenscap.core.stage import ShardStage
from lenscap.demo.datasets import write_image_dataset
from lenscap.testing.fake_openai import FakeOpenAI, FakeSettings

ray = pytest.importorskip("ray")
# Ray workers cannot import this test module: its stages travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

KEY = "sk-test-RAY-0123456789"


def rows(path: Path) -> list[dict]:
    ds = Dataset(path)
    return [r for i in ds.completed_ids() for r in ds.read_table(i).to_pylist()]


def tars(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).glob("*.tar"))}


def members(path: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(Path(path).rglob("*.tar")):
        with tarfile.open(p) as tar:
            out.update({m.name: tar.extractfile(m).read() for m in tar if m.isfile()})
    return out


def own_cache(tmp_path: Path, name: str) -> dict[str, str]:
    """A response cache of one run's own. Two runs compared row for row must not share one: the second
    would read the first's captions from it (``caption_cached`` true) instead of writing its own."""
    return {"LENSCAP_CACHE_DIR": str(tmp_path / f"{name}-cache")}


def both(tmp_path: Path, ray_cluster: str, *args: str, out: str) -> tuple[Path, Path]:
    """Run ``lenscap ARGS OUT`` with the local executor and with Ray, each with its own response cache;
    both must succeed."""
    local, on_ray = tmp_path / f"{out}-local", tmp_path / f"{out}-ray"
    r = run_cli(*args, str(local), "--quiet", "--processes", "2", env=own_cache(tmp_path, local.name))
    assert r.returncode == 0, r.stderr
    r = run_cli(
        *args, str(on_ray), "--quiet", "--executor", "ray", "--ray-address", ray_cluster, env=own_cache(tmp_path, on_ray.name)
    )
    assert r.returncode == 0, r.stderr
    return local, on_ray


def test_the_test_cluster_is_on_loopback(ray_cluster):
    """Tests keep their traffic on this machine: the cluster's GCS, its node and its workers are at
    127.0.0.1, and no process of the cluster listens on another address (the machine's network address)."""
    assert ray_cluster.rsplit(":", 1)[0] == "127.0.0.1"
    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}

    @ray.remote
    def where() -> str:
        return ray.util.get_node_ip_address()

    assert ray.get(where.remote()) == "127.0.0.1"
    try:
        import psutil  # Ray's dependency (its own copy, on sys.path once ray is imported)
    except ImportError:
        return
    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    listening = [c.laddr for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listening, "no listening socket of the cluster's processes was found: the test proves nothing"
    assert {a.ip.removeprefix("::ffff:") for a in listening} == {"127.0.0.1"}, listening


LOCAL_RAY = """
import json, os, subprocess, sys
from lenscap.core.executors import RayExecutor, SINGLE_MACHINE_ENV
executor = RayExecutor()  # no address: lenscap starts a Ray of its own
address = executor.cluster_address()
ray = executor.connect()
# A process started without Ray's single-machine mode joins by the loopback address (img2dataset's, for one).
env = {k: v for k, v in os.environ.items() if k != SINGLE_MACHINE_ENV}
join = ("from lenscap.core.executors import connect_ray; ray = connect_ray(sys.argv[1]); "
        "print(ray.get(ray.remote(lambda: ray.util.get_node_ip_address()).remote()))")
joined = subprocess.run([sys.executable, "-c", "import sys; " + join, address], env=env, capture_output=True,
                        text=True, timeout=240)
print(json.dumps({"address": address, "nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
                  "joined": joined.stdout.strip(), "join_error": joined.stderr[-2000:] if joined.returncode else ""}))
"""


def test_a_ray_lenscap_starts_is_on_loopback(tmp_path):
    """``--executor ray`` without an address: the Ray lenscap starts is at 127.0.0.1, and another process
    (not in Ray's single-machine mode) joins it by that address."""
    import json
    import subprocess

    from lenscap.core.executors import SINGLE_MACHINE_ENV

    env = {k: v for k, v in os.environ.items() if k not in (SINGLE_MACHINE_ENV, "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-c", LOCAL_RAY], env=env, capture_output=True, text=True, timeout=420, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["address"].startswith("127.0.0.1:") and got["nodes"] == ["127.0.0.1"], got
    assert got["joined"] == "127.0.0.1", got


def test_every_stage_on_ray_writes_what_the_local_executor_writes(tmp_path, ray_cluster):
    src = write_image_dataset(tmp_path / "in", 36, per_shard=8, failed=lambda i: i == 3).path

    local, on_ray = both(
        tmp_path, ray_cluster, "filter", str(src), "--min-side", "100", "--annotate", "blur", "--copy-images", out="filter"
    )
    assert rows(local) == rows(on_ray) and len(rows(on_ray)) == 36
    assert tars(local) == tars(on_ray) and len(tars(on_ray)) == 5  # byte for byte
    assert Dataset(on_ray).read_manifest()["complete"]

    local, on_ray = both(tmp_path, ray_cluster, "caption", str(local), "--backend", "describe", out="caption")
    assert rows(local) == rows(on_ray)
    assert not any(r["caption_cached"] for r in rows(on_ray))  # captioned on the workers, not read from a cache
    assert tars(on_ray) == {}  # rows only: the images are the filter output's
    assert {r["caption_status"] for r in rows(on_ray)} >= {"ok"}

    local, on_ray = both(tmp_path, ray_cluster, "shard", str(local), "--samples-per-shard", "7", out="shard")
    assert members(local) == members(on_ray) and members(on_ray)
    assert (local / "shards.json").read_text() == (on_ray / "shards.json").read_text()


def test_a_rerun_moves_between_executors(tmp_path, ray_cluster):
    """Half the shards locally, the rest on Ray: the completion markers are the same."""
    src = write_image_dataset(tmp_path / "in", 24, per_shard=6).path
    whole, mixed = tmp_path / "whole", tmp_path / "mixed"
    assert run_cli("filter", str(src), str(whole), "--min-side", "10", "--quiet").returncode == 0
    assert run_cli("filter", str(src), str(mixed), "--min-side", "10", "--quiet").returncode == 0
    for shard_id in (1, 3):
        Dataset(mixed).stats_path(shard_id).unlink()
    r = run_cli("filter", str(src), str(mixed), "--min-side", "10", "--json", "--executor", "ray", "--ray-address", ray_cluster)
    assert r.returncode == 0, r.stderr
    assert rows(mixed) == rows(whole) and tars(mixed) == tars(whole)


class KillOnce(ShardStage):
    """Upper-cases captions; the first worker to reach sample ``victim`` dies by SIGKILL, once."""

    name = "upper"

    def __init__(self, victim: str, marker: str, kill: bool = True) -> None:
        self.victim, self.marker, self.kill = victim, marker, kill

    def process(self, sample: Sample) -> Sample:
        if self.kill and sample.key == self.victim:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        sample.row["caption"] = (sample.row.get("caption") or "").upper()
        return sample


def test_a_worker_killed_mid_shard_is_retried_without_duplicates(tmp_path, ray_cluster):
    from lenscap.core.executors import RayExecutor

    src = write_image_dataset(tmp_path / "in", 30, per_shard=10).path
    victim = Dataset(src).read_table(1).column("key")[4].as_py()
    marker = tmp_path / "killed"
    expected = run_stage(KillOnce(victim, str(marker), kill=False), src, tmp_path / "local")
    result = run_stage(KillOnce(victim, str(marker)), src, tmp_path / "ray", executor=RayExecutor(max_retries=2))
    assert marker.exists(), "the worker was never killed: the test proves nothing"
    assert result.exit_code == 0 and result.failed_shards == {}
    got = rows(tmp_path / "ray")
    assert len({r["key"] for r in got}) == len(got) == 30
    assert got == rows(tmp_path / "local") and expected.samples == 30
    assert tars(tmp_path / "ray") == tars(tmp_path / "local")
    assert not list((tmp_path / "ray").glob(".*.tmp"))


def test_a_worker_killed_for_good_fails_its_shard_only(tmp_path, ray_cluster):
    """Out of retries: the shard is reported failed (exit code 1), the others are kept; a rerun finishes."""
    from lenscap.core.executors import RayExecutor

    src = write_image_dataset(tmp_path / "in", 20, per_shard=10).path
    victim = Dataset(src).read_table(0).column("key")[2].as_py()
    marker = tmp_path / "killed"
    result = run_stage(KillOnce(victim, str(marker)), src, tmp_path / "out", executor=RayExecutor(max_retries=0))
    assert result.exit_code == 1 and list(result.failed_shards) == [0]
    assert "died" in result.failed_shards[0].lower() or "worker" in result.failed_shards[0].lower(), result.failed_shards
    assert Dataset(tmp_path / "out").completed_ids() == [1]
    result = run_stage(KillOnce(victim, str(marker)), src, tmp_path / "out", executor=RayExecutor(max_retries=0))
    assert result.exit_code == 0 and len(rows(tmp_path / "out")) == 20


def _killing_backend(marker: str, after: int) -> Any:
    """The openai backend, whose worker dies right after its ``after``-th caption arrives, once."""
    from lenscap.caption.backends.openai_chat import OpenAIChatBackend

    class KillingBackend(OpenAIChatBackend):
        def caption_all(self, requests, on_result):  # noqa: ANN001
            seen = 0

            def record(result):  # noqa: ANN001
                nonlocal seen
                on_result(result)  # journaled first: that caption is paid for and kept
                seen += 1
                if seen == after:
                    try:
                        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    except FileExistsError:
                        return
                    os.kill(os.getpid(), signal.SIGKILL)

            super().caption_all(requests, record)

    return KillingBackend


def test_a_killed_caption_worker_repeats_no_paid_request(tmp_path, ray_cluster, monkeypatch):
    from lenscap.caption.prompts import load_prompt
    from lenscap.caption.stage import CaptionStage
    from lenscap.core.executors import RayExecutor

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    src = write_image_dataset(tmp_path / "in", 24, per_shard=8).path
    marker = tmp_path / "killed"
    with FakeOpenAI(FakeSettings(api_key=KEY)) as server:
        backend = _killing_backend(str(marker), after=3).from_options(
            {"base_url": [server.base_url], "concurrency": "1", "model": "gpt-4.1-mini"}
        )
        stage = CaptionStage(backend, load_prompt("short"), cache_dir=None)
        result = run_stage(stage, src, tmp_path / "out", executor=RayExecutor(max_retries=2))
        stats = server.stats()
    assert marker.exists(), "the worker was never killed: the test proves nothing"
    assert result.exit_code == 0
    got = rows(tmp_path / "out")
    assert len(got) == 24 and {r["caption_status"] for r in got} == {"ok"}
    # One request per image, the killed worker's three journaled captions included: none asked twice.
    assert stats["requests"] == 24
    assert set(stats["image_successes"].values()) == {1}
    for f in (tmp_path / "out").rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes()


def test_download_on_ray_equals_local(tmp_path, ray_cluster, image_server):
    urls = tmp_path / "urls.txt"
    paths = [f"/ok/{i}.jpg" for i in range(8)] + ["/html.jpg", "/truncated.jpg", "/missing.jpg", "/big.jpg"]
    urls.write_text("".join(image_server.url(p) + "\n" for p in paths))
    common = ("download", str(urls))
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    r = run_cli(*common, str(local), "--samples-per-shard", "5", "--processes", "2", "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr
    r = run_cli(
        *common,
        str(on_ray),
        "--samples-per-shard",
        "5",
        "--executor",
        "ray",
        "--ray-address",
        ray_cluster,
        "--quiet",
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert Dataset(on_ray).completed_ids() == [0, 1, 2]
    columns = ("key", "url", "status", "error_message", "width", "height", "sha256")
    pick = [{c: r.get(c) for c in columns} for r in rows(on_ray)]
    assert pick == [{c: r.get(c) for c in columns} for r in rows(local)]
    assert sum(r["status"] == "success" for r in pick) == 9
    assert members(local) == members(on_ray)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--ray-address", "auto"), "--ray-address needs --executor ray"),
        (("--executor", "spark"), "--executor must be one of local, ray"),
        (("--executor", "ray", "--ray-address", "127.0.0.1:9"), "cannot reach the Ray cluster at 127.0.0.1:9"),
    ],
)
def test_bad_executor_flags(tmp_path, args, message):
    src = write_image_dataset(tmp_path / "in", 4, per_shard=4).path
    r = run_cli("filter", str(src), str(tmp_path / "out"), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_max_cost_holds_across_ray_workers(tmp_path, ray_cluster):
    """Two workers caption at once; the budget they share is one ledger, so together they stop at the cap."""
    import json

    src = write_image_dataset(tmp_path / "in", 40, per_shard=10).path
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"gpt-4.1-mini": {"input": 1000, "output": 1000}}))  # about $0.39 a caption
    env = {"OPENAI_API_KEY": KEY, "LENSCAP_CACHE_DIR": str(tmp_path / "cache")}
    with FakeOpenAI(api_key=KEY, latency_s=0.01) as fake:

        def run(cap: str):
            return run_cli(
                "caption",
                str(src),
                str(tmp_path / "out"),
                "--base-url",
                fake.base_url,
                "--prices",
                str(prices),
                "--max-cost",
                cap,
                "--concurrency",
                "2",
                "--no-cache",
                "--quiet",
                "--json",
                "--executor",
                "ray",
                "--ray-address",
                ray_cluster,
                env=env,
            )

        r = run("6")
        assert r.returncode == 4, r.stderr
        assert "--max-cost $6 reached" in r.stderr and "Traceback" not in r.stderr
        summary = json.loads(r.stdout)
        assert 5 <= summary["spent_usd"] <= 6
        assert fake.stats()["requests"] < 20
        r = run("100")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["caption_status"] == {"ok": 40}
        assert set(fake.stats()["image_successes"].values()) == {1}, "no caption paid twice"
    assert KEY not in r.stdout + r.stderr


def test_remote_datasets_on_ray(tmp_path, ray_cluster, s3_store):
    """Input and output in an S3 bucket (a local object store), shards on Ray workers: same as local."""
    src = write_image_dataset(tmp_path / "in", 24, per_shard=6, failed=lambda i: i == 2).path
    ray_flags = ("--quiet", "--executor", "ray", "--ray-address", ray_cluster)
    env = {"LENSCAP_WORK_DIR": str(tmp_path / "mirrors")}
    local, remote = tmp_path / "filtered", "s3://lenscap/ray-test/filtered"
    assert run_cli("filter", str(src), str(local), "--min-side", "10", "--quiet").returncode == 0
    r = run_cli("filter", str(src), remote, "--min-side", "10", *ray_flags, env=env)
    assert r.returncode == 0, r.stderr
    assert rows_of(remote) == rows(local)

    captioned, remote_captioned = tmp_path / "captioned", "s3://lenscap/ray-test/captioned"
    # --copy-images: tars written on the Ray workers and uploaded, byte-identical to a local run's
    assert (
        run_cli(
            "caption",
            str(local),
            str(captioned),
            "--backend",
            "describe",
            "--copy-images",
            "--quiet",
            env=own_cache(tmp_path, "local"),
        ).returncode
        == 0
    )
    r = run_cli(
        "caption",
        remote,
        remote_captioned,
        "--backend",
        "describe",
        "--copy-images",
        *ray_flags,
        env=env | own_cache(tmp_path, "ray"),
    )
    assert r.returncode == 0, r.stderr
    assert rows_of(remote_captioned) == rows(captioned)
    assert not any(r["caption_cached"] for r in rows(captioned))
    assert sorted(p.rsplit("/", 1)[1] for p in s3_store.ls("lenscap/ray-test/captioned")) == sorted(
        [f"{i:05d}{ext}" for i in range(4) for ext in (".parquet", ".tar", "_stats.json")] + ["lenscap.json"]
    )
    for i in range(4):
        assert s3_store.cat(f"lenscap/ray-test/captioned/{i:05d}.tar") == (captioned / f"{i:05d}.tar").read_bytes()
    assert "lenscap-test-secret" not in s3_store.cat("lenscap/ray-test/captioned/lenscap.json").decode()


def rows_of(location: str) -> list[dict]:
    ds = Dataset.open(location)
    return [r for i in ds.completed_ids() for r in ds.read_table(i).to_pylist()]
