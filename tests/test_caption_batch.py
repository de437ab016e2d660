"""``caption --backend openai-batch`` and ``batch-files`` against the fake server's Files and Batches API:
the whole flow, retries across rounds, expiry, cost, queue limits, cancel, SIGKILL at every step, and
a vLLM-format round trip."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import run_cli
from test_caption import rows

from lenscap.caption.batch.state import BatchState
from lenscap.caption.pricing import PriceTable
from lenscap.demo.datasets import write_image_dataset
from lenscap.testing.fake_openai import FakeOpenAI

KEY = "sk-test-BATCH-SECRET-42"


@pytest.fixture
def env(tmp_path):
    return {"OPENAI_API_KEY": KEY, "LENSCAP_CACHE_DIR": str(tmp_path / "cache"), "OPENAI_BASE_URL": None}


def batch_args(src, out, server, *extra):
    return [
        "caption",
        str(src),
        str(out),
        "--backend",
        "openai-batch",
        "--model",
        "gpt-4.1",
        "--base-url",
        server.base_url,
        "--no-cache",
        "--quiet",
        *extra,
    ]


def records(out) -> list[dict]:
    """The job's batch files, from its state file."""
    path = Path(out) / ".lenscap" / "batch" / "state.sqlite"
    if not path.exists():
        return []
    state = BatchState(path)
    try:
        return [r for r in state.files() if r["requests"]]
    finally:
        state.close()


def faulty(i: int) -> str:
    return {5: " [[fault:500x1]]", 6: " [[fault:malformedx1]]", 7: " [[fault:badimage]]", 8: " [[fault:refusal]]"}.get(i, "")


def test_whole_flow_with_retry_rounds_and_batch_prices(tmp_path, env):
    src = write_image_dataset(
        tmp_path / "in", 40, per_shard=15, failed=lambda i: i == 3, caption=lambda i: f"thing {i}{faulty(i)}"
    ).path
    prompt = tmp_path / "p.txt"
    prompt.write_text("Caption this image. Alt-text: {alt_text}")
    with FakeOpenAI(batch_delay_s=0.1) as fake:
        r = run_cli(
            *batch_args(
                src,
                tmp_path / "out",
                fake,
                "--prompt",
                str(prompt),
                "--max-requests-per-file",
                "10",
                "--wait",
                "--poll-interval",
                "0.1",
                "--json",
            ),
            env=env,
        )
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        assert summary["complete"] is True
        assert summary["caption_status"] == {"ok": 37, "refused": 1, "error": 1, "skipped": 1}, summary
        got = rows(tmp_path / "out")
        assert got["000000005"]["caption_status"] == "ok"  # a 500 in round 0, answered in round 1
        assert got["000000006"]["caption_status"] == "ok"  # a torn output line in round 0, asked again
        assert got["000000007"]["caption_error"].startswith("HTTP 400: You uploaded an unsupported image")
        assert got["000000008"]["caption_status"] == "refused"
        files = records(tmp_path / "out")
        assert [f["round"] for f in files] == [0, 0, 0, 0, 1] and files[-1]["requests"] == 2
        assert len(fake.batches) == 5 and all(f["state"] == "merged" for f in files)
        ok = got["000000000"]
        full = PriceTable().cost("gpt-4.1", ok["caption_input_tokens"], ok["caption_output_tokens"])
        assert ok["caption_cost_usd"] == pytest.approx(full / 2), "batch price: half"
        assert summary["spent_usd"] == pytest.approx(sum(r["caption_cost_usd"] or 0 for r in got.values()), abs=1e-4)
        assert not list((tmp_path / "out" / ".lenscap" / "batch" / "inputs").glob("*.jsonl")), "inputs go once uploaded"
        status = json.loads(run_cli("batch", "status", str(tmp_path / "out"), "--json").stdout)
        assert status["files"] == {"merged": 5} and status["rounds"] == 2 and status["requests"] == 41
        assert (status["answered"], status["left"], status["failed"], status["asked_again"], status["queue"]["tokens"]) == (
            39,
            0,
            0,
            2,
            0,
        )
        assert status["spent_usd"] == pytest.approx(summary["spent_usd"], abs=1e-4) and status["eta_hours"] == 0
        assert not list((tmp_path / "out" / ".lenscap" / "batch" / "outputs").iterdir()), "outputs go once merged"
        for path in (tmp_path / "out").rglob("*"):
            assert not path.is_file() or KEY.encode() not in path.read_bytes()


