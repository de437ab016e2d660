"""``caption --backend gemini`` and ``gemini-batch`` through the official google-genai SDK against the fake
Gemini server: captions from the pixels, Google's usage and price per row, a rerun that sends nothing,
faults mapped to statuses, keys never written, and a batch job killed at every step paying each request once."""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from PIL import Image
from test_caption import rows
from test_caption_batch import kill_batch_job_at, records

from lenscap.caption.backends import backend_class
from lenscap.caption.backends.base import CaptionRequest
from lenscap.caption.pricing import DEFAULT_PRICES
from lenscap.core.dataset import Dataset
from lenscap.core.errors import BackendError, MissingDependency
from lenscap.demo.datasets import write_image_dataset
from lenscap.demo.pictures import jpeg_bytes, scene
from lenscap.testing.fake_gemini import FakeGemini
from lenscap.testing.fake_openai import fake_caption

pytest.importorskip("google.genai")

KEY = "AIzaSy-GEMINI-LEAKCHECK-0123456789"
MODEL = "gemini-2.5-flash"


@pytest.fixture
def env(tmp_path):
    return {"GEMINI_API_KEY": KEY, "GOOGLE_API_KEY": None, "LENSCAP_CACHE_DIR": str(tmp_path / "cache")}


def gemini(src, out, server, env, *extra: str, backend: str = "gemini"):
    args = ["caption", str(src), str(out), "--backend", backend, "--model", MODEL, "--base-url", server.base_url]
    return run_cli(*args, "--quiet", *extra, env=env)


def expected_captions(src: Path) -> dict[str, str]:
    """What the server computes from each image's pixels, computed here from the input's images."""
    out = {}
    for shard in Dataset(src).completed_ids():
        for sample in Dataset(src).iter_samples(shard):
            image = Image.open(io.BytesIO(sample.image))
            out[sample.key] = fake_caption(image, image.size, hashlib.sha256(sample.image).hexdigest(), 60)
    return out


def assert_no_key(*places) -> None:
    for place in places:
        if isinstance(place, Path):
            for f in place.rglob("*"):
                if f.is_file():
                    assert KEY.encode() not in f.read_bytes(), f"API key leaked into {f}"
        else:
            assert KEY not in str(place)


def test_sixty_images_captioned_from_their_pixels_priced_per_row_and_a_rerun_sends_nothing(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 60, per_shard=20).path
    with FakeGemini(api_key=KEY) as server:
        first = gemini(src, tmp_path / "out", server, env, "-O", "thinking_budget=24", "--json")
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout)["caption_status"] == {"ok": 60}
        stats = server.stats()
        got = rows(tmp_path / "out")
        assert {k: r["caption"] for k, r in got.items()} == expected_captions(src)
        price = DEFAULT_PRICES[MODEL]
        for r in got.values():
            assert (r["caption_backend"], r["caption_model"], r["caption_status"]) == ("gemini", MODEL, "ok")
            # 320x240 is one Gemini image (258 tokens) plus the prompt; thinking tokens are billed as output.
            assert r["caption_input_tokens"] > 258 and r["caption_output_tokens"] > 24
            exact = (r["caption_input_tokens"] * price.input + r["caption_output_tokens"] * price.output) / 1e6
            assert r["caption_cost_usd"] == pytest.approx(exact, rel=1e-12)
        assert sum(r["caption_input_tokens"] for r in got.values()) == stats["input_tokens"]
        assert sum(r["caption_output_tokens"] for r in got.values()) == stats["output_tokens"]
        assert sorted(stats["image_successes"].values()) == [1] * 60
        again = gemini(src, tmp_path / "out", server, env, "-O", "thinking_budget=24", "--json")
        assert again.returncode == 0, again.stderr
        assert server.stats()["requests"] == stats["requests"] == 60, "a rerun sends nothing"
        assert server.seen_keys_in_urls == 0, "the key travels in a header, never in a URL"
    assert_no_key(tmp_path / "out", tmp_path / "cache", first.stdout, first.stderr, again.stdout, again.stderr)


