"""lenscap estimate: figures against a hand computation, measured tokens with --from, bad flags."""

from __future__ import annotations

import json
import math

from conftest import run_cli
from lenscap.captioning.prompts import PRESETS
from lenscap.dataset import Dataset
from lenscap.record import Sample


def estimate(*args: str) -> dict:
    r = run_cli("estimate", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_lens_scale_job_by_hand():
    out = estimate("--images", "800000000", "--model", "gpt-4.1", "--batch", "--detail", "low", "--output-words", "109")
    # by hand: GPT-4.1 at low detail bills 85 tokens an image; the prompt is about a token per 4 characters
    # (+4 per message); 109 words are ceil(109 * 4 / 3) = 146 tokens; $2 / $8 per 1M tokens, halved for batch
    lens = PRESETS["lens"]
    prompt_tokens = math.ceil(len(lens.template) / 4) + 4 + math.ceil(len(lens.system) / 4) + 4
    per_in, per_out = 85 + prompt_tokens, 146
    assert out["per_image"] == {"input_tokens": per_in, "output_tokens": per_out}
    assert out["total"]["input_tokens"] == per_in * 800_000_000
    expected = (per_in * 800e6 * 2.00 + per_out * 800e6 * 8.00) / 1e6 / 2
    assert abs(out["total"]["cost_usd"] - expected) < 0.01
    assert out["wall_time"]["batches"] == 16_000


def test_online_wall_time_is_set_by_the_tighter_limit():
    out = estimate("--images", "1000000", "--model", "gpt-4.1-mini", "--rpm", "10000", "--tpm", "2000000")
    per = out["per_image"]["input_tokens"] + out["per_image"]["output_tokens"]
    lens = PRESETS["lens"]
    prompt_tokens = math.ceil(len(lens.template) / 4) + 4 + math.ceil(len(lens.system) / 4) + 4
    assert out["per_image"]["input_tokens"] == 312 + prompt_tokens  # 512x384: 16x12 patches x 1.62
    per_minute = min(10_000, 2_000_000 / per)
    assert out["wall_time"]["limited_by"] == "tpm"
    assert abs(out["wall_time"]["hours"] - 1_000_000 / per_minute / 60) < 0.01


def test_from_a_captioned_dataset(tmp_path):
    ds = Dataset.create(tmp_path / "c")
    w = ds.writer(0)
    for i, (status, tin, tout, cached) in enumerate([("ok", 300, 100, False), ("ok", 500, 140, False), ("ok", 9999, 9999, True),
                                                     ("error", 9999, 9999, False)]):
        w.write(Sample(f"{i:09d}", {"status": "success", "caption_status": status, "caption_input_tokens": tin,
                                     "caption_output_tokens": tout, "caption_cached": cached, "caption_model": "gpt-4.1"}))
    w.commit()
    out = estimate("--images", "1000", "--model", "gpt-4.1", "--from", str(tmp_path / "c"))
    assert out["per_image"] == {"input_tokens": 400.0, "output_tokens": 120.0}  # uncached successes only
    assert abs(out["total"]["cost_usd"] - (400_000 * 2 + 120_000 * 8) / 1e6) < 0.01
    r = run_cli("estimate", "--images", "10", "--model", "gpt-4o", "--from", str(tmp_path / "c"))
    assert r.returncode == 2 and "no successful, uncached gpt-4o captions" in r.stderr


def test_bad_flags():
    for args, message in ((["--images", "0"], "--images must be at least 1"), (["--images", "5", "--model", "mystery"], "no price known"),
                          (["--images", "5", "--image-size", "big"], "--image-size takes WIDTHxHEIGHT"),
                          (["--images", "5", "--detail", "ultra"], "--detail must be low, high or auto")):
        r = run_cli("estimate", *args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
