"""``caption --backend openai-batch`` and ``batch-files`` against the fake server's Files and Batches API:
the whole flow, retries across rounds, expiry, cost, queue limits, cancel, SIGKILL at every step, and
a vLLM-format round trip."""

from __future__ import annotations

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
from lenscap.captioning.pricing import PriceTable
from lenscap.demo.datasets import write_image_dataset
from lenscap.demo.fake_openai import FakeOpenAI
from test_caption import rows

KEY = "sk-test-BATCH-SECRET-42"


@pytest.fixture
def env(tmp_path):
    return {"OPENAI_API_KEY": KEY, "LENSCAP_CACHE_DIR": str(tmp_path / "cache"), "OPENAI_BASE_URL": None}


def batch_args(src, out, server, *extra):
    return ["caption", str(src), str(out), "--backend", "openai-batch", "--model", "gpt-4.1", "--base-url", server.base_url,
            "--no-cache", "--quiet", *extra]


def records(out) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(out) / ".lenscap" / "batch" / "files").glob("*.json"))]


def faulty(i: int) -> str:
    return {5: " [[fault:500x1]]", 6: " [[fault:malformedx1]]", 7: " [[fault:badimage]]", 8: " [[fault:refusal]]"}.get(i, "")


def test_whole_flow_with_retry_rounds_and_batch_prices(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 40, per_shard=15, failed=lambda i: i == 3,
                              caption=lambda i: f"thing {i}{faulty(i)}").path
    prompt = tmp_path / "p.txt"
    prompt.write_text("Caption this image. Alt-text: {alt_text}")
    with FakeOpenAI(batch_delay_s=0.1) as fake:
        r = run_cli(*batch_args(src, tmp_path / "out", fake, "--prompt", str(prompt), "--max-requests-per-file", "10",
                                "--wait", "--poll-interval", "0.1", "--json"), env=env)
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
        assert summary["spent_usd"] == pytest.approx(sum(r["caption_cost_usd"] or 0 for r in got.values()))
        assert not list((tmp_path / "out" / ".lenscap" / "batch" / "inputs").glob("*.jsonl")), "inputs go once uploaded"
        status = json.loads(run_cli("batch", "status", str(tmp_path / "out"), "--json").stdout)
        assert status["files"] == {"merged": 5} and status["rounds"] == 2 and status["requests"] == 41
        for path in (tmp_path / "out").rglob("*"):
            assert not path.is_file() or KEY.encode() not in path.read_bytes()