FAULTS = {
    # index: (marker in the alt-text, caption_status, what the error says)
    0: ("[[fault:429x2]]", "ok", None),
    1: ("[[fault:429-barex1]]", "ok", None),
    2: ("[[fault:503x2]]", "ok", None),
    3: ("[[fault:malformedx1]]", "ok", None),
    4: ("[[fault:safety]]", "refused", "refused: the reply was stopped (SAFETY)"),
    5: ("[[fault:recitation]]", "refused", "refused: the reply was stopped (RECITATION)"),
    6: ("[[fault:blocked]]", "refused", "refused: the prompt was blocked (PROHIBITED_CONTENT)"),
    7: ("[[fault:length]]", "truncated", "reply cut at --max-tokens 300: A wide"),
    8: ("[[fault:badimage]]", "error", "HTTP 400: INVALID_ARGUMENT: Unable to process input image."),
    9: ("[[fault:500]]", "error", "HTTP 500: INTERNAL: An internal error has occurred. Please retry."),
}


def test_faults_and_stop_reasons_map_to_statuses_and_a_429_storm_backs_off(tmp_path, env):
    marker = lambda i: FAULTS[i][0] if i in FAULTS else ""  # noqa: E731
    src = write_image_dataset(tmp_path / "in", 16, per_shard=16, caption=lambda i: f"photo {i} {marker(i)}").path
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Caption this image. Its alt-text, as data: {alt_text}")
    with FakeGemini(api_key=KEY, fail_next=["429"] * 6) as server:  # a storm first, each 429 with its retryDelay
        r = gemini(src, tmp_path / "out", server, env, "--prompt", str(prompt), "--max-retries", "3", "--max-error-share", "0.2")
        assert r.returncode == 0, r.stderr
        assert server.stats()["responses"]["429"] >= 6 + 2 + 1
    got = rows(tmp_path / "out")
    for i, (mark, status, said) in FAULTS.items():
        row = got[f"{i:09d}"]
        assert row["caption_status"] == status, (mark, row["caption_error"])
        if said is not None:
            assert row["caption_error"].startswith(said), (mark, row["caption_error"])
    assert all(got[f"{i:09d}"]["caption_status"] == "ok" for i in range(10, 16))
    assert got["000000004"]["caption_cost_usd"] > 0 and got["000000006"]["caption_input_tokens"] > 0, "refusals are billed"
    assert got["000000007"]["caption_output_tokens"] <= 300


def test_a_503_storm_before_any_answer_stops_the_run_with_googles_words_and_the_rerun_captions_all(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 8, per_shard=8).path
    with FakeGemini(api_key=KEY, fail_next=["503"] * 40) as server:
        r = gemini(src, tmp_path / "out", server, env, "--concurrency", "1", "--max-retries", "1")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        said = "the server failed the first 5 requests with: HTTP 503: UNAVAILABLE: An internal error has occurred. Please retry."
        assert said in r.stderr
        assert server.stats()["requests"] == 10  # 5 samples, 2 attempts each: then it stopped
        assert not Dataset(tmp_path / "out").completed_ids(), "nothing recorded for the storm"
        server.configure(fail_next=[])
        r = gemini(src, tmp_path / "out", server, env, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["caption_status"] == {"ok": 8}, r.stderr


def test_a_rejected_key_is_one_line_without_the_key_and_google_api_key_is_the_fallback(monkeypatch, tmp_path):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY_FILE", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY_FILE", raising=False)
    with pytest.raises(BackendError, match=r"^no API key: set the environment variable GEMINI_API_KEY or GOOGLE_API_KEY,"):
        backend_class("gemini").from_options({})
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    monkeypatch.setenv("GOOGLE_API_KEY_FILE", str(key_file))
    with FakeGemini(api_key="another key") as server:
        backend = backend_class("gemini").from_options({"base_url": [server.base_url]})
        with pytest.raises(BackendError) as refused:
            backend.check()
        assert str(refused.value) == (
            f"{server.base_url} rejected the API key in $GEMINI_API_KEY: API key not valid. Please pass a valid API key."
        )
        assert KEY not in str(refused.value) and "\n" not in str(refused.value)
        server.configure(api_key=KEY)
        backend.check()  # the key came from $GOOGLE_API_KEY_FILE
        with pytest.raises(BackendError, match="model 'gemini-9': models/gemini-9 is not found"):
            backend_class("gemini").from_options({"base_url": [server.base_url], "model": "gemini-9"}).check()
    assert backend.parameters()["rpm"] == 1000, "no rate-limit headers: the model's tier-1 limits"


