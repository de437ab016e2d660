"""lenscap estimate: figures against a hand computation, measured tokens with --from, batch files by
bytes and by requests, measured request lines with --sample-from against the real packer, the batch
wall time under a queue limit, the online wall time at the stated tier 1 limits when none are given,
caption's default model, counts such as 800M, bad flags."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import run_cli

from lenscap.caption.backends.openai_batch import BatchFilesBackend
from lenscap.caption.backends.openai_chat import OpenAIChatBackend
from lenscap.caption.prompts import PRESETS, load_prompt
from lenscap.caption.stage import CaptionStage
from lenscap.core.dataset import Dataset
from lenscap.core.layout import shard_name
from lenscap.core.record import Sample
from lenscap.demo.datasets import write_image_dataset

MIB = 1024 * 1024


def estimate(*args: str) -> dict:
    r = run_cli("estimate", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def lens_prompt_tokens() -> int:
    lens = PRESETS["lens"]
    return math.ceil(len(lens.template) / 4) + 4 + math.ceil(len(lens.system) / 4) + 4


def test_lens_scale_job_by_hand():
    out = estimate("--images", "800000000", "--model", "gpt-4.1", "--batch", "--detail", "low", "--output-words", "109")
    # by hand: GPT-4.1 at low detail bills 85 tokens an image; the prompt is about a token per 4 characters
    # (+4 per message); 109 words are ceil(109 * 4 / 3) = 146 tokens; $2 / $8 per 1M tokens, halved for batch
    per_in, per_out = 85 + lens_prompt_tokens(), 146
    assert out["per_image"] == {"input_tokens": per_in, "output_tokens": per_out}
    assert out["total"]["input_tokens"] == per_in * 800_000_000
    expected = (per_in * 800e6 * 2.00 + per_out * 800e6 * 8.00) / 1e6 / 2
    assert abs(out["total"]["cost_usd"] - expected) < 0.01
    # docs/scale.md: 87,488 B a line of a natural photo at max side 512; 200 MiB / 87,488 B = 2,397 a file
    wall = out["wall_time"]
    assert (wall["line_bytes"], wall["requests_per_file"], wall["bound_by"]) == (87_488, 2_397, "bytes")
    assert wall["files"] == wall["batches"] == math.ceil(800_000_000 / 2_397) == 333_751
    assert wall["line_bytes_basis"].startswith("assumed:") and "--sample-from" in wall["line_bytes_basis"]
    assert "--max-enqueued-tokens" in wall["note"] and "hours" not in wall


def test_batch_files_bound_by_requests_when_lines_are_small():
    # At max side 64 the image part is (64/512)^2 of docs/scale.md's 86,078 B: a 2,755 B line, 76,122 to
    # 200 MiB, so the 50,000 requests bind.
    wall = estimate("--images", "800M", "--batch", "--max-side", "64", "--model", "gpt-4.1")["wall_time"]
    assert wall["line_bytes"] == round(1_410 + 86_078 / 64)
    assert (wall["requests_per_file"], wall["bound_by"], wall["files"]) == (50_000, "requests", 16_000)
    wall = estimate("--images", "800M", "--batch", "--max-requests-per-file", "1000")["wall_time"]
    assert (wall["requests_per_file"], wall["bound_by"], wall["files"]) == (1_000, "requests", 800_000)
    wall = estimate("--images", "800M", "--batch", "--max-file-mib", "100")["wall_time"]
    assert (wall["requests_per_file"], wall["bound_by"]) == (100 * MIB // 87_488, "bytes")
    r = run_cli("estimate", "--images", "800M", "--batch", "--max-side", "64")
    assert r.returncode == 0 and "16,000 of up to 50,000 requests (bound by 50,000 requests a file, not 200 MiB)" in r.stdout


def test_batch_wall_time_in_waves_under_the_queue_limit():
    per_in = 85 + lens_prompt_tokens()
    per_file = 2_397 * per_in  # input tokens, as OpenAI counts the queue
    queue = 10_000_000
    out = estimate("--images", "800M", "--model", "gpt-4.1", "--batch", "--max-enqueued-tokens", "10M")
    wall = out["wall_time"]
    at_once = queue // per_file
    waves = math.ceil(333_751 / at_once)
    assert (wall["tokens_per_file"], wall["files_at_once"], wall["waves"]) == (per_file, at_once, waves)
    assert wall["hours"] == [waves * 1.0, waves * 24.0] and "note" not in wall
    # past two years a duration reads in years
    assert wall["human"] == f"{waves / 24 / 365:,.0f} years to {waves / 365:,.0f} years"
    r = run_cli(
        "estimate",
        "--images",
        "800M",
        "--model",
        "gpt-4.1",
        "--batch",
        "--max-enqueued-tokens",
        str(queue),
        "--batch-hours",
        "2-12",
    )
    assert r.returncode == 0, r.stderr
    assert "333,751 of up to 2,397 requests (bound by 200 MiB a file, not 50,000 requests)" in r.stdout
    assert f"{waves:,} waves of {at_once} files at once" in r.stdout and "2-12 h a wave" in r.stdout
    # one number: every batch takes that long; a queue under one file still runs one file at a time, with a warning
    wall = estimate("--images", "800M", "--model", "gpt-4.1", "--batch", "--max-enqueued-tokens", "1000", "--batch-hours", "24")[
        "wall_time"
    ]
    assert wall["files_at_once"] == 1 and wall["hours"] == [333_751 * 24.0] * 2
    assert "lower --max-requests-per-file" in wall["note"]


def test_online_without_limits_is_timed_at_tier_1_and_says_so():
    # OpenAI's usage tier 1 for gpt-4.1: 500 requests and 30,000 tokens a minute. 263 + 146 tokens a
    # request: 30,000 / 409 = 73.3 requests a minute, the tokens bind.
    out = estimate("--images", "1000", "--model", "gpt-4.1")
    wall = out["wall_time"]
    per = out["per_image"]["input_tokens"] + out["per_image"]["output_tokens"]
    assert wall["tier"] == {"name": "tier 1", "model": "gpt-4.1", "rpm": 500, "tpm": 30_000}
    assert wall["limited_by"] == "tpm" and wall["requests_per_minute"] == round(30_000 / per, 1)
    assert abs(wall["hours"] - 1000 / (30_000 / per) / 60) < 0.01
    assert wall["note"] == "at tier 1 limits (500 RPM, 30,000 TPM for gpt-4.1); give --rpm/--tpm for yours"
    r = run_cli("estimate", "--images", "1000", "--model", "gpt-4.1")
    assert r.returncode == 0, r.stderr
    assert f"wall time:  {wall['human']} at {wall['requests_per_minute']:,} requests/min (limited by tpm)" in r.stdout
    assert "at tier 1 limits (500 RPM, 30,000 TPM for gpt-4.1); give --rpm/--tpm for yours" in r.stdout
    # gpt-4.1-mini's tier 1 allows 200,000 tokens a minute: 500 requests bind for small images
    wall = estimate("--images", "1000", "--model", "gpt-4.1-mini", "--max-side", "64")["wall_time"]
    assert (wall["tier"]["tpm"], wall["limited_by"], wall["requests_per_minute"]) == (200_000, "rpm", 500)
    # a dated name has its model's limits; a model with a price but no known limits is timed at gpt-4.1's, and says so
    assert estimate("--images", "10", "--model", "gpt-4.1-2025-04-14")["wall_time"]["tier"]["model"] == "gpt-4.1"


def test_given_limits_replace_the_tier(tmp_path):
    wall = estimate("--images", "1000", "--model", "gpt-4.1", "--rpm", "60")["wall_time"]
    assert "tier" not in wall and "note" not in wall and (wall["limited_by"], wall["requests_per_minute"]) == ("rpm", 60)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"my-vlm": {"input": 0.1, "output": 0.2}}))
    wall = estimate("--images", "1000", "--model", "my-vlm", "--prices", str(prices))["wall_time"]
    assert wall["tier"]["model"] == "gpt-4.1" and "my-vlm's are not known" in wall["note"] and "--rpm/--tpm" in wall["note"]


def test_default_model_is_captions():
    default = next(o.default for o in OpenAIChatBackend.options if o.name == "model")
    from lenscap.estimate.options import EstimateOptions

    assert EstimateOptions(images="10").model == default == "gpt-4.1-mini"
    out = estimate("--images", "10")
    assert out["request"]["model"] == default and out["total"]["cost_usd"] >= 0 and out["wall_time"]["tier"]["model"] == default


def test_an_unknown_model_says_how_to_price_it():
    for args in (["--images", "5", "--model", "mystery"], ["--images", "5", "--model", "mystery", "--json"]):
        r = run_cli("estimate", *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "no price known for model 'mystery'" in r.stderr and "--prices FILE" in r.stderr
        assert '{"MODEL": {"input": USD, "output": USD}} per 1M tokens' in r.stderr


def test_online_wall_time_is_set_by_the_tighter_limit():
    out = estimate("--images", "1000000", "--model", "gpt-4.1-mini", "--rpm", "10000", "--tpm", "2000000")
    per = out["per_image"]["input_tokens"] + out["per_image"]["output_tokens"]
    assert out["per_image"]["input_tokens"] == 312 + lens_prompt_tokens()  # 512x384: 16x12 patches x 1.62
    per_minute = min(10_000, 2_000_000 / per)
    assert out["wall_time"]["limited_by"] == "tpm"
    assert abs(out["wall_time"]["hours"] - 1_000_000 / per_minute / 60) < 0.01


@pytest.mark.parametrize(
    "text, count",
    [
        ("800000000", 800_000_000),
        ("800,000,000", 800_000_000),
        ("8e8", 800_000_000),
        ("800M", 800_000_000),
        ("800m", 800_000_000),
        ("1.5B", 1_500_000_000),
        ("10k", 10_000),
        ("1.1K", 1_100),
        ("7", 7),
    ],
)
def test_image_counts(text, count):
    assert estimate("--images", text)["total"]["output_tokens"] == 146 * count


def test_from_a_captioned_dataset(tmp_path):
    ds = Dataset.create(tmp_path / "c")
    w = ds.writer(0)
    for i, (status, tin, tout, cached) in enumerate(
        [("ok", 300, 100, False), ("ok", 500, 140, False), ("ok", 9999, 9999, True), ("error", 9999, 9999, False)]
    ):
        w.write(
            Sample(
                f"{i:09d}",
                {
                    "status": "success",
                    "caption_status": status,
                    "caption_input_tokens": tin,
                    "caption_output_tokens": tout,
                    "caption_cached": cached,
                    "caption_model": "gpt-4.1",
                },
            )
        )
    w.commit()
    out = estimate("--images", "1000", "--model", "gpt-4.1", "--from", str(tmp_path / "c"))
    assert out["per_image"] == {"input_tokens": 400.0, "output_tokens": 120.0}  # uncached successes only
    assert abs(out["total"]["cost_usd"] - (400_000 * 2 + 120_000 * 8) / 1e6) < 0.01
    r = run_cli("estimate", "--images", "10", "--model", "gpt-4o", "--from", str(tmp_path / "c"))
    assert r.returncode == 2 and "no successful, uncached gpt-4o captions" in r.stderr


# 160 photos sent resized (640x480 to 512x384), every 17th a failed download: 150 requests of about
# 14 KB, about 14 to a 0.2 MiB file.
N, MAX_FILE_MB = 160, 0.2


@pytest.fixture
def photos(tmp_path) -> tuple[Path, int]:
    src = write_image_dataset(tmp_path / "in", N, per_shard=40, size=(640, 480), failed=lambda i: i % 17 == 5).path
    return Path(src), sum(1 for i in range(N) if i % 17 != 5)


def packed_by_hand(src: Path, max_file_bytes: int, max_requests: int = 50_000) -> list[list[int]]:
    """The packer's rule, on lines built as it builds them: a file takes lines in order until the
    next would break either limit."""
    backend = BatchFilesBackend.from_options({"model": "gpt-4.1"})
    stage = CaptionStage(backend, load_prompt("lens"))
    ds = Dataset.open(src)
    files: list[list[int]] = [[]]
    for shard_id in ds.completed_ids():
        for sample in ds.iter_samples(shard_id):
            if not sample.ok:
                continue
            body, _ = backend.build_body(stage.request_for(sample))
            line = (
                len(
                    json.dumps(
                        {
                            "custom_id": f"{shard_name(shard_id)}/{sample.key}",
                            "method": "POST",
                            "url": "/v1/chat/completions",
                            "body": body,
                        }
                    ).encode()
                )
                + 1
            )
            if len(files[-1]) >= max_requests or sum(files[-1]) + line > max_file_bytes:
                files.append([])
            files[-1].append(line)
    return files


def test_sample_from_measures_the_lines_the_packer_builds(photos):
    src, images = photos
    out = estimate(
        "--images", str(images), "--model", "gpt-4.1", "--batch", "--sample-from", str(src), "--max-file-mib", str(MAX_FILE_MB)
    )
    wall = out["wall_time"]
    files = packed_by_hand(src, int(MAX_FILE_MB * MIB))
    lines = [n for f in files for n in f]
    assert len(lines) == images
    assert wall["line_bytes"] == round(sum(lines) / len(lines))
    assert wall["line_bytes_basis"] == f"measured on {images} images in {src}" and wall["bound_by"] == "bytes"
    assert abs(wall["files"] - len(files)) <= 0.1 * len(files), (wall, len(files))
    assert out["per_image"]["input_tokens"] == 85 + lens_prompt_tokens()  # detail low: 85 measured image tokens
    assert "measured: 85.0 image tokens on 150 images" in out["basis"]


def test_sample_from_within_ten_percent_of_the_real_packer(photos, tmp_path):
    src, images = photos
    out = estimate(
        "--images", str(images), "--model", "gpt-4.1", "--batch", "--sample-from", str(src), "--max-file-mib", str(MAX_FILE_MB)
    )
    r = run_cli(
        "caption",
        str(src),
        str(tmp_path / "out"),
        "--backend",
        "batch-files",
        "--model",
        "gpt-4.1",
        "--max-file-mib",
        str(MAX_FILE_MB),
        "--no-cache",
        "--json",
        env={"LENSCAP_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert r.returncode == 0, r.stderr
    packed = sorted((tmp_path / "out" / ".lenscap" / "batch" / "files" / "input").glob("*.jsonl"))
    assert sum(len(p.read_bytes().splitlines()) for p in packed) == images
    assert abs(out["wall_time"]["files"] - len(packed)) <= 0.1 * len(packed), (out["wall_time"], len(packed))


def test_sample_from_an_empty_dataset(tmp_path):
    write_image_dataset(tmp_path / "in", 3, failed=lambda i: True)
    r = run_cli("estimate", "--images", "5", "--batch", "--sample-from", str(tmp_path / "in"))
    assert r.returncode == 2 and "no readable downloaded images" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_flags():
    for args, message in (
        (["--images", "0"], "--images must be at least 1"),
        (["--images", "5", "--model", "mystery"], "no price known"),
        (["--images", "5", "--model", "mystery", "--batch", "--json"], "no price known"),
        (["--images", "5", "--source-size", "big"], "--source-size takes WIDTHxHEIGHT"),
        (["--images", "5", "--detail", "ultra"], "--detail must be low, high or auto"),
        (["--images", "10x"], "--images takes a whole number such as"),
        (["--images", "1.5"], "--images takes a whole number"),
        (["--images", "1e-3"], "--images takes a whole number"),
        (["--images", "5", "--batch", "--max-file-mib", "300"], "--max-file-mib must be more than 0 and at most 200"),
        (["--images", "5", "--batch", "--max-requests-per-file", "0"], "--max-requests-per-file must be between"),
        (["--images", "5", "--batch", "--max-enqueued-tokens", "0"], "--max-enqueued-tokens must be positive"),
        (["--images", "5", "--batch", "--max-enqueued-tokens", "lots"], "--max-enqueued-tokens takes a whole number"),
        (["--images", "5", "--batch", "--batch-hours", "24-1"], "--batch-hours must be LOW-HIGH"),
        (["--images", "5", "--batch", "--batch-hours", "soon"], "--batch-hours takes LOW-HIGH or HOURS"),
        (["--images", "5", "--batch", "--max-file-mib", "0.01"], "does not fit in --max-file-mib 0.01"),
    ):
        r = run_cli("estimate", *args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        if "--json" in args:  # with --json, stdout holds exactly one object, the error's
            assert json.loads(r.stdout)["exit_code"] == 2 and message in json.loads(r.stdout)["error"], (args, r.stdout)
        else:
            assert r.stdout == "", (args, r.stdout)


def test_compare_names_every_provider_with_cost_and_time_for_each():
    out = estimate("--images", "800M", "--compare")
    rows = out["compare"]
    assert {r["provider"] for r in rows} == {"openai", "anthropic", "gemini"}
    assert all(r["cost_usd"] > 0 and r["wall_time"]["human"] for r in rows)
    by = {(r["model"], r["mode"]): r for r in rows}
    assert set(out["prices_taken"]) == {"openai", "anthropic", "gemini"} and out["tier"] == "tier 1"
    # by hand, for 1024x768 images sent at 512x384 (caption's --max-side 512): Claude bills w*h/750 tokens,
    # Gemini 258 for an image within 384x384 and 258 a 768-px tile above, GPT-4.1 85 at detail low
    assert by["claude-sonnet-4-5", "online"]["image_tokens"] == math.ceil(512 * 384 / 750) == 263
    assert by["gemini-2.5-flash", "online"]["image_tokens"] == 258
    assert by["gpt-4.1", "online"]["image_tokens"] == 85
    claude = by["claude-sonnet-4-5", "online"]
    tokens_in, tokens_out = claude["input_tokens_per_image"], claude["output_tokens_per_image"]
    assert tokens_in == 263 + lens_prompt_tokens() and tokens_out == 146
    usd = (tokens_in * 800e6 * 3.00 + tokens_out * 800e6 * 15.00) / 1e6
    assert abs(claude["cost_usd"] - usd) < 0.01
    assert abs(by["claude-sonnet-4-5", "batch"]["cost_usd"] - usd / 2) < 0.01
    # Anthropic's tier 1: 50 requests, 30,000 input and 8,000 output tokens a minute: the requests bind
    assert claude["wall_time"]["requests_per_minute"] == min(50, 30_000 / tokens_in, 8_000 / tokens_out) == 50
    # a Message Batch holds at most 100,000 requests or 256 MB: 87,488 B lines bind by bytes
    assert by["claude-sonnet-4-5", "batch"]["wall_time"]["requests_per_batch"] == 256_000_000 // 87_488


def test_compare_takes_chosen_models_and_prints_one_table(tmp_path):
    out = estimate("--images", "10k", "--compare", "--compare-model", "claude-haiku-4-5", "--compare-model", "gpt-4.1-nano")
    assert [(r["model"], r["mode"]) for r in out["compare"]] == [
        ("claude-haiku-4-5", "online"),
        ("claude-haiku-4-5", "batch"),
        ("gpt-4.1-nano", "online"),
        ("gpt-4.1-nano", "batch"),
    ]
    r = run_cli("estimate", "--images", "10k", "--compare")
    assert r.returncode == 0, r.stderr
    table = r.stdout.splitlines()
    assert table[1].split()[:3] == ["provider", "model", "mode"]
    assert sum(1 for line in table if line.startswith(("openai", "anthropic", "gemini"))) == 16
    assert "2025-11" in table[-1] and "docs/providers.md" in table[-1]
    for bad, says in (
        (("--compare", "--compare-model", "claude-9"), "no price known for claude-9"),
        (("--compare-model", "gpt-4.1"), "give --compare"),
    ):
        r = run_cli("estimate", "--images", "10", *bad)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr


def test_a_claude_estimate_counts_its_output_token_limit_apart():
    wall = estimate("--images", "1000", "--model", "claude-sonnet-4-5", "--output-words", "600")["wall_time"]
    # 600 words are 800 output tokens: 8,000 output tokens a minute allow 10 requests, fewer than the 50 RPM
    assert wall["tier"]["output_tpm"] == 8_000 and wall["limited_by"] == "output tpm"
    assert wall["requests_per_minute"] == 10.0