def test_expired_batches_keep_partial_results_and_the_rest_fails_with_the_apis_message(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 12, per_shard=12).path
    with FakeOpenAI(batch_delay_s=0.05, batch_expire_after=4) as fake:
        r = run_cli(
            *batch_args(
                src,
                tmp_path / "out",
                fake,
                "--max-requests-per-file",
                "6",
                "--max-retries",
                "0",
                "--wait",
                "--poll-interval",
                "0.1",
                "-O",
                "keep-outputs=true",
                "--json",
            ),
            env=env,
        )
        assert r.returncode == 1, r.stderr  # 4 errors left after the rounds: over --max-error-share 0
        assert json.loads(r.stdout)["caption_status"] == {"ok": 8, "error": 4}
        kept = sorted(p.name for p in (tmp_path / "out" / ".lenscap" / "batch" / "outputs").iterdir())
        assert kept == [f"r00-00000{i}{kind}.jsonl.gz" for i in (0, 1) for kind in (".errors", "")]
        assert gzip.decompress((tmp_path / "out" / ".lenscap" / "batch" / "outputs" / kept[1]).read_bytes()).count(b"\n") == 4
        errors = [row["caption_error"] for row in rows(tmp_path / "out").values() if row["caption_status"] == "error"]
        assert errors == ["This request could not be executed before the completion window expired. (after 1 batch rounds)"] * 4
        assert {b["status"] for b in fake.batches.values()} == {"expired"}
    status = json.loads(run_cli("batch", "status", str(tmp_path / "out"), "--json").stdout)
    assert (status["answered"], status["failed"], status["asked_again"], status["left"]) == (12, 4, 0, 0)


def test_submit_and_exit_then_cron_collects(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 10, per_shard=10).path
    with FakeOpenAI(batch_delay_s=3600) as fake:
        r = run_cli(*batch_args(src, tmp_path / "out", fake, "--json"), env=env)
        assert r.returncode == 0 and json.loads(r.stdout)["complete"] is False
        assert [f["state"] for f in records(tmp_path / "out")] == ["submitted"]
        status = run_cli("batch", "status", str(tmp_path / "out"))
        assert status.returncode == 0 and "batch files: 1 submitted" in status.stdout, status.stderr
        assert "about 10 left" in status.stdout and "ETA unknown until a batch is merged" in status.stdout
        r = run_cli(*batch_args(src, tmp_path / "out", fake, "--json"), env=env)  # too early: nothing new
        assert json.loads(r.stdout)["complete"] is False and len(fake.batches) == 1
        fake.release_batches()
        r = run_cli(*batch_args(src, tmp_path / "out", fake, "--json"), env=env)
        assert json.loads(r.stdout)["complete"] is True
        assert json.loads(r.stdout)["caption_status"] == {"ok": 10}
        assert len(fake.batches) == 1 and sorted(fake.image_successes.values()) == [1] * 10