def test_flash_is_asked_not_to_think_by_default_and_pro_thinks_its_own_way():
    """A caption needs no thinking, and thinking is billed as output from the same --max-tokens: 2.5 Flash
    and Flash-Lite are sent a thinking budget of 0 unless told otherwise; Pro, which must think, is not."""
    request = CaptionRequest("k", jpeg_bytes(scene(0, (64, 48))), None, "Caption it.")
    budgets = {}
    for model, given in (
        ("gemini-2.5-flash", {}),
        ("gemini-2.5-flash-lite", {}),
        ("gemini-2.5-pro", {}),
        ("gemini-2.5-pro", {"thinking_budget": "128"}),
    ):
        backend = backend_class("gemini").from_options({"model": model, "base_url": ["http://127.0.0.1:9"], **given})
        body, _ = backend.build_body(request)
        budgets[(model, bool(given))] = (body["generationConfig"].get("thinkingConfig") or {}).get("thinkingBudget")
        assert backend.identity()["thinking_budget"] == budgets[(model, bool(given))], "the budget is in the cache key"
    assert budgets == {
        ("gemini-2.5-flash", False): 0,
        ("gemini-2.5-flash-lite", False): 0,
        ("gemini-2.5-pro", False): None,
        ("gemini-2.5-pro", True): 128,
    }


# -- gemini-batch --------------------------------------------------------------------------------------


def batch_args(src, out, server, *extra: str, wait: bool = True) -> list[str]:
    return [
        *("caption", str(src), str(out), "--backend", "gemini-batch", "--model", MODEL, "--base-url", server.base_url),
        *("--no-cache", "--quiet", "--max-requests-per-file", "3", *(("--wait", "--poll-interval", "0.1") if wait else ())),
        *extra,
    ]


@pytest.fixture(scope="module")
def batch_input(tmp_path_factory):
    return write_image_dataset(tmp_path_factory.mktemp("gemini-batch") / "in", 12, per_shard=4).path


