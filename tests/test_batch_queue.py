"""The batch queue (input tokens of the batches in flight) against the fake Batch API's enqueued-token
limit: a rolling queue that stays between 80% of the limit and the limit while work remains, a limit
learned from the API's ``token_limit_exceeded`` failures, and SIGKILLs of the controlling process at
random moments, after which a rerun pays for each request once and creates no duplicate batch."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict

import pytest
from conftest import run_cli
from test_caption import rows
from test_caption_batch import KEY, _clean_run, batch_args, records

from lenscap.demo.datasets import write_image_dataset
from lenscap.testing.fake_openai import FakeOpenAI

PER_REQUEST = 263  # input tokens of one request for a default demo image, as lenscap and the fake both count them
PER_FILE = 4  # requests a batch file: 1,052 tokens
LIMIT = 5 * PER_FILE * PER_REQUEST + 2 * PER_REQUEST  # 5,786: five files fit (5,260, 91%), a sixth does not; a file is 18%


@pytest.fixture
def env(tmp_path):
    return {"OPENAI_API_KEY": KEY, "LENSCAP_CACHE_DIR": str(tmp_path / "cache"), "OPENAI_BASE_URL": None}


def log_of(fake: FakeOpenAI) -> list[tuple[float, int]]:
    with fake._lock:  # appended on the server's thread
        return list(fake.enqueued_log)


def refills(log: list[tuple[float, int]]) -> list[list[tuple[float, int]]]:
    """The log's runs of consecutive admissions (each entry above the one before), in order."""
    runs: list[list[tuple[float, int]]] = []
    previous, run = 0, None
    for t, level in log:
        if level > previous:
            if run is None:
                run = []
                runs.append(run)
            run.append((t, level))
        else:
            run = None
        previous = level
    return runs


def limit_failures(fake: FakeOpenAI) -> list[dict]:
    return [
        b
        for b in fake.batches.values()
        if b["status"] == "failed" and any(e["code"] == "token_limit_exceeded" for e in (b["errors"] or {}).get("data", []))
    ]


def assert_one_batch_per_file(fake: FakeOpenAI, files: list[dict]) -> None:
    """Each batch file uploaded once, and one batch for it that was not refused for the queue limit."""
    assert len(fake.uploads) == len(set(fake.uploads)) == len(files), "one upload per batch file"
    refused = {b["id"] for b in limit_failures(fake)}
    by_input: dict[str, list[dict]] = defaultdict(list)
    for b in fake.batches.values():
        by_input[b["input_file_id"]].append(b)
    assert len(by_input) == len(files)
    for batches in by_input.values():
        kept = [b for b in batches if b["id"] not in refused]
        assert len(kept) == 1, f"one batch per input file besides those refused for the limit: {batches}"
        assert {b["metadata"]["lenscap_file"] for b in batches} == {kept[0]["metadata"]["lenscap_file"]}
    assert sorted(b["metadata"]["lenscap_file"] for b in fake.batches.values() if b["id"] not in refused) == [
        f["name"] for f in files
    ]


