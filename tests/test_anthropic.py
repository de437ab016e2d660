"""``--backend anthropic`` and ``anthropic-batch`` through the official SDK against the fake Messages API:
captions from the pixels, tokens and cost per row, reruns that send nothing, faults mapped to statuses,
rate limits learned from Anthropic's headers, the key nowhere, and SIGKILL at every step of a batch job."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli, solid_jpeg
from test_caption import rows
from test_caption_batch import kill_batch_job_at, records

from lenscap.caption.backends.anthropic_batch import AnthropicBatchBackend
from lenscap.caption.backends.anthropic_messages import AnthropicBackend, limit_headers
from lenscap.caption.backends.base import CaptionRequest
from lenscap.caption.pricing import PriceTable
from lenscap.core.errors import MissingDependency
from lenscap.demo.datasets import write_image_dataset
from lenscap.testing.fake_anthropic import FakeAnthropic
from lenscap.testing.fake_openai import FakeOpenAI

KEY = "sk-ant-test-LEAKCHECK-0123456789"
MODEL = "claude-sonnet-4-5"


@pytest.fixture
def env(tmp_path):
    return {"ANTHROPIC_API_KEY": KEY, "LENSCAP_CACHE_DIR": str(tmp_path / "cache"), "ANTHROPIC_BASE_URL": None}


@pytest.fixture(scope="module")
def sixty(tmp_path_factory):
    return write_image_dataset(tmp_path_factory.mktemp("sixty") / "in", 60, per_shard=30).path


def caption_args(src, out, server, backend="anthropic", *extra):
    return [
        "caption",
        str(src),
        str(out),
        "--backend",
        backend,
        "--model",
        MODEL,
        "--base-url",
        server.base_url,
        "--quiet",
        *extra,
    ]


def no_key_in(*places) -> None:
    for place in places:
        if isinstance(place, Path):
            for f in place.rglob("*"):
                assert not f.is_file() or KEY.encode() not in f.read_bytes(), f"the API key leaked into {f}"
        else:
            assert KEY not in str(place)


def test_sixty_images_captioned_from_their_pixels_priced_per_row_and_a_rerun_sends_nothing(tmp_path, env, sixty):
    with FakeAnthropic(api_key=KEY, rpm=6000, tpm=1_000_000) as fake:
        r = run_cli(*caption_args(sixty, tmp_path / "out", fake, "anthropic", "--json"), env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["caption_status"] == {"ok": 60}
        got = rows(tmp_path / "out")
        prices = PriceTable()
        for row in got.values():
            assert row["caption"].startswith("A wide 320x240 picture dominated by"), row["caption"]
            assert (row["caption_backend"], row["caption_model"]) == ("anthropic", MODEL)
            assert row["caption_input_tokens"] > 0 and row["caption_output_tokens"] > 0
            exact = prices.cost(MODEL, row["caption_input_tokens"], row["caption_output_tokens"])
            assert row["caption_cost_usd"] == pytest.approx(exact, rel=1e-9)
        assert sorted(fake.image_successes.values()) == [1] * 60
        sent = fake.requests
        again = run_cli(*caption_args(sixty, tmp_path / "out", fake), env=env)  # the same output: done
        cached = run_cli(*caption_args(sixty, tmp_path / "copy", fake), env=env)  # a new one: the response cache
        assert again.returncode == cached.returncode == 0, again.stderr + cached.stderr
        assert fake.requests == sent, "a rerun sends nothing"
        assert {k: r["caption"] for k, r in rows(tmp_path / "copy").items()} == {k: r["caption"] for k, r in got.items()}
        no_key_in(tmp_path, r.stdout, r.stderr, again.stderr, cached.stderr)


def test_the_cache_key_names_the_provider(tmp_path, env):
    """The same images, prompt and model name through another provider's API are asked again, not
    answered from the other's cache."""
    src = write_image_dataset(tmp_path / "in", 3, per_shard=3).path
    with FakeAnthropic(api_key=KEY) as fake:
        assert run_cli(*caption_args(src, tmp_path / "a", fake), env=env).returncode == 0
    with FakeOpenAI(models=(MODEL,)) as openai_fake:
        r = run_cli(*caption_args(src, tmp_path / "o", openai_fake, "openai"), env={**env, "OPENAI_API_KEY": "sk-o"})
        assert r.returncode == 0, r.stderr
        assert openai_fake.stats()["responses"] == {"200": 3}
    assert {r["caption_backend"] for r in rows(tmp_path / "o").values()} == {"openai"}