def test_max_enqueued_tokens_holds_submissions(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 12, per_shard=12).path
    with FakeOpenAI(batch_delay_s=3600) as fake:
        r = run_cli(
            *batch_args(src, tmp_path / "out", fake, "--max-requests-per-file", "4", "--max-enqueued-tokens", "1500"), env=env
        )
        assert r.returncode == 0, r.stderr
        files = records(tmp_path / "out")
        # The queue counts input tokens, as the API does: 4 x 263 = 1,052 a file, so one fits and the next waits.
        assert [f["est_tokens"] for f in files] == [1052, 1052]
        assert [f["state"] for f in files] == ["submitted", "packed"]
        assert len(fake.batches) == 1
        fake.configure(batch_delay_s=0.05)
        fake.release_batches()
        r = run_cli(
            *batch_args(
                src,
                tmp_path / "out",
                fake,
                "--max-requests-per-file",
                "4",
                "--max-enqueued-tokens",
                "1500",
                "--wait",
                "--poll-interval",
                "0.1",
                "--json",
            ),
            env=env,
        )
        assert r.returncode == 0 and json.loads(r.stdout)["caption_status"] == {"ok": 12}
        assert len(fake.batches) == 3
        r = run_cli(
            *batch_args(src, tmp_path / "o2", fake, "--max-requests-per-file", "4", "--max-enqueued-tokens", "100"), env=env
        )
        assert (
            r.returncode == 2
            and "more than the batch queue limit 100 (--max-enqueued-tokens, or the API's): lower --max-requests-per-file"
            in r.stderr
        )


def test_max_cost_holds_batches_and_exits_4(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 12, per_shard=12).path
    prices = tmp_path / "prices.json"
    # At batch prices a 4-request file reserves about $1.13 (input estimate + max tokens) and costs about $0.69.
    prices.write_text(json.dumps({"gpt-4.1": {"input": 1000, "output": 1000}}))
    with FakeOpenAI(batch_delay_s=0.05) as fake:
        args = batch_args(
            src,
            tmp_path / "out",
            fake,
            "--max-requests-per-file",
            "4",
            "--prices",
            str(prices),
            "--wait",
            "--poll-interval",
            "0.1",
            "--json",
        )
        r = run_cli(*args, "--max-cost", "1.5", env=env)
        assert r.returncode == 4, r.stderr
        assert "--max-cost $1.5 reached" in r.stderr
        assert 0.5 < json.loads(r.stdout)["spent_usd"] <= 1.5
        assert len(fake.batches) == 1, "the second file would not fit in what is left"
        r = run_cli(*args, "--max-cost", "50", env=env)
        assert r.returncode == 0 and json.loads(r.stdout)["caption_status"] == {"ok": 12}
        assert sorted(fake.image_successes.values()) == [1] * 12


def test_cancel_then_rerun_merges_and_resubmits(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 6, per_shard=6).path
    with FakeOpenAI(batch_delay_s=3600) as fake:
        assert run_cli(*batch_args(src, tmp_path / "out", fake), env=env).returncode == 0
        r = run_cli("batch", "cancel", str(tmp_path / "out"), env={**env, "OPENAI_BASE_URL": None})
        assert r.returncode == 0 and "cancelled 1 batch(es)" in r.stderr, r.stderr
        fake.configure(batch_delay_s=0.05)
        r = run_cli(*batch_args(src, tmp_path / "out", fake, "--wait", "--poll-interval", "0.1", "--json"), env=env)
        assert r.returncode == 0 and json.loads(r.stdout)["caption_status"] == {"ok": 6}
        assert [b["status"] for b in sorted(fake.batches.values(), key=lambda b: b["id"])] == ["cancelled", "completed"]


# The moments of a batch job a test kills it at, read from its state records (``records``).
BATCH_MOMENTS = {
    "packing": lambda rs, files: len(rs) >= 2,
    "upload": lambda rs, files: any(r["state"] == "uploading" for r in rs),
    "create": lambda rs, files: any(r["state"] == "creating" for r in rs),
    "polling": lambda rs, files: len(rs) == files and all(r["state"] == "submitted" for r in rs),
    "merging": lambda rs, files: any(r["state"] == "merged" for r in rs),
}