def test_rolling_queue_stays_between_80_percent_and_the_limit(tmp_path, env):
    n = 80
    src = write_image_dataset(tmp_path / "in", n, per_shard=20).path
    with FakeOpenAI(batch_delay_s=0.3, batch_queue_limit=LIMIT) as fake:
        r = run_cli(
            *batch_args(
                src,
                tmp_path / "out",
                fake,
                "--max-requests-per-file",
                str(PER_FILE),
                "--max-enqueued-tokens",
                str(LIMIT),
                "--wait",
                "--poll-interval",
                "0.05",
                "--json",
            ),
            env=env,
        )
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        assert summary["complete"] is True and summary["caption_status"] == {"ok": n}
        files = records(tmp_path / "out")
        assert [f["est_tokens"] for f in files] == [PER_FILE * PER_REQUEST] * (n // PER_FILE)
        assert [b["_tokens"] for b in fake.batches.values()] == [f["est_tokens"] for f in files], "lenscap counts as the API does"
        assert not limit_failures(fake), "the limit given is never crossed"
        assert fake.peak_enqueued <= LIMIT and fake.enqueued_tokens() == 0
        assert sorted(fake.image_successes.values()) == [1] * n
        assert_one_batch_per_file(fake, files)
        log = log_of(fake)
    # The fake logs the queue at each admission (a batch created) and each release (a batch seen
    # finished). A pass of lenscap polls every batch in flight (the releases), merges the finished
    # ones, then submits files while the next fits (the admissions), so the queue dips between a
    # release and the refill, for as long as merging, preparing and uploading take: how long that is
    # depends on the machine, not on lenscap's decisions, so a time-weighted share would be flaky.
    # What lenscap decides is the level each refill ends at, which the queue then holds until the
    # next release: while work remains, the next file did not fit, so that level is above
    # LIMIT - one file >= 80% of LIMIT. Every refill ends there except the last (work runs out:
    # the queue drains, which is fine). Each admission is one batch (none was refused), so the
    # last admission in the log is the last file submitted.
    ups = [(t, level) for (t, level), (_, before) in zip(log, [(0.0, 0), *log]) if level > before]
    assert len(ups) == len(files), "one admission per batch file"
    assert max(level for _, level in log) <= LIMIT
    runs = refills(log)
    assert runs[-1][-1] == ups[-1]
    assert len(runs) >= 4, runs  # the queue was refilled several times while work remained
    while_work_remains = [run[-1][1] for run in runs[:-1]]
    assert all(level >= 0.8 * LIMIT for level in while_work_remains), (while_work_remains, log)
    assert while_work_remains[0] == 5 * PER_FILE * PER_REQUEST, "the first pass fills the queue"


def test_queue_limit_learned_from_the_api(tmp_path, env):
    n = 60
    src = write_image_dataset(tmp_path / "in", n, per_shard=15).path
    with FakeOpenAI(batch_delay_s=0.3, batch_queue_limit=LIMIT) as fake:
        r = run_cli(
            *batch_args(
                src,
                tmp_path / "out",
                fake,
                "--max-requests-per-file",
                str(PER_FILE),
                "--wait",
                "--poll-interval",
                "0.05",
                "--json",
            ),
            env=env,
        )
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        assert summary["complete"] is True and summary["caption_status"] == {"ok": n}
        assert "the API's batch queue limit is 5,786 tokens" in r.stderr
        files = records(tmp_path / "out")
        assert len(files) == n // PER_FILE == 15
        assert sorted(fake.image_successes.values()) == [1] * n, "each request paid once"
        # Knowing no limit, the first pass submits every file; the API admits five and refuses the
        # other ten, each of which gets one new batch for its uploaded file once the queue has room.
        refused = limit_failures(fake)
        assert len(refused) == len(files) - 5
        assert all("Limit: 5,786 enqueued tokens" in b["errors"]["data"][0]["message"] for b in refused)
        assert {b["metadata"]["lenscap_try"] for b in refused} == {"0"}, "once learned, the limit is kept"
        assert_one_batch_per_file(fake, files)
        assert [b["status"] for b in fake.batches.values()].count("completed") == len(files)
        assert fake.peak_enqueued <= LIMIT and fake.enqueued_tokens() == 0
    status = json.loads(run_cli("batch", "status", str(tmp_path / "out"), "--json").stdout)
    assert status["queue"]["learned_limit"] == LIMIT and status["queue"]["limit"] == LIMIT
    assert status["files"] == {"merged": len(files)} and status["answered"] == n and status["left"] == 0


@pytest.mark.parametrize("limit", ["learned", "given"])
def test_sigkill_at_random_points_then_rerun_pays_each_request_once(tmp_path, env, limit):
    n = 60
    src = write_image_dataset(tmp_path / "in", n, per_shard=15).path
    rng = random.Random({"learned": 1, "given": 2}[limit])
    given = ["--max-enqueued-tokens", str(LIMIT)] if limit == "given" else []
    with FakeOpenAI(batch_delay_s=0.3, batch_queue_limit=LIMIT) as fake:
        args = batch_args(
            src, tmp_path / "out", fake, "--max-requests-per-file", str(PER_FILE), *given, "--wait", "--poll-interval", "0.05"
        )
        child_env = {**{k: v for k, v in os.environ.items() if k != "OPENAI_BASE_URL"}, **{k: v for k, v in env.items() if v}}
        # Six runs killed at random moments: starting up (a run needs about 1.5 s to its first step here),
        # preparing, cutting, uploading, creating, polling, merging, committing shards.
        for _ in range(6):
            proc = subprocess.Popen(
                [sys.executable, "-m", "lenscap.cli", *args], env=child_env, start_new_session=True, stdin=subprocess.DEVNULL
            )
            delay = rng.uniform(0.2, 2.5)
            try:
                proc.wait(timeout=delay)  # a run that ends first was not killed: the next one finds the job done
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        r = run_cli(*args, "--json", env=env)
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        assert summary["complete"] is True and summary["caption_status"] == {"ok": n}
        files = records(tmp_path / "out")
        assert sum(f["requests"] for f in files) == n and all(f["state"] == "merged" for f in files)
        assert sorted(fake.image_successes.values()) == [1] * n, "each request paid once"
        assert_one_batch_per_file(fake, files)
        assert fake.peak_enqueued <= LIMIT
        assert fake.enqueued_tokens() == 0, "no batch left behind in the queue"
        if limit == "given":
            assert not limit_failures(fake), "a limit given is never crossed, whatever the kills"
    status = json.loads(run_cli("batch", "status", str(tmp_path / "out"), "--json").stdout)
    assert status["files"] == {"merged": len(files)} and status["answered"] == n and status["left"] == 0
    if limit == "learned" and limit_failures(fake):
        assert status["queue"]["learned_limit"] == LIMIT
    assert rows(tmp_path / "out") == _clean_run(src, tmp_path)


# ``lenscap caption ...`` that SIGKILLs itself once a batch is merged (its state says ``merged``), before
# the merged batch's clean-up deletes its input and output files from the account.
_KILLED_BEFORE_CLEAN_UP = """
import os, signal, sys
import lenscap.caption.batch.job
from lenscap.cli import main
lenscap.caption.batch.job.BatchJob._clean_up = lambda self, record: os.kill(os.getpid(), signal.SIGKILL)
sys.argv[0] = "lenscap"
main()
"""


def test_sigkill_between_a_merge_and_its_clean_up_leaves_no_file_on_the_account(tmp_path, env):
    """The account's file storage is capped: a rerun deletes what a killed run's clean-up did not."""
    src = write_image_dataset(tmp_path / "in", 8, per_shard=8).path
    with FakeOpenAI(batch_delay_s=0.05, batch_queue_limit=LIMIT) as fake:
        args = batch_args(
            src, tmp_path / "out", fake, "--max-requests-per-file", str(PER_FILE), "--wait", "--poll-interval", "0.05"
        )
        child_env = {**{k: v for k, v in os.environ.items() if k != "OPENAI_BASE_URL"}, **{k: v for k, v in env.items() if v}}
        killed = subprocess.run(
            [sys.executable, "-c", _KILLED_BEFORE_CLEAN_UP, *args],
            env=child_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert "merged" in [f["state"] for f in records(tmp_path / "out")]
        r = run_cli(*args, "--json", env=env)
        assert r.returncode == 0 and json.loads(r.stdout)["caption_status"] == {"ok": 8}, r.stderr
        assert sorted(fake.image_successes.values()) == [1] * 8
        left = sorted(f["filename"] for f in fake.files.values() if f["purpose"] in ("batch", "batch_output"))
        assert left == [], "merged batches' input and output files are deleted from the account"


def test_a_batch_being_created_when_killed_is_resumed_before_files_refused_for_the_limit(tmp_path, env):
    """Files over half the API's limit run one at a time. The first run, knowing no limit yet, submits all
    three; the API refuses the second and the third; the run is killed while creating the third. The
    rerun learns the limit from the second's failure; the third, still 'creating', counts as queued
    until the rerun finds its batch: it must be looked up before the second waits for room beside it."""
    src = write_image_dataset(tmp_path / "in", 12, per_shard=12).path
    with FakeOpenAI(batch_delay_s=0.2, batch_queue_limit=1500, create_delay_s=1.0) as fake:  # a file: 1,052 tokens
        args = batch_args(
            src, tmp_path / "out", fake, "--max-requests-per-file", str(PER_FILE), "--wait", "--poll-interval", "0.05"
        )
        child_env = {**{k: v for k, v in os.environ.items() if k != "OPENAI_BASE_URL"}, **{k: v for k, v in env.items() if v}}
        proc = subprocess.Popen(
            [sys.executable, "-m", "lenscap.cli", *args], env=child_env, start_new_session=True, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if any(f["name"] == "r00-000002" and f["state"] == "creating" for f in records(tmp_path / "out")):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        time.sleep(0.3)  # the server has made the batch (refused: over the limit); its answer is 0.7 s away
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert [f["state"] for f in records(tmp_path / "out")] == ["submitted", "submitted", "creating"]
        fake.configure(create_delay_s=0.0)
        try:
            r = run_cli(*args, "--json", env=env, timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(
                "the rerun with --wait never ends: r00-000001 waits for room beside r00-000002, whose "
                f"batch is never looked up: {[(f['name'], f['state']) for f in records(tmp_path / 'out')]}"
            )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["caption_status"] == {"ok": 12}
        files = records(tmp_path / "out")
        assert sorted(fake.image_successes.values()) == [1] * 12
        assert_one_batch_per_file(fake, files)
        assert len(limit_failures(fake)) == 2 and fake.peak_enqueued <= 1500
