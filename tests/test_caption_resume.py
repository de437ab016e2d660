"""Kill ``lenscap caption`` at any point, or stop it at --max-cost: the rerun finishes the job with
the same result and never repeats a request whose answer had been recorded."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli
from test_caption import rows, tar_members

from lenscap.caption.image_prep import prepare_image
from lenscap.core.dataset import Dataset
from lenscap.demo.datasets import write_image_dataset
from lenscap.testing.fake_openai import FakeOpenAI


def _image_shas(src: Dataset) -> dict[str, str]:
    """key -> SHA-256 of the bytes the backend uploads (what the fake server counts by)."""
    out = {}
    for shard_id in src.completed_ids():
        for s in src.iter_samples(shard_id):
            if s.image is not None:
                out[s.key] = hashlib.sha256(prepare_image(s.image, 512).data).hexdigest()
    return out


def _recorded_keys(out: Path) -> set[str]:
    """Captions the output directory holds: committed shards and journal lines."""
    keys = set(rows(out)) if out.exists() else set()
    for journal in (out / ".lenscap" / "caption").glob("*.jsonl"):
        for line in journal.read_bytes().splitlines():
            with contextlib.suppress(ValueError, KeyError):
                keys.add(json.loads(line)["key"])
    return keys


@pytest.mark.parametrize("processes", [1, 2])
def test_sigkill_mid_shard_then_rerun(tmp_path, processes):
    n, concurrency = 90, 4
    src = write_image_dataset(tmp_path / "in", n, per_shard=30)
    shas = _image_shas(src)
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "LENSCAP_CACHE_DIR": str(tmp_path / "cache")}
    with FakeOpenAI(latency_s=0.04) as fake:
        args = [
            sys.executable,
            "-m",
            "lenscap.cli",
            "caption",
            str(src.path),
            str(tmp_path / "out"),
            "--base-url",
            fake.base_url,
            "--no-cache",
            "--concurrency",
            str(concurrency),
            "--processes",
            str(processes),
            "--quiet",
        ]
        proc = subprocess.Popen(args, env=env, start_new_session=True, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while len(_recorded_keys(tmp_path / "out")) < 40 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its workers, mid-shard
        proc.wait()
        recorded = _recorded_keys(tmp_path / "out")
        assert 0 < len(recorded) < n, "killed mid-run"
        before = dict(fake.stats()["image_successes"])

        rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
        assert rerun.returncode == 0, rerun.stderr
        successes = fake.stats()["image_successes"]
        for key in recorded:
            assert successes[shas[key]] == before[shas[key]] == 1, f"{key} was recorded, then paid for again"
        assert set(successes) == set(shas.values())
        repeated = sum(successes.values()) - n
        assert repeated <= concurrency * processes, "only requests in flight at the kill may repeat"

        fake.reset_counters()
        clean = run_cli(
            "caption", str(src.path), str(tmp_path / "clean"), "--base-url", fake.base_url, "--no-cache", "--quiet", env=env
        )
        assert clean.returncode == 0, clean.stderr
    assert rows(tmp_path / "out") == rows(tmp_path / "clean")
    assert tar_members(tmp_path / "out") == tar_members(tmp_path / "clean")
    assert not list((tmp_path / "out" / ".lenscap" / "caption").glob("*.jsonl")), "journals go once shards commit"


def test_max_cost_stops_cleanly_and_resumes_without_paying_twice(tmp_path):
    src = write_image_dataset(tmp_path / "in", 40, per_shard=10)
    shas = _image_shas(src)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"gpt-4.1-mini": {"input": 1000, "output": 1000}}))  # about $0.39 a caption
    env = {"OPENAI_API_KEY": "sk-test", "LENSCAP_CACHE_DIR": str(tmp_path / "cache")}
    with FakeOpenAI(latency_s=0.01) as fake:

        def run(cap: str):
            return run_cli(
                "caption",
                str(src.path),
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
                env=env,
            )

        r = run("6")
        assert r.returncode == 4, r.stderr
        assert "--max-cost $6 reached" in r.stderr and "rerun with a higher --max-cost" in r.stderr
        summary = json.loads(r.stdout)
        assert summary["exit_code"] == 4 and 5 <= summary["spent_usd"] <= 6
        first = fake.stats()["requests"]
        assert 10 <= first < 20
        assert Dataset(tmp_path / "out").completed_ids() == [0]

        r = run("6")  # the cap covers the directory across runs: nothing more to spend
        assert r.returncode == 4
        assert fake.stats()["requests"] - first <= 1

        r = run("100")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["caption_status"] == {"ok": 40}
        successes = fake.stats()["image_successes"]
        assert sorted(successes[s] for s in shas.values()) == [1] * 40, "no caption paid twice"
    spent = sum(row["caption_cost_usd"] for row in rows(tmp_path / "out").values())
    assert json.loads(r.stdout)["spent_usd"] == pytest.approx(spent, abs=1e-4)


class _TimedFake(FakeOpenAI):
    """The fake server, noting when each caption request arrived and with which key."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.arrivals: list[tuple[float, str]] = []

    async def _route(self, method, path, query, headers, body):
        if path == "/v1/chat/completions":
            self.arrivals.append((time.monotonic(), headers.get("authorization", "")))
        return await super()._route(method, path, query, headers, body)