def test_storms_refusals_cut_replies_and_bad_images_map_to_statuses(tmp_path, env):
    faults = {1: " [[fault:refusal]]", 2: " [[fault:max-tokens]]", 3: " [[fault:529x2]]", 4: " [[fault:badimage]]"}
    src = write_image_dataset(tmp_path / "in", 10, per_shard=10, caption=lambda i: f"thing {i}{faults.get(i, '')}").path
    prompt = tmp_path / "p.txt"
    prompt.write_text("Caption this image. Alt-text: {alt_text}")
    with FakeAnthropic(api_key=KEY, fail_next=["429"] * 6) as fake:
        r = run_cli(*caption_args(src, tmp_path / "out", fake, "anthropic", "--prompt", str(prompt), "--json"), env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["caption_status"] == {"ok": 7, "refused": 1, "truncated": 1, "error": 1}
        got = rows(tmp_path / "out")
        assert got["000000001"]["caption_error"].startswith("refused: the model declined")
        assert got["000000002"]["caption_error"].startswith("reply cut at --max-tokens 300")
        assert got["000000003"]["caption_status"] == "ok"  # two 529s (overloaded), then an answer
        error = got["000000004"]["caption_error"]
        assert error.startswith("HTTP 400: messages.0.content.0.image") and "\n" not in error
        assert fake.responses[429] == 6 and fake.responses[529] == 2
    no_key_in(tmp_path, r.stderr)


def test_a_rejected_key_stops_in_one_line_without_the_key(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 2, per_shard=2).path
    with FakeAnthropic(api_key=KEY) as fake:
        wrong = "sk-ant-wrong-SECRET-987"
        r = run_cli(*caption_args(src, tmp_path / "out", fake), env={**env, "ANTHROPIC_API_KEY": wrong})
    assert r.returncode != 0 and "rejected the API key in $ANTHROPIC_API_KEY: invalid x-api-key" in r.stderr
    assert wrong not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_limiter_learns_anthropics_headers_input_and_output_apart(monkeypatch):
    headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "49",
        "anthropic-ratelimit-requests-reset": "2030-01-01T00:00:30Z",
        "anthropic-ratelimit-input-tokens-limit": "30000",
        "anthropic-ratelimit-input-tokens-remaining": "29000",
        "anthropic-ratelimit-output-tokens-limit": "8000",
        "anthropic-ratelimit-output-tokens-remaining": "7000",
        "retry-after": "7",
    }
    now = 1893456000.0  # 2030-01-01T00:00:00Z
    assert limit_headers(headers, now) == {
        "x-ratelimit-limit-requests": "50",
        "x-ratelimit-remaining-requests": "49",
        "x-ratelimit-reset-requests": "30.000",
        "x-ratelimit-limit-tokens": "30000",
        "x-ratelimit-remaining-tokens": "29000",
        "x-ratelimit-limit-output-tokens": "8000",
        "x-ratelimit-remaining-output-tokens": "7000",
        "retry-after": "7",
    }
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    backend = AnthropicBackend.from_options({"model": MODEL})
    limiter = backend.endpoints[0].limiter
    limiter.observe(limit_headers(headers, now))
    assert (limiter.requests.per_minute, limiter.tokens.per_minute, limiter.output.per_minute) == (50, 30000, 8000)
    assert limiter.on_rate_limited(limit_headers(headers, now), 1.0) == 7.0


