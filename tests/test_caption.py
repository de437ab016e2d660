"""``lenscap caption`` against the fake OpenAI-compatible server: outcomes, faults, bad input, secrets."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from conftest import run_cli

from lenscap.core.dataset import Dataset
from lenscap.demo.datasets import write_image_dataset
from lenscap.demo.pictures import scene_caption, truncated_jpeg
from lenscap.testing.fake_openai import FakeOpenAI, FakeSettings

KEY = "sk-test-LEAKCHECK-0123456789"


@pytest.fixture
def fake():
    with FakeOpenAI(FakeSettings(api_key=KEY)) as server:
        yield server


@pytest.fixture
def env(tmp_path):
    return {"OPENAI_API_KEY": KEY, "LENSCAP_CACHE_DIR": str(tmp_path / "cache"), "OPENAI_BASE_URL": None}


def caption(src, out, server, env, *extra: str, timeout: float = 180):
    return run_cli("caption", str(src), str(out), "--base-url", server.base_url, "--quiet", *extra, env=env, timeout=timeout)


def rows(path) -> dict[str, dict]:
    ds = Dataset(path)
    return {r["key"]: r for i in ds.completed_ids() for r in ds.read_table(i).to_pylist()}


def tar_members(path) -> dict[str, bytes]:
    out = {}
    for tar_path in sorted(Path(path).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            out.update({m.name: tar.extractfile(m).read() for m in tar if m.isfile()})
    return out


def assert_no_key_anywhere(*places) -> None:
    for place in places:
        if isinstance(place, Path):
            for f in Path(place).rglob("*"):
                if f.is_file():
                    assert KEY.encode() not in f.read_bytes(), f"API key leaked into {f}"
        else:
            assert KEY not in str(place)


def test_captions_replace_alt_text_with_provenance(tmp_path, fake, env):
    src = write_image_dataset(tmp_path / "in", 30, per_shard=12, failed=lambda i: i == 4).path
    r = caption(src, tmp_path / "out", fake, env, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["caption_status"] == {"ok": 29, "skipped": 1}
    got = rows(tmp_path / "out")
    assert len(got) == 30
    ok = got["000000000"]
    assert ok["caption_status"] == "ok" and ok["caption"].startswith("A wide 320x240 picture")
    assert ok["alt_text"] == scene_caption(0)
    assert (ok["caption_backend"], ok["caption_model"], ok["caption_prompt"]) == ("openai", "gpt-4.1-mini", "lens")
    assert ok["caption_input_tokens"] > 85 and ok["caption_output_tokens"] > 0 and ok["caption_cost_usd"] > 0
    assert ok["caption_cached"] is False
    skipped = got["000000004"]
    assert skipped["caption_status"] == "skipped" and "failed_to_download" in skipped["caption_error"]
    assert skipped["caption"] == skipped["alt_text"] == scene_caption(4)
    assert not list((tmp_path / "out").glob("*.tar")), "rows only: the images stay in the input"
    spent = sum(r["caption_cost_usd"] or 0 for r in got.values())
    assert summary["spent_usd"] == pytest.approx(spent, abs=1e-4)  # --json rounds money to a hundredth of a cent
    assert fake.stats()["responses"] == {"200": 29}
    copied = caption(src, tmp_path / "copy", fake, env, "--copy-images")  # answered from the cache
    assert copied.returncode == 0, copied.stderr
    members = tar_members(tmp_path / "copy")
    assert members["000000000.txt"].decode() == ok["caption"]
    assert json.loads(members["000000000.json"])["alt_text"] == scene_caption(0)
    assert fake.stats()["responses"] == {"200": 29}
    manifest = json.loads((tmp_path / "out" / "lenscap.json").read_text())
    assert manifest["parameters"]["key_variable"] == "OPENAI_API_KEY"
    assert manifest["counts"]["caption_status"] == {"ok": 29, "skipped": 1}
    assert [h["stage"] for h in manifest["history"]] == ["download", "caption"]
    info = json.loads(run_cli("inspect", str(tmp_path / "out"), "--json").stdout)
    assert info["stage_status"] == {"caption_status": {"ok": 29, "skipped": 1}}
    assert info["caption_cost"]["usd"] == pytest.approx(spent, abs=1e-4)  # --json rounds money to a hundredth of a cent
    assert info["caption_words"]["count"] == 29  # new captions only, not the kept alt-text
    assert info["skips"]["caption: no image (download status: failed_to_download)"] == 1  # a skip, not an error
    assert_no_key_anywhere(tmp_path / "out", r.stdout, r.stderr)


def test_resuming_with_other_caption_settings_is_refused(tmp_path, fake, env):
    src = write_image_dataset(tmp_path / "in", 3).path
    assert caption(src, tmp_path / "out", fake, env).returncode == 0
    r = caption(src, tmp_path / "out", fake, env, "--model", "gpt-4.1", "--max-tokens", "200")
    assert r.returncode == 2
    assert "other settings (max_tokens: 300 -> 200, model: 'gpt-4.1-mini' -> 'gpt-4.1')" in r.stderr
    assert caption(src, tmp_path / "out", fake, env, "--concurrency", "3", "--rpm", "1000").returncode == 0  # speed may change


def test_response_cache_never_pays_twice(tmp_path, fake, env):
    src = write_image_dataset(tmp_path / "in", 10, per_shard=10).path
    assert caption(src, tmp_path / "a", fake, env).returncode == 0
    assert fake.stats()["requests"] == 10
    r = caption(src, tmp_path / "b", fake, env, "--json")
    assert r.returncode == 0, r.stderr
    assert fake.stats()["requests"] == 10  # all from the cache
    assert json.loads(r.stdout)["spent_usd"] == 0
    b = rows(tmp_path / "b")
    assert all(row["caption_cached"] for row in b.values())
    assert {k: v["caption"] for k, v in b.items()} == {k: v["caption"] for k, v in rows(tmp_path / "a").items()}
    # Another prompt is another request; --no-cache asks again.
    assert caption(src, tmp_path / "c", fake, env, "--prompt", "short").returncode == 0
    assert fake.stats()["requests"] == 20
    assert caption(src, tmp_path / "d", fake, env, "--no-cache").returncode == 0
    assert fake.stats()["requests"] == 30


FAULTS = {
    # index: (marker in the alt-text, expected caption_status)
    0: ("[[fault:500x2]]", "ok"),
    1: ("[[fault:503x1]]", "ok"),
    2: ("[[fault:429x2]]", "ok"),
    3: ("[[fault:429-barex1]]", "ok"),
    4: ("[[fault:malformedx2]]", "ok"),
    5: ("[[fault:timeoutx1]]", "ok"),
    6: ("[[fault:refusal]]", "refused"),
    7: ("[[fault:length]]", "truncated"),
    8: ("[[fault:badimage]]", "error"),
    9: ("[[fault:500]]", "error"),
}


def test_each_injected_fault_becomes_the_right_outcome(tmp_path, fake, env):
    fake.configure(timeout_sleep_s=4.0)
    marker = lambda i: FAULTS[i][0] if i in FAULTS else ""  # noqa: E731
    src = write_image_dataset(tmp_path / "in", 14, per_shard=14, caption=lambda i: f"photo {i} {marker(i)}").path
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Caption this image. Its alt-text, as data: {alt_text}")
    r = caption(
        src,
        tmp_path / "out",
        fake,
        env,
        "--prompt",
        str(prompt),
        "--timeout",
        "1.5",
        "--max-retries",
        "3",
        "--max-error-share",
        "0.1",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    got = rows(tmp_path / "out")
    for i, (mark, expected) in FAULTS.items():
        row = got[f"{i:09d}"]
        assert row["caption_status"] == expected, (mark, row["caption_error"])
        if expected == "ok":
            assert row["caption"].startswith("A wide") and row["caption_error"] is None
        else:
            assert row["caption"] == row["alt_text"], "a failed caption keeps the previous text"
    for i in range(10, 14):
        assert got[f"{i:09d}"]["caption_status"] == "ok"
    assert got["000000006"]["caption_error"].startswith("refused: I'm sorry")
    assert got["000000007"]["caption_error"].startswith("reply cut at --max-tokens 300: A wide")
    assert "unsupported image" in got["000000008"]["caption_error"]
    assert got["000000009"]["caption_error"] == "HTTP 500: The server had an error while processing your request."
    assert got["000000006"]["caption_cost_usd"] > 0, "a refusal is billed, so it is costed"
    assert json.loads(r.stdout)["caption_status"] == {"error": 2, "ok": 10, "refused": 1, "truncated": 1}
    assert_no_key_anywhere(tmp_path / "out", r.stdout, r.stderr)


def test_a_429_and_503_storm_is_ridden_out(tmp_path, fake, env):
    fake.configure(fail_next=["429"] * 8 + ["503"] * 4)
    src = write_image_dataset(tmp_path / "in", 12, per_shard=12).path
    r = caption(src, tmp_path / "out", fake, env, "--concurrency", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["caption_status"] == {"ok": 12}
    assert fake.stats()["responses"]["429"] == 8


def test_corrupt_image_and_empty_shard(tmp_path, fake, env):
    src = write_image_dataset(tmp_path / "in", 6, per_shard=3, image=lambda i: truncated_jpeg(i) if i == 1 else None or _jpeg(i))
    empty = src.writer(2)
    empty.commit({"stage": "download"})  # a shard with no samples at all
    r = caption(src.path, tmp_path / "out", fake, env, "--json")
    assert r.returncode == 0, r.stderr
    got = rows(tmp_path / "out")
    assert got["000000001"]["caption_status"] == "error"
    assert "cannot decode image" in got["000000001"]["caption_error"]
    assert {k: v["caption_status"] for k, v in got.items() if k != "000000001"} == {f"{i:09d}": "ok" for i in (0, 2, 3, 4, 5)}
    assert Dataset(tmp_path / "out").completed_ids() == [0, 1, 2]
    assert fake.stats()["requests"] == 5  # the corrupt image was never sent


def _jpeg(i: int) -> bytes:
    from lenscap.demo.pictures import jpeg_bytes, scene

    return jpeg_bytes(scene(i, (320, 240)))


def test_no_key_is_one_clear_line_before_any_work(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 2).path
    r = run_cli("caption", str(src), str(tmp_path / "out"), env={**env, "OPENAI_API_KEY": None})
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        == "lenscap: error: no API key: set the environment variable OPENAI_API_KEY, or OPENAI_API_KEY_FILE to a file "
        "holding it (or name another variable with --api-key-env)"
    )
    assert not (tmp_path / "out").exists()
    r = run_cli("caption", str(src), str(tmp_path / "out"), "--api-key-env", "MY_KEY", env={**env, "MY_KEY": None})
    assert "MY_KEY" in r.stderr and r.returncode == 2


def test_the_key_can_come_from_the_file_that_KEY_FILE_names(tmp_path, fake, env):
    """Cron reads no profile and a crontab is no place for a key: ``$OPENAI_API_KEY_FILE`` names a file
    holding it. What is wrong with the file is one line naming it, before any work, never showing the key."""
    src = write_image_dataset(tmp_path / "in", 3).path
    key_file = tmp_path / "openai-key"
    key_file.write_text(f"{KEY}\n")
    from_file = {**env, "OPENAI_API_KEY": None, "OPENAI_API_KEY_FILE": str(key_file)}
    assert caption(src, tmp_path / "ok", fake, from_file).returncode == 0  # the server refuses any other key
    assert {r["caption_status"] for r in rows(tmp_path / "ok").values()} == {"ok"}
    for content, message in (
        (None, f"$OPENAI_API_KEY_FILE names {tmp_path / 'missing'}, which cannot be read: No such file or directory"),
        ("", f"$OPENAI_API_KEY_FILE names {key_file}, which is empty"),
        (f"OPENAI_API_KEY={KEY}", f"$OPENAI_API_KEY_FILE names {key_file}, which must hold the key alone"),
    ):
        if content is not None:
            key_file.write_text(content)
        named = {**from_file, "OPENAI_API_KEY_FILE": str(key_file if content is not None else tmp_path / "missing")}
        r = caption(src, tmp_path / "bad", fake, named)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert_no_key_anywhere(r.stderr)
        assert not (tmp_path / "bad").exists()


def test_rejected_key_unknown_model_and_unreachable_server_fail_once(tmp_path, fake, env):
    src = write_image_dataset(tmp_path / "in", 20, per_shard=10).path
    r = caption(src, tmp_path / "o1", fake, {**env, "OPENAI_API_KEY": "sk-wrong-SECRET-987"})
    assert r.returncode == 2
    assert "rejected the API key in $OPENAI_API_KEY" in r.stderr and "sk-wrong-SECRET-987" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    fake.reset_counters()
    r = caption(src, tmp_path / "o2", fake, env, "--model", "gpt-9-imaginary")
    assert r.returncode == 2
    assert (
        r.stderr.strip().splitlines()[-1]
        == "lenscap: error: model 'gpt-9-imaginary': The model `gpt-9-imaginary` does not exist or you do not have access to it."
    )
    assert fake.stats()["requests"] == 1, "one probe request, not one per sample"
    assert Dataset(tmp_path / "o2").completed_ids() == []
    assert caption(src, tmp_path / "o2", fake, env).returncode == 0, "the corrected model may use the directory"
    r = run_cli("caption", str(src), str(tmp_path / "o3"), "--base-url", "http://127.0.0.1:9/v1", env=env)
    assert r.returncode == 2 and "cannot reach http://127.0.0.1:9/v1" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--detail", "huge"], "--detail must be one of low, high, auto"),
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["--rpm", "-5"], "--rpm must be positive"),
        (["--prompt", "nonexistent-preset"], "is neither a preset (lens, short, alt-aware) nor a file"),
        (
            ["--backend", "nope"],
            "unknown backend 'nope'; installed backends: anthropic, anthropic-batch, batch-files, describe, gemini, gemini-batch, openai, openai-batch, transformers, vllm",
        ),
        (["--max-cost", "1", "--model", "my-local-model"], "--max-cost needs a price for model 'my-local-model'"),
        (["--device", "cuda"], "backend 'openai' has no option 'device' (its options: model, base-url"),
        (["-O", "nonsense"], "-O/--option takes NAME=VALUE, not 'nonsense'"),
        (["--concurrency", "0"], "--concurrency must be at least 1"),
        (["--base-url", "ftp://x"], "is not an http(s) URL"),
    ],
)
def test_bad_flags(tmp_path, env, args, message):
    src = write_image_dataset(tmp_path / "in", 1).path
    r = run_cli("caption", str(src), str(tmp_path / "out"), *args, env=env)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_missing_input_directory(tmp_path, env):
    r = run_cli("caption", str(tmp_path / "nope"), str(tmp_path / "out"), env=env)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_pool_of_endpoints_spreads_load_within_each_limit(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 40, per_shard=40).path
    with FakeOpenAI(rpm=900, latency_s=0.05) as a, FakeOpenAI(rpm=900, latency_s=0.05) as b:
        r = run_cli(
            "caption",
            str(src),
            str(tmp_path / "out"),
            "--base-url",
            a.base_url,
            "--base-url",
            b.base_url,
            "--rpm",
            "900",
            "--quiet",
            "--json",
            env=env,
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["caption_status"] == {"ok": 40}
        sa, sb = a.stats(), b.stats()
        assert sa["responses"].get("200", 0) + sb["responses"].get("200", 0) == 40
        assert sa["requests"] >= 10 and sb["requests"] >= 10, (sa["requests"], sb["requests"])
        assert "429" not in sa["responses"] and "429" not in sb["responses"]


def test_recaptioning_the_output_retries_only_the_errors(tmp_path, fake, env):
    # Two attempts fail, and the two of the shard's end (an error is asked once more, then recorded
    # once the server answers a probe): an error; the recaption's request succeeds.
    marker = lambda i: "[[fault:500x4]]" if i == 1 else ""  # noqa: E731
    src = write_image_dataset(tmp_path / "in", 4, caption=lambda i: f"web text {i} {marker(i)}").path
    r = caption(src, tmp_path / "out", fake, env, "--prompt", "alt-aware", "--max-retries", "1")
    assert r.returncode == 1 and "1 of 4 captions failed" in r.stderr, r.stderr  # the outcome policy: no error is ordinary
    first = rows(tmp_path / "out")
    assert [first[f"{i:09d}"]["caption_status"] for i in range(4)] == ["ok", "error", "ok", "ok"]
    assert fake.stats()["requests"] == 3 + 4 + 1  # the answers, the error's four attempts, the probe
    r = caption(tmp_path / "out", tmp_path / "out2", fake, env, "--prompt", "alt-aware", "--max-retries", "1")
    assert r.returncode == 0, r.stderr
    assert fake.stats()["requests"] == 9, "the successes came from the cache: they ground on the same alt-text"
    second = rows(tmp_path / "out2")
    assert all(row["caption_status"] == "ok" for row in second.values())
    assert second["000000001"]["alt_text"] == "web text 1 [[fault:500x4]]"
    assert second["000000000"]["previous_caption"] == first["000000000"]["caption"]
    assert second["000000000"]["caption_cached"] is True


def test_a_server_failing_every_request_stops_the_run_and_nothing_is_recorded(tmp_path, fake, env):
    """The same 5xx (or a FastAPI-style 400) before any success stops the run with the server's own
    words; the samples are left unanswered, so the rerun after the fix captions every one."""
    src = write_image_dataset(tmp_path / "in", 10, per_shard=10).path
    fake.configure(fail_next=["500"] * 40)
    r = caption(src, tmp_path / "out", fake, env, "--concurrency", "1", "--max-retries", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert (
        "the server failed the first 5 requests with: HTTP 500: The server had an error while processing your request."
        in r.stderr
    )
    assert fake.stats()["requests"] == 10  # 5 samples, 2 attempts each: then it stopped
    assert not Dataset(tmp_path / "out").completed_ids()

    fake.configure(fail_next=["fastapi400"] * 5)
    r = caption(src, tmp_path / "out", fake, env, "--concurrency", "1")
    assert r.returncode == 2 and "HTTP 400: Model 'gpt-4.1-mini' is not loaded on this server" in r.stderr, r.stderr

    fake.configure(fail_next=[])
    r = caption(src, tmp_path / "out", fake, env, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["caption_status"] == {"ok": 10}


def test_error_texts_are_never_empty_and_an_unknown_price_is_no_price():
    import httpx
    import openai

    from lenscap.caption.backends.openai_chat import _describe, _message

    response = httpx.Response(400, request=httpx.Request("POST", "http://x/v1/chat/completions"))
    for body, text in (
        ({"detail": "Model 'x' is not loaded"}, "Model 'x' is not loaded"),
        ({"detail": [{"loc": ["body", "model"], "msg": "field required"}]}, "field required"),
        ({"error": "model overloaded"}, "model overloaded"),
        ({"error": {"message": "Invalid image"}}, "Invalid image"),
        ({"message": "bad"}, "bad"),
    ):
        assert _message(openai.BadRequestError("Error code: 400", response=response, body=body)) == text
    assert _describe(ConnectionResetError()) == "ConnectionResetError"
    assert _describe(OSError("refused\nmore")) == "refused"


def test_a_model_without_a_price_says_cost_unknown_not_zero(tmp_path, fake, env):
    fake.configure(models=("local-llava",))
    src = write_image_dataset(tmp_path / "in", 3, per_shard=3).path
    r = run_cli("caption", str(src), str(tmp_path / "out"), "--base-url", fake.base_url, "--model", "local-llava", env=env)
    assert r.returncode == 0, r.stderr
    assert "no price known for model 'local-llava'" in r.stderr
    assert r.stderr.strip().endswith("samples (3 ok); cost unknown") and "$0.0000" not in r.stderr
    r = run_cli(
        "caption",
        str(src),
        str(tmp_path / "out"),
        "--base-url",
        fake.base_url,
        "--model",
        "local-llava",
        "--json",
        "--quiet",
        env=env,
    )
    assert json.loads(r.stdout)["cost_known"] is False


def test_a_server_killed_mid_run_stops_it_with_exit_1_and_the_rerun_asks_only_the_unanswered(tmp_path, env):
    """An outage is not 95 errors: when every endpoint fails for --outage-timeout, the run stops (exit 1)
    and records no error for the samples the outage failed; after a restart the rerun captions every
    sample, and no image that was answered is asked again."""
    import subprocess
    import sys
    import time

    src = write_image_dataset(tmp_path / "in", 40, per_shard=20).path
    first = FakeOpenAI(FakeSettings(api_key=KEY, latency_s=0.1)).start()
    args = [
        sys.executable,
        "-m",
        "lenscap.cli",
        "caption",
        str(src),
        str(tmp_path / "out"),
        "--base-url",
        first.base_url,
        "--concurrency",
        "2",
        "--max-retries",
        "1",
        "--timeout",
        "2",
        "--outage-timeout",
        "3",
        "--quiet",
    ]
    proc = subprocess.Popen(
        args, env={**__import__("os").environ, **{k: v for k, v in env.items() if v}}, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while first.stats()["requests"] < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.stop()  # the server dies mid-run
    _, err = proc.communicate(timeout=120)
    answered = {sha for sha, n in first.stats()["image_successes"].items() if n}
    assert proc.returncode == 1, err
    assert "no caption endpoint has answered for" in err and "asked on the rerun" in err
    assert 0 < len(answered) < 40
    from lenscap.caption.journal import Journal

    journalled = [
        e for path in (tmp_path / "out" / ".lenscap" / "caption").glob("*.jsonl") for e in Journal(path).load().values()
    ]
    assert {e["status"] for e in journalled} == {"ok"}  # no failure recorded
    # An answer the server sent as it died may not have arrived: at most those are asked again.
    assert 0 < len(journalled) <= len(answered)

    second = FakeOpenAI(FakeSettings(api_key=KEY), port=first.port).start()  # the server is back, on the same address
    try:
        r = caption(src, tmp_path / "out", second, env, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["caption_status"] == {"ok": 40}
        asked_again = set(second.stats()["image_requests"])
        assert len(asked_again) == 40 - len(journalled) and len(asked_again & answered) == len(answered) - len(journalled)
    finally:
        second.stop()


def test_a_pool_moves_traffic_off_a_failing_endpoint(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 20, per_shard=20).path
    with (
        FakeOpenAI(FakeSettings(api_key=KEY, fail_next=["500"] * 1000)) as broken,
        FakeOpenAI(FakeSettings(api_key=KEY)) as healthy,
    ):
        r = run_cli(
            "caption",
            str(src),
            str(tmp_path / "out"),
            "--base-url",
            broken.base_url,
            "--base-url",
            healthy.base_url,
            "--concurrency",
            "2",
            "--json",
            "--quiet",
            env=env,
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["caption_status"] == {"ok": 20}
        assert broken.stats()["requests"] <= 6  # down after 5 failures in a row: no more traffic
        assert healthy.stats()["requests"] == 20


def test_retry_errors_asks_the_errors_again_and_nothing_else(tmp_path, fake, env):
    marks = {2: "[[fault:500x5]]", 7: "[[fault:500x5]]", 4: "[[fault:refusal]]"}  # 4 attempts in the first run
    src = write_image_dataset(tmp_path / "in", 10, per_shard=5, caption=lambda i: f"photo {i} {marks.get(i, '')}").path
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Caption this image. Its alt-text, as data: {alt_text}")
    flags = ["--prompt", str(prompt), "--max-retries", "1", "--no-cache", "--json"]
    r = caption(src, tmp_path / "out", fake, env, *flags)
    assert r.returncode == 1, r.stderr  # two errors: over --max-error-share 0
    assert json.loads(r.stdout)["caption_status"] == {"error": 2, "ok": 7, "refused": 1}
    before, asked = rows(tmp_path / "out"), dict(fake.stats()["image_requests"])

    r = caption(src, tmp_path / "out", fake, env, *flags, "--retry-errors")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["caption_status"] == {"ok": 9, "refused": 1}
    again = {sha: n - asked.get(sha, 0) for sha, n in fake.stats()["image_requests"].items() if n != asked.get(sha, 0)}
    assert sorted(again.values()) == [2, 2]  # the two errors, each failing once more then answered; nothing else asked
    after = rows(tmp_path / "out")
    for key, row in before.items():
        if row["caption_status"] != "error":
            assert after[key] == row, key  # answers kept as they were, cost and all
        else:
            assert after[key]["caption_status"] == "ok" and after[key]["caption_error"] is None
    spent = sum(r["caption_cost_usd"] or 0 for r in after.values())
    assert summary["spent_usd"] == pytest.approx(spent, abs=1e-4)  # what the directory spent: every answer once


def test_a_full_disk_stops_before_the_next_request_and_the_rerun_pays_for_nothing_twice(tmp_path, fake, env, monkeypatch):
    """Room for each answer is allocated before its request: a full disk (ENOSPC injected at the 6th
    allocation) stops the run there with exit 1 and a message naming the file; the five answers in
    flight are kept, and the rerun after space is freed asks only the rest."""
    import errno
    import os

    from conftest import run_cli_here

    from lenscap.caption.journal import Journal

    src = write_image_dataset(tmp_path / "in", 12, per_shard=12).path
    real, calls = os.posix_fallocate, []

    def filling(fd, offset, length):
        calls.append(length)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, length)

    for k, v in env.items():
        monkeypatch.setenv(k, v) if v is not None else monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(os, "posix_fallocate", filling)
    args = [
        "caption",
        str(src),
        str(tmp_path / "out"),
        "--base-url",
        fake.base_url,
        "--concurrency",
        "3",
        "--no-cache",
        "--quiet",
    ]
    code, _, err = run_cli_here(*args)
    assert code == 1 and "No space left on device" in err and "00000.jsonl" in err and "free some space and rerun" in err, err
    assert fake.stats()["requests"] == 5
    journal = Journal(tmp_path / "out" / ".lenscap" / "caption" / "00000.jsonl")
    assert len(journal.load()) == 5 and journal.path.stat().st_size < 5 * 2048  # the unused room was given back

    monkeypatch.setattr(os, "posix_fallocate", real)  # space freed
    code, out, err = run_cli_here(*args[:-1], "--json", "--quiet")
    assert code == 0, err
    assert json.loads(out)["caption_status"] == {"ok": 12} and fake.stats()["requests"] == 12