def _processes_marked(marker: bytes) -> list[int]:
    """The live worker processes whose environment holds ``marker`` (a killed run's, whoever their parent is now)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes():
                cmdline = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline and state != "Z":
                    found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def _lock_owner(out: Path) -> int | None:
    try:
        return json.loads((out / ".lenscap" / "lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_sigkill_of_the_parent_leaves_no_worker_paying_and_no_rerun_beside_one(tmp_path):
    """``lenscap caption --processes 2`` SIGKILLed (the parent only: its workers are orphaned) while its
    workers start or run: no request of the killed run reaches the server 1.2 s after the kill, no
    worker of it is alive 5 s after, and a rerun started at once never holds the lock while one lives."""
    src = write_image_dataset(tmp_path / "in", 60, per_shard=15)
    with _TimedFake(latency_s=0.2) as fake:
        for i, after_s in enumerate((1.0, 1.8, 2.6)):
            out = tmp_path / f"out{i}"
            args = [sys.executable, "-m", "lenscap.cli", "caption", str(src.path), str(out), "--base-url", fake.base_url]
            args += ["--no-cache", "--concurrency", "2", "--processes", "2", "--quiet"]

            def start(key: str, marker: str, args: list[str] = args) -> subprocess.Popen:
                env = {**os.environ, "OPENAI_API_KEY": key, "LENSCAP_CACHE_DIR": str(tmp_path / "cache"), "T_RUN": marker}
                return subprocess.Popen(args, env=env, start_new_session=True, stderr=subprocess.DEVNULL)

            old_marker = f"T_RUN=old{i}\0".encode()
            first = start("sk-old", f"old{i}")
            time.sleep(max(0.0, after_s - 0.05))
            assert first.poll() is None, "the run ended before the kill"
            os.kill(first.pid, signal.SIGKILL)
            killed = time.monotonic()
            rerun = start("sk-new", f"new{i}")
            beside: list[tuple[float, list[int]]] = []
            try:
                while time.monotonic() < killed + 5:
                    survivors = _processes_marked(old_marker)
                    if survivors and _lock_owner(out) == rerun.pid:
                        beside.append((time.monotonic() - killed, survivors))
                    time.sleep(0.01)
                survivors = _processes_marked(old_marker)
            finally:
                for pid in _processes_marked(old_marker):
                    os.kill(pid, signal.SIGKILL)
                os.killpg(rerun.pid, signal.SIGKILL)
                rerun.wait()
                first.wait()
            late = [t - killed for t, key in fake.arrivals if key == "Bearer sk-old" and t > killed + 1.2]
            assert not late, f"killed at {after_s} s: requests of the killed run {late} s after the kill"
            assert not survivors, f"killed at {after_s} s: workers {survivors} alive 5 s after the kill"
            assert not beside, f"killed at {after_s} s: the rerun held the lock beside live workers {beside}"