def kill_batch_job_at(moment: str, cli_args: list[str], env: dict, out: Path, files: int) -> None:
    """``lenscap CLI_ARGS`` in a process group of its own, SIGKILLed at ``moment`` of its batch job into
    ``out`` (``files`` batch files in all). At upload and create the fake server has acted by then and
    answers late (its ``upload_delay_s``/``create_delay_s``): the kill lands between the two."""
    cmd = [sys.executable, "-m", "lenscap.cli", *cli_args]
    proc = subprocess.Popen(cmd, env={**os.environ, **{k: v for k, v in env.items() if v}}, start_new_session=True)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if BATCH_MOMENTS[moment](records(out), files):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    if moment in ("upload", "create"):
        time.sleep(0.5)  # the server has acted; its answer is still 1.5 s away
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("moment", ["packing", "upload", "create", "polling"])
def test_sigkill_at_each_step_never_duplicates_a_batch(tmp_path, env, moment):
    n, per_file = 30, 3
    src = write_image_dataset(tmp_path / "in", n, per_shard=10).path
    delays = {"upload": {"upload_delay_s": 2.0}, "create": {"create_delay_s": 2.0}}.get(moment, {})
    with FakeOpenAI(batch_delay_s=0.3, **delays) as fake:
        args = batch_args(
            src, tmp_path / "out", fake, "--max-requests-per-file", str(per_file), "--wait", "--poll-interval", "0.2"
        )
        kill_batch_job_at(moment, args, env, tmp_path / "out", n // per_file)
        fake.configure(upload_delay_s=0.0, create_delay_s=0.0)
        r = run_cli(
            *batch_args(
                src,
                tmp_path / "out",
                fake,
                "--max-requests-per-file",
                str(per_file),
                "--wait",
                "--poll-interval",
                "0.1",
                "--json",
            ),
            env=env,
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["caption_status"] == {"ok": n}
        files = records(tmp_path / "out")
        assert len(files) == n // per_file
        inputs = [b["input_file_id"] for b in fake.batches.values()]
        assert len(inputs) == len(set(inputs)) == len(files), "one batch per batch file"
        assert len(fake.uploads) == len(set(fake.uploads)) == len(files), "one upload per batch file"
        assert not [f for f in fake.files.values() if f["purpose"] == "batch"], "merged batches' files are deleted"
        assert sorted(fake.image_successes.values()) == [1] * n, "every sample captioned once"
    assert rows(tmp_path / "out") == _clean_run(src, tmp_path)


def _clean_run(src, tmp_path) -> dict:
    env = {"OPENAI_API_KEY": KEY, "LENSCAP_CACHE_DIR": str(tmp_path / "cache2")}
    with FakeOpenAI(batch_delay_s=0.05) as fake:
        r = run_cli(
            *batch_args(src, tmp_path / "clean", fake, "--max-requests-per-file", "3", "--wait", "--poll-interval", "0.1"),
            env=env,
        )
        assert r.returncode == 0, r.stderr
    return rows(tmp_path / "clean")


def test_batch_files_round_trip_in_vllm_format(tmp_path, env):
    """batch-files writes OpenAI-batch-format inputs; a runner (here: the fake server, line by line, as
    vllm run-batch would) writes outputs next to them; the rerun merges, and asks again for a torn line."""
    src = write_image_dataset(tmp_path / "in", 8, per_shard=4).path
    args = [
        "caption",
        str(src),
        str(tmp_path / "out"),
        "--backend",
        "batch-files",
        "--model",
        "llava-hf/llava-1.5-7b-hf",
        "--max-requests-per-file",
        "5",
        "--json",
    ]
    no_key = {**env, "OPENAI_API_KEY": None}
    r = run_cli(*args, env=no_key)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["complete"] is False
    files_dir = tmp_path / "out" / ".lenscap" / "batch" / "files"
    r = run_cli(*args[:-1], env=no_key)
    assert "vllm run-batch -i" in r.stderr and str(files_dir / "input" / "r00-000000.jsonl") in r.stderr
    with FakeOpenAI(models=("llava-hf/llava-1.5-7b-hf",)) as runner:
        _run_batch_files(files_dir, runner.base_url, tear_first=True)
        r = run_cli(*args, env=no_key)
        assert json.loads(r.stdout)["complete"] is False  # the torn line's request is in a new round's file
        _run_batch_files(files_dir, runner.base_url, tear_first=False)
        r = run_cli(*args, env=no_key)
        summary = json.loads(r.stdout)
        assert summary["complete"] is True and summary["caption_status"] == {"ok": 8}
        assert sorted(runner.image_successes.values()) == [1] * 7 + [2]  # the torn answer was asked again
    got = rows(tmp_path / "out")
    assert all(row["caption_cost_usd"] is None and row["caption_model"] == "llava-hf/llava-1.5-7b-hf" for row in got.values())


def _run_batch_files(files_dir: Path, base_url: str, tear_first: bool) -> None:
    """What ``vllm run-batch -i IN -o OUT`` does for every input without its output."""
    for path in sorted((files_dir / "input").glob("*.jsonl")):
        out = files_dir / "output" / path.name
        if not out.exists():
            _answer_file(path, out, base_url, tear_first)
            tear_first = False  # one torn line in all


def test_upload_failures_are_retried_then_reported_once(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 6, per_shard=6).path
    with FakeOpenAI(batch_delay_s=0.05, fail_uploads=2) as fake:
        args = batch_args(src, tmp_path / "out", fake, "--wait", "--poll-interval", "0.1", "--json")
        r = run_cli(*args, env=env)
        assert r.returncode == 0, r.stderr  # two 500s on upload: the client's retries ride them out
        assert json.loads(r.stdout)["caption_status"] == {"ok": 6}
        fake.configure(fail_uploads=100)
        r = run_cli(*batch_args(src, tmp_path / "o2", fake, "--json"), env=env)
        assert r.returncode == 2
        assert r.stderr.strip().splitlines()[-1].startswith("lenscap: error: uploading lenscap-")
        assert KEY not in r.stderr
        fake.configure(fail_uploads=0)
        r = run_cli(*batch_args(src, tmp_path / "o2", fake, "--wait", "--poll-interval", "0.1", "--json"), env=env)
        assert r.returncode == 0 and json.loads(r.stdout)["caption_status"] == {"ok": 6}
        assert len(fake.batches) == 2


def test_hints_ocr_text_is_kept_through_a_batch_job(tmp_path, env):
    """What the OCR hint said travels with the packed request's id and is written with its answer."""
    from test_backends import text_image

    from lenscap.demo.pictures import jpeg_bytes, scene

    src = write_image_dataset(
        tmp_path / "in", 2, image=lambda i: text_image("OPEN 24 HOURS") if i == 0 else jpeg_bytes(scene(i))
    ).path
    with FakeOpenAI() as fake:
        r = run_cli(*batch_args(src, tmp_path / "out", fake, "--hints", "ocr", "--wait", "--poll-interval", "0.1"), env=env)
        assert r.returncode == 0, r.stderr
    got = rows(tmp_path / "out")
    assert got["000000000"]["caption_ocr_text"] == "OPEN 24 HOURS" and got["000000001"]["caption_ocr_text"] == ""
    assert {r["caption_status"] for r in got.values()} == {"ok"}


def test_a_pass_costs_the_batches_in_flight_not_the_shards(tmp_path, env, monkeypatch):
    """With 80,000 shards and 333,000 merged batch files behind the job (an 800M job mid-way), a rerun polls
    each batch in flight once, and reads the journal and rows of no shard but the one its finished batches
    complete."""
    from conftest import run_cli_here

    from lenscap.caption.backends.openai_batch import FilesTransport
    from lenscap.caption.journal import Journal
    from lenscap.core.dataset import Dataset
    from lenscap.core.layout import shard_name
    from lenscap.testing.batch_state import grow_state

    src = write_image_dataset(tmp_path / "in", 12, per_shard=4).path
    out = tmp_path / "out"
    args = [
        "caption",
        str(src),
        str(out),
        "--backend",
        "batch-files",
        "--model",
        "llava-hf/llava-1.5-7b-hf",
        "--max-requests-per-file",
        "2",
        "--quiet",
        "--json",
    ]
    no_key = {**env, "OPENAI_API_KEY": None}
    assert run_cli(*args, env=no_key).returncode == 0
    assert [f["state"] for f in records(out)] == ["submitted"] * 6
    grow_state(out / ".lenscap" / "batch" / "state.sqlite", shards=80_000, files=333_000)
    files_dir = out / ".lenscap" / "batch" / "files"
    with FakeOpenAI(models=("llava-hf/llava-1.5-7b-hf",)) as runner:  # the runner finishes shard 0's two files
        for name in ("r00-000000.jsonl", "r00-000001.jsonl"):
            _answer_file(files_dir / "input" / name, files_dir / "output" / name, runner.base_url)
    polls, journals, shards_read = [], [], []
    monkeypatch.setattr(FilesTransport, "poll", _spy(FilesTransport.poll, lambda self, batch_id, **kw: polls.append(batch_id)))
    monkeypatch.setattr(Journal, "load", _spy(Journal.load, lambda self: journals.append(self.path.name)))
    for method in ("iter_samples", "read_table"):
        monkeypatch.setattr(
            Dataset, method, _spy(getattr(Dataset, method), lambda self, shard_id, *a, **kw: shards_read.append(shard_id))
        )
    monkeypatch.setenv("LENSCAP_CACHE_DIR", env["LENSCAP_CACHE_DIR"])
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code, stdout, stderr = run_cli_here(*args)
    assert code == 0, stderr
    assert sorted(polls) == [f"r00-{i:06d}.jsonl" for i in range(6)], "each batch in flight, once"
    assert set(journals) == {f"{shard_name(0)}.jsonl"} and set(shards_read) == {0}
    assert json.loads(stdout)["shards_completed"] == 1
    assert Dataset(out).is_complete(0) and not Dataset(out).is_complete(1)


def _spy(method, record):
    def wrapped(self, *args, **kwargs):
        record(self, *args, **kwargs)
        return method(self, *args, **kwargs)

    return wrapped


def _answer_file(path: Path, out: Path, base_url: str, tear_first: bool = False) -> None:
    """One batch file answered as ``vllm run-batch`` would: each line, into an OpenAI batch output line."""
    lines = []
    for i, raw in enumerate(path.read_bytes().splitlines()):
        req = json.loads(raw)
        http = urllib.request.Request(
            base_url + "/chat/completions", data=json.dumps(req["body"]).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(http) as resp:
            body = json.loads(resp.read())
        line = json.dumps(
            {
                "id": f"vllm-{i}",
                "custom_id": req["custom_id"],
                "response": {"status_code": 200, "request_id": f"vllm-{i}", "body": body},
                "error": None,
            }
        )
        lines.append(line[:50] if tear_first and i == 0 else line)
    out.write_text("\n".join(lines) + "\n")


def test_packing_on_processes_and_on_ray_writes_the_same_files_and_output(tmp_path, env, ray_cluster):
    """Shards are prepared on one process, on two, and on a Ray cluster: the batch files are the same bytes,
    and so are the captioned rows."""
    src = write_image_dataset(tmp_path / "in", 30, per_shard=4, failed=lambda i: i == 5).path
    runs = {"one": ("--processes", "1"), "two": ("--processes", "2"), "ray": ("--executor", "ray", "--ray-address", ray_cluster)}
    uploaded: dict[str, list[bytes]] = {}
    with FakeOpenAI(batch_delay_s=0.05) as fake:
        for name, executor in runs.items():
            before = set(fake.files)
            r = run_cli(*batch_args(src, tmp_path / name, fake, "--max-requests-per-file", "7", *executor, "--json"), env=env)
            assert r.returncode == 0, r.stderr
            uploaded[name] = [fake.files[i]["_bytes"] for i in sorted(set(fake.files) - before)]
            r = run_cli(
                *batch_args(
                    src,
                    tmp_path / name,
                    fake,
                    "--max-requests-per-file",
                    "7",
                    *executor,
                    "--wait",
                    "--poll-interval",
                    "0.1",
                    "--json",
                ),
                env=env,
            )
            assert r.returncode == 0 and json.loads(r.stdout)["caption_status"] == {"ok": 29, "skipped": 1}, r.stderr
    assert [len(u) for u in uploaded.values()] == [5, 5, 5]  # 29 requests, 7 a file
    assert uploaded["one"] == uploaded["two"] == uploaded["ray"]
    assert rows(tmp_path / "one") == rows(tmp_path / "two") == rows(tmp_path / "ray")
    assert not list((tmp_path / "ray" / ".lenscap" / "batch" / "prepared").iterdir()), "prepared lines go once cut"


def test_samples_the_filter_dropped_are_skipped_as_online(tmp_path, env):
    """A sample without an image (filtered out) is ``skipped`` with the filter's reason, as the online backends
    say, not an error after every round."""
    from lenscap.demo.pictures import jpeg_bytes, scene

    src = write_image_dataset(
        tmp_path / "in", 9, per_shard=5, image=lambda i: jpeg_bytes(scene(i, (64, 48) if i % 3 == 0 else (320, 240)))
    ).path
    assert run_cli("filter", str(src), str(tmp_path / "filtered"), "--min-side", "100", "--quiet").returncode == 0
    with FakeOpenAI(batch_delay_s=0.05) as fake:
        r = run_cli(
            *batch_args(tmp_path / "filtered", tmp_path / "out", fake, "--wait", "--poll-interval", "0.1", "--json"), env=env
        )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["caption_status"] == {"ok": 6, "skipped": 3}
    got = rows(tmp_path / "out")
    assert all(got[f"{i:09d}"]["caption_error"].startswith("no image (filter:") for i in (0, 3, 6))
    assert len(fake.batches) == 1


def test_a_shard_the_input_completes_late_is_packed_after_the_cursor_passed_it(tmp_path, env):
    """--allow-incomplete on an input still being written: shard 1 completes after shards 0 and 2 were packed."""
    from lenscap.core.layout import shard_name

    src = write_image_dataset(tmp_path / "in", 12, per_shard=4).path
    stats = src / f"{shard_name(1)}_stats.json"
    stats.rename(tmp_path / "held")
    with FakeOpenAI(batch_delay_s=0.05) as fake:
        args = batch_args(src, tmp_path / "out", fake, "--allow-incomplete", "--wait", "--poll-interval", "0.1", "--json")
        r = run_cli(*args, env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["caption_status"] == {"ok": 8}
        (tmp_path / "held").rename(stats)
        r = run_cli(*args, env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["complete"] is True and json.loads(r.stdout)["caption_status"] == {"ok": 12}
        assert sorted(fake.image_successes.values()) == [1] * 12
    assert len(rows(tmp_path / "out")) == 12


def test_a_job_started_by_an_older_lenscap_is_refused_in_one_line(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 4, per_shard=4).path
    with FakeOpenAI(batch_delay_s=3600) as fake:
        assert run_cli(*batch_args(src, tmp_path / "out", fake), env=env).returncode == 0
        root = tmp_path / "out" / ".lenscap" / "batch"
        for path in root.glob("state.sqlite*"):
            path.unlink()
        (root / "files").mkdir(exist_ok=True)
        (root / "files" / "r00-000000.json").write_text("{}")
        for r in (run_cli(*batch_args(src, tmp_path / "out", fake), env=env), run_cli("batch", "status", str(tmp_path / "out"))):
            assert r.returncode == 2 and "holds a batch job started by an older lenscap" in r.stderr
            assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