def test_an_online_run_reads_the_servers_limits_with_the_key_from_a_file(monkeypatch, tmp_path):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    (tmp_path / "key").write_text(KEY + "\n")
    monkeypatch.setenv("ANTHROPIC_API_KEY_FILE", str(tmp_path / "key"))  # the server refuses any other key
    with FakeAnthropic(api_key=KEY, rpm=600, tpm=90_000) as fake:
        backend = AnthropicBackend.from_options({"model": MODEL, "base_url": [fake.base_url]})
        done = []
        backend.caption_all([CaptionRequest(str(i), solid_jpeg(), None, "Describe.") for i in range(4)], done.append)
    assert [r.status for r in done] == ["ok"] * 4
    limiter = backend.endpoints[0].limiter
    assert (limiter.requests.per_minute, limiter.tokens.per_minute) == (600, 90_000)


# -- anthropic-batch ------------------------------------------------------------------------------


def batch_args(src, out, server, *extra):
    return caption_args(src, out, server, "anthropic-batch", "--no-cache", "--wait", "--poll-interval", "0.1", *extra)


def test_batch_flow_rounds_half_price_and_status(tmp_path, env):
    faults = {5: " [[fault:500x1]]", 6: " [[fault:malformedx1]]", 7: " [[fault:badimage]]", 8: " [[fault:refusal]]"}
    src = write_image_dataset(tmp_path / "in", 16, per_shard=8, caption=lambda i: f"thing {i}{faults.get(i, '')}").path
    prompt = tmp_path / "p.txt"
    prompt.write_text("Caption this image. Alt-text: {alt_text}")
    with FakeAnthropic(api_key=KEY, batch_delay_s=0.1) as fake:
        r = run_cli(
            *batch_args(src, tmp_path / "out", fake, "--prompt", str(prompt), "--max-requests-per-file", "10", "--json"), env=env
        )
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        assert summary["complete"] is True and summary["caption_status"] == {"ok": 14, "refused": 1, "error": 1}
        got = rows(tmp_path / "out")
        assert got["000000005"]["caption_status"] == got["000000006"]["caption_status"] == "ok"  # asked again in round 1
        assert got["000000007"]["caption_error"].startswith("HTTP 400: messages.0.content.0.image")
        ok = got["000000000"]
        assert ok["caption"].startswith("A wide 320x240 picture dominated by")
        full = PriceTable().cost(MODEL, ok["caption_input_tokens"], ok["caption_output_tokens"])
        assert ok["caption_cost_usd"] == pytest.approx(full / 2), "batch price: half"
        assert [f["round"] for f in records(tmp_path / "out")] == [0, 0, 1]
        status = json.loads(run_cli("batch", "status", str(tmp_path / "out"), "--json").stdout)
        assert status["backend"] == "anthropic-batch" and status["files"] == {"merged": 3} and status["requests"] == 18
        assert all(len(r["custom_id"]) <= 64 for b in fake.batches.values() for r in b["_requests"])
    no_key_in(tmp_path, r.stderr)


def test_cancel_then_rerun_asks_the_cancelled_requests_again(tmp_path, env):
    src = write_image_dataset(tmp_path / "in", 4, per_shard=4).path
    with FakeAnthropic(api_key=KEY, batch_delay_s=3600) as fake:
        submit = caption_args(src, tmp_path / "out", fake, "anthropic-batch", "--no-cache")
        assert run_cli(*submit, env=env).returncode == 0
        r = run_cli("batch", "cancel", str(tmp_path / "out"), env=env)
        assert r.returncode == 0 and "cancelled 1 batch(es)" in r.stderr, r.stderr
        fake.configure(batch_delay_s=0.05)
        r = run_cli(*batch_args(src, tmp_path / "out", fake, "--json"), env=env)
        assert r.returncode == 0 and json.loads(r.stdout)["caption_status"] == {"ok": 4}, r.stderr
        ended = sorted(fake.batches.values(), key=lambda b: b["id"])
        assert [b["request_counts"]["canceled"] for b in ended] == [4, 0] and sorted(fake.image_successes.values()) == [1] * 4