@pytest.fixture(scope="module")
def clean_batch_rows(batch_input, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemini-clean") / "out"
    with FakeGemini(api_key=KEY, batch_delay_s=0.05) as server:
        r = run_cli(*batch_args(batch_input, out, server, "--json"), env={"GEMINI_API_KEY": KEY})
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["caption_status"] == {"ok": 12}
        assert server.gemini_uploads == [u for u in server.gemini_uploads if u.startswith("lenscap-")]
    got = rows(out)
    price = DEFAULT_PRICES[MODEL]
    for r in got.values():
        exact = (r["caption_input_tokens"] * price.input + r["caption_output_tokens"] * price.output) / 1e6
        assert r["caption_cost_usd"] == pytest.approx(exact / 2, rel=1e-12), "batch mode bills half"
    assert {k: r["caption"] for k, r in got.items()} == expected_captions(batch_input)
    return got


@pytest.mark.parametrize("moment", ["packing", "upload", "create", "polling"])
def test_gemini_batch_killed_at_each_step_pays_each_request_once(tmp_path, env, batch_input, clean_batch_rows, moment):
    n, per_file = 12, 3
    delays = {"upload": {"upload_delay_s": 2.0}, "create": {"create_delay_s": 2.0}}.get(moment, {})
    with FakeGemini(api_key=KEY, batch_delay_s=0.3, **delays) as server:
        args = batch_args(batch_input, tmp_path / "out", server, "--poll-interval", "0.2")
        kill_batch_job_at(moment, args, env, tmp_path / "out", n // per_file)
        server.configure(upload_delay_s=0.0, create_delay_s=0.0)
        r = run_cli(*batch_args(batch_input, tmp_path / "out", server, "--json"), env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["caption_status"] == {"ok": n}
        files = records(tmp_path / "out")
        assert len(files) == n // per_file
        inputs = [b["metadata"]["inputConfig"]["fileName"] for b in server.gbatches.values()]
        assert len(inputs) == len(set(inputs)) == len(files), "one batch per batch file"
        assert len(server.gemini_uploads) == len(set(server.gemini_uploads)) == len(files), "one upload per batch file"
        assert not server.gfiles, "merged batches' input and results files are deleted"
        assert sorted(server.image_successes.values()) == [1] * n, "every request paid once"
        assert server.seen_keys_in_urls == 0
    assert rows(tmp_path / "out") == clean_batch_rows
    assert_no_key(tmp_path / "out", r.stdout, r.stderr)


def test_gemini_batch_status_and_cancel_then_a_rerun_asks_the_cancelled_requests_again(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 6, per_shard=6).path
    with FakeGemini(api_key=KEY, batch_delay_s=3600) as server:
        assert run_cli(*batch_args(src, tmp_path / "out", server, wait=False), env=env).returncode == 0
        status = run_cli("batch", "status", str(tmp_path / "out"), "--json", env=env)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["files"] == {"submitted": 2} and json.loads(status.stdout)["backend"] == "gemini-batch"
        r = run_cli("batch", "cancel", str(tmp_path / "out"), env=env)
        assert r.returncode == 0 and "cancelled 2 batch(es)" in r.stderr, r.stderr
        assert {b["metadata"]["state"] for b in server.gbatches.values()} == {"BATCH_STATE_CANCELLED"}
        server.configure(batch_delay_s=0.05)
        r = run_cli(*batch_args(src, tmp_path / "out", server, "--json"), env=env)
        assert r.returncode == 0 and json.loads(r.stdout)["caption_status"] == {"ok": 6}, r.stderr
        states = [b["metadata"]["state"] for b in server.gbatches.values()]
        assert states == ["BATCH_STATE_CANCELLED"] * 2 + ["BATCH_STATE_SUCCEEDED"] * 2
        assert sorted(server.image_successes.values()) == [1] * 6


def test_without_the_sdk_gemini_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.genai", None)  # an import of it now fails, as when it is absent
    backend = backend_class("gemini").from_options({"base_url": ["http://127.0.0.1:9"]})
    with pytest.raises(MissingDependency) as missing:
        backend.check()
    assert str(missing.value) == "--backend gemini needs the google-genai SDK: pip install 'lenscap-datasets[gemini]'"


def test_gemini_batch_maps_stop_reasons_and_asks_a_failed_request_again_in_the_next_round(tmp_path, env):
    marks = {0: "[[fault:500x1]]", 1: "[[fault:badimage]]", 2: "[[fault:safety]]", 3: "[[fault:length]]", 4: "[[fault:blocked]]"}
    src = write_image_dataset(tmp_path / "in", 6, per_shard=6, caption=lambda i: f"photo {i} {marks.get(i, '')}").path
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Caption this image. Its alt-text, as data: {alt_text}")
    with FakeGemini(api_key=KEY, batch_delay_s=0.05) as server:
        r = run_cli(*batch_args(src, tmp_path / "out", server, "--prompt", str(prompt), "--json"), env=env)
        assert r.returncode == 0, r.stderr
        assert len(server.gbatches) == 3, "two files, then one more round for the 500"
        assert sorted(server.image_successes.values()) == [1] * 5, "the bad image is not billed; no other paid twice"
    got = {k: (row["caption_status"], row["caption_error"]) for k, row in rows(tmp_path / "out").items()}
    assert got["000000000"] == ("ok", None) and got["000000005"] == ("ok", None)
    assert got["000000001"] == ("error", "HTTP 400: Unable to process input image. Please retry or report in the forum.")
    assert got["000000002"] == ("refused", "refused: the reply was stopped (SAFETY)")
    assert got["000000003"][0] == "truncated" and got["000000003"][1].startswith("reply cut at --max-tokens 300: A wide")
    assert got["000000004"] == ("refused", "refused: the prompt was blocked (PROHIBITED_CONTENT)")