def test_expired_batches_keep_partial_results_and_the_rest_fails_with_the_apis_message(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 12, per_shard=12).path
    with FakeOpenAI(batch_delay_s=0.05, batch_expire_after=4) as fake:
        r = run_cli(*batch_args(src, tmp_path / "out", fake, "--max-requests-per-file", "6", "--max-retries", "0",
                                "--wait", "--poll-interval", "0.1", "--json"), env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["caption_status"] == {"ok": 8, "error": 4}
        errors = [row["caption_error"] for row in rows(tmp_path / "out").values() if row["caption_status"] == "error"]
        assert errors == ["This request could not be executed before the completion window expired. (after 1 batch rounds)"] * 4
        assert {b["status"] for b in fake.batches.values()} == {"expired"}


def test_submit_and_exit_then_cron_collects(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 10, per_shard=10).path
    with FakeOpenAI(batch_delay_s=3600) as fake:
        r = run_cli(*batch_args(src, tmp_path / "out", fake, "--json"), env=env)
        assert r.returncode == 0 and json.loads(r.stdout)["complete"] is False
        assert [f["state"] for f in records(tmp_path / "out")] == ["submitted"]
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
        r = run_cli(*batch_args(src, tmp_path / "out", fake, "--max-requests-per-file", "4", "--max-enqueued-tokens", "3000"), env=env)
        assert r.returncode == 0, r.stderr
        files = records(tmp_path / "out")
        assert [f["state"] for f in files] == ["submitted", "packed"], "one file of ~2,250 tokens fits; the next waits"
        assert len(fake.batches) == 1
        fake.configure(batch_delay_s=0.05)
        fake.release_batches()
        r = run_cli(*batch_args(src, tmp_path / "out", fake, "--max-requests-per-file", "4", "--max-enqueued-tokens", "3000",
                                "--wait", "--poll-interval", "0.1", "--json"), env=env)
        assert r.returncode == 0 and json.loads(r.stdout)["caption_status"] == {"ok": 12}
        assert len(fake.batches) == 3
        r = run_cli(*batch_args(src, tmp_path / "o2", fake, "--max-requests-per-file", "4", "--max-enqueued-tokens", "100"), env=env)
        assert r.returncode == 2 and "more than --max-enqueued-tokens 100: lower --max-requests-per-file" in r.stderr


def test_max_cost_holds_batches_and_exits_4(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 12, per_shard=12).path
    prices = tmp_path / "prices.json"
    # At batch prices a 4-request file reserves about $1.13 (input estimate + max tokens) and costs about $0.69.
    prices.write_text(json.dumps({"gpt-4.1": {"input": 1000, "output": 1000}}))
    with FakeOpenAI(batch_delay_s=0.05) as fake:
        args = batch_args(src, tmp_path / "out", fake, "--max-requests-per-file", "4", "--prices", str(prices),
                          "--wait", "--poll-interval", "0.1", "--json")
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


@pytest.mark.parametrize("moment", ["packing", "upload", "create", "polling"])
def test_sigkill_at_each_step_never_duplicates_a_batch(tmp_path, env, moment):
    n, per_file = 30, 3
    src = write_image_dataset(tmp_path / "in", n, per_shard=10).path
    delays = {"upload": {"upload_delay_s": 2.0}, "create": {"create_delay_s": 2.0}}.get(moment, {})
    with FakeOpenAI(batch_delay_s=0.3, **delays) as fake:
        args = [sys.executable, "-m", "lenscap.cli", *batch_args(src, tmp_path / "out", fake, "--max-requests-per-file",
                                                                  str(per_file), "--wait", "--poll-interval", "0.2")]
        proc = subprocess.Popen(args, env={**os.environ, **{k: v for k, v in env.items() if v}}, start_new_session=True)
        want = {"packing": lambda rs: len(rs) >= 2, "upload": lambda rs: any(r["state"] == "uploading" for r in rs),
                "create": lambda rs: any(r["state"] == "creating" for r in rs),
                "polling": lambda rs: len(rs) == n // per_file and all(r["state"] == "submitted" for r in rs)}[moment]
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if want(records(tmp_path / "out")):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        if moment in ("upload", "create"):
            time.sleep(0.5)  # the server has acted; its answer is still 1.5 s away
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        fake.configure(upload_delay_s=0.0, create_delay_s=0.0)
        r = run_cli(*batch_args(src, tmp_path / "out", fake, "--max-requests-per-file", str(per_file), "--wait",
                                "--poll-interval", "0.1", "--json"), env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["caption_status"] == {"ok": n}
        files = records(tmp_path / "out")
        assert len(files) == n // per_file
        inputs = [b["input_file_id"] for b in fake.batches.values()]
        assert len(inputs) == len(set(inputs)) == len(files), "one batch per batch file"
        uploads = [f for f in fake.files.values() if f["purpose"] == "batch"]
        assert len(uploads) == len(files), "one upload per batch file"
        assert sorted(fake.image_successes.values()) == [1] * n, "every sample captioned once"
    assert rows(tmp_path / "out") == _clean_run(src, tmp_path)


def _clean_run(src, tmp_path) -> dict:
    env = {"OPENAI_API_KEY": KEY, "LENSCAP_CACHE_DIR": str(tmp_path / "cache2")}
    with FakeOpenAI(batch_delay_s=0.05) as fake:
        r = run_cli(*batch_args(src, tmp_path / "clean", fake, "--max-requests-per-file", "3", "--wait",
                                "--poll-interval", "0.1"), env=env)
        assert r.returncode == 0, r.stderr
    return rows(tmp_path / "clean")


def test_batch_files_round_trip_in_vllm_format(tmp_path, env):
    """batch-files writes OpenAI-batch-format inputs; a runner (here: the fake server, line by line, as
    vllm run-batch would) writes outputs next to them; the rerun merges, and asks again for a torn line."""
    src = write_image_dataset(tmp_path / "in", 8, per_shard=4).path
    args = ["caption", str(src), str(tmp_path / "out"), "--backend", "batch-files", "--model", "llava-hf/llava-1.5-7b-hf",
            "--max-requests-per-file", "5", "--json"]
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
    """What ``vllm run-batch -i IN -o OUT`` does: answer each line, write OpenAI batch output lines."""
    for path in sorted((files_dir / "input").glob("*.jsonl")):
        out = files_dir / "output" / path.name
        if out.exists():
            continue
        lines = []
        for i, raw in enumerate(path.read_bytes().splitlines()):
            req = json.loads(raw)
            http = urllib.request.Request(base_url + "/chat/completions", data=json.dumps(req["body"]).encode(),
                                          headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(http) as resp:
                body = json.loads(resp.read())
            line = json.dumps({"id": f"vllm-{i}", "custom_id": req["custom_id"],
                               "response": {"status_code": 200, "request_id": f"vllm-{i}", "body": body}, "error": None})
            lines.append(line[:50] if tear_first and i == 0 else line)
        out.write_text("\n".join(lines) + "\n")
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
    from lenscap.demo.images import jpeg_bytes, scene
    from test_backends import text_image

    src = write_image_dataset(tmp_path / "in", 2, image=lambda i: text_image("OPEN 24 HOURS") if i == 0 else jpeg_bytes(scene(i))).path
    with FakeOpenAI() as fake:
        r = run_cli(*batch_args(src, tmp_path / "out", fake, "--hints", "ocr", "--wait", "--poll-interval", "0.1"), env=env)
        assert r.returncode == 0, r.stderr
    got = rows(tmp_path / "out")
    assert got["000000000"]["caption_ocr_text"] == "OPEN 24 HOURS" and got["000000001"]["caption_ocr_text"] == ""
    assert {r["caption_status"] for r in got.values()} == {"ok"}
