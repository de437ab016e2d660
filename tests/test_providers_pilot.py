"""How a user picks a provider (docs/providers.md): price the job on every provider with estimate
--compare, caption one pilot of the same images through OpenAI, Anthropic and Gemini (each against a
loopback server speaking its API, through its official SDK), and audit the captionings side by side."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli_here
from test_caption import rows

from lenscap.demo.datasets import write_image_dataset
from lenscap.testing.fake_anthropic import FakeAnthropic
from lenscap.testing.fake_gemini import FakeGemini
from lenscap.testing.fake_openai import FakeOpenAI

KEY = "pilot-key-LEAKCHECK-42"
PILOT = 8
PROVIDERS = {
    "openai": (FakeOpenAI, "gpt-4.1-mini", "OPENAI_API_KEY"),
    "anthropic": (FakeAnthropic, "claude-haiku-4-5", "ANTHROPIC_API_KEY"),
    "gemini": (FakeGemini, "gemini-2.5-flash", "GEMINI_API_KEY"),
}


@pytest.fixture(scope="module")
def pilot(tmp_path_factory):
    """The same pilot images captioned by each provider, one output directory each."""
    base = tmp_path_factory.mktemp("pilot")
    src = write_image_dataset(base / "in", PILOT, per_shard=PILOT).path
    outs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LENSCAP_CACHE_DIR", str(base / "cache"))
        for provider, (fake, model, variable) in PROVIDERS.items():
            mp.setenv(variable, KEY)
            with fake(api_key=KEY) as server:
                args = ("caption", str(src), str(base / provider), "--backend", provider, "--model", model)
                code, out, err = run_cli_here(*args, "--base-url", server.base_url, "--json", "--quiet")
            assert code == 0, err
            assert json.loads(out)["caption_status"] == {"ok": PILOT}, provider
            outs[provider] = base / provider
    return outs


def test_the_pilot_is_captioned_and_priced_by_each_provider_as_it_bills(pilot):
    for provider, path in pilot.items():
        got = rows(path)
        assert len(got) == PILOT
        for row in got.values():
            assert row["caption_backend"] == provider and row["caption_model"] == PROVIDERS[provider][1]
            assert row["caption_input_tokens"] > 0 and row["caption_cost_usd"] > 0
        assert all(KEY.encode() not in f.read_bytes() for f in path.rglob("*") if f.is_file())
    # the same images cost each provider's own image tokens: Claude's w*h/750, Gemini's 258 a tile
    mean_input = {p: sum(r["caption_input_tokens"] for r in rows(path).values()) / PILOT for p, path in pilot.items()}
    assert len(set(mean_input.values())) == 3, mean_input


@pytest.mark.parametrize("a, b", [("openai", "anthropic"), ("openai", "gemini")])
def test_two_providers_captionings_are_audited_side_by_side(pilot, a, b, tmp_path):
    code, out, err = run_cli_here("audit", str(pilot[a]), str(pilot[b]), "--json", "--quiet")
    assert code == 0, err
    report = json.loads(out)
    assert report["a"]["captions"] == report["b"]["captions"] == PILOT and report["common"] == PILOT
    assert PROVIDERS[a][1] in json.dumps(report["a"]["by_model"]) and PROVIDERS[b][1] in json.dumps(report["b"]["by_model"])
    assert "delta" in report and report["failed_rules"] == []