@pytest.fixture(scope="module")
def batch_source(tmp_path_factory):
    """The dataset the SIGKILL tests caption, and its clean run's rows (one run for every kill)."""
    root = tmp_path_factory.mktemp("batch")
    src = write_image_dataset(root / "in", 12, per_shard=6).path
    env = {"ANTHROPIC_API_KEY": KEY, "LENSCAP_CACHE_DIR": str(root / "cache")}
    with FakeAnthropic(batch_delay_s=0.05) as fake:
        r = run_cli(*batch_args(src, root / "clean", fake, "--max-requests-per-file", "3"), env=env)
        assert r.returncode == 0, r.stderr
    return src, rows(root / "clean")


@pytest.mark.parametrize("moment", ["packing", "create", "polling", "merging"])
def test_sigkill_at_each_step_then_rerun_pays_each_request_once(tmp_path, env, batch_source, moment):
    src, clean = batch_source
    n, per_file = 12, 3
    with FakeAnthropic(batch_delay_s=0.3, create_delay_s=2.0 if moment == "create" else 0.0) as fake:
        args = batch_args(src, tmp_path / "out", fake, "--max-requests-per-file", str(per_file))
        kill_batch_job_at(moment, args, env, tmp_path / "out", n // per_file)
        fake.configure(create_delay_s=0.0)
        r = run_cli(*batch_args(src, tmp_path / "out", fake, "--max-requests-per-file", str(per_file), "--json"), env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["caption_status"] == {"ok": n}
        assert len(fake.batches) == len(records(tmp_path / "out")) == n // per_file, "one batch per batch file"
        assert sorted(fake.image_successes.values()) == [1] * n, "every request paid once"
    assert rows(tmp_path / "out") == clean


def _batch_files(root: Path, name: str, requests: int) -> None:
    """A cut batch file of ``requests`` lines and its id lines, as the job leaves them in inputs/."""
    (root / "inputs").mkdir(parents=True, exist_ok=True)
    body = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "Say hi."}]}
    with open(root / "inputs" / f"{name}.jsonl", "w") as lines, open(root / "inputs" / f"{name}.ids", "w") as ids:
        for i in range(requests):
            lines.write(json.dumps({"custom_id": f"000000/{i:09d}", "body": body}) + "\n")
            ids.write(f"000000/{i:09d}\tk\tnull\t1\t1\t0.0\n")


def test_a_batch_created_before_a_kill_is_found_by_its_size_and_ids_never_another(tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    with FakeAnthropic(api_key=KEY, batch_delay_s=3600) as fake:
        transport = AnthropicBatchBackend.from_options({"model": MODEL, "base_url": [fake.base_url]}).transport(tmp_path)
        ours = {"lenscap_job": "a" * 32, "lenscap_file": "r00-000001", "lenscap_try": "0"}
        other = {**ours, "lenscap_file": "r00-000002"}
        _batch_files(tmp_path, "r00-000001", 3)
        _batch_files(tmp_path, "r00-000002", 3)
        since = time.time()
        made = transport.create("r00-000001", ours)
        assert transport.find_batch(ours, since) == made  # in progress: its size and time
        assert transport.find_batch(ours, since, {made}) is None  # recorded for another file
        fake.release_batches()
        fake.batches[made]["_ready_at"] = 0.0
        assert transport.poll(made)["status"] == "completed"
        assert transport.find_batch(ours, since) == made  # ended: its results carry this file's ids
        assert transport.find_batch(other, since) is None  # the same size, another file's ids
        _batch_files(tmp_path, "r00-000003", 4)
        assert transport.find_batch({**ours, "lenscap_file": "r00-000003"}, since) is None  # another size
        assert transport.find_batch(ours, since + 3 * transport.SEARCH_MARGIN_S) is None  # made before the intent


def test_without_the_sdk_the_backend_says_which_extra_installs_it(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setitem(sys.modules, "anthropic", None)  # an import of it fails, as when it is not installed
    backend = AnthropicBackend.from_options({"model": MODEL})
    with pytest.raises(MissingDependency, match=r"pip install 'lenscap-datasets\[anthropic\]'"):
        backend.check()
