"""``caption --redo WHERE`` and ``estimate --from DIR --where EXPR`` against the fake OpenAI server:
only the selected samples are asked (and paid for), the others are carried over as they were, and
``caption_run`` says which run wrote each caption."""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_cli_here

from lenscap.core.dataset import Dataset
from lenscap.demo.datasets import write_image_dataset
from lenscap.testing.fake_openai import FakeOpenAI, FakeSettings

KEY = "sk-test-redo-0123456789"
REDONE = ["000000001", "000000004", "000000007", "000000009"]  # two in each shard
NO_IMAGE = "000000011"  # a failed download: selected, but nothing to ask
EXPR = f"key IN ({', '.join(repr(k) for k in REDONE)}) OR caption_status = 'skipped'"


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAI(FakeSettings(api_key=KEY)) as server:
        yield server


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, fake):
    """A dataset of 12 images in two shards, captioned once (and the response cache holding those answers)."""
    tmp = tmp_path_factory.mktemp("redo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", KEY)
        mp.setenv("LENSCAP_CACHE_DIR", str(tmp / "cache"))
        mp.delenv("OPENAI_BASE_URL", raising=False)
        src = write_image_dataset(tmp / "in", 12, per_shard=6, failed=lambda i: i == int(NO_IMAGE)).path
        code, _, err = caption(src, tmp / "captioned", fake)
        assert code == 0, err
        yield tmp / "captioned"


@pytest.fixture
def server(fake, captioned):
    """The module's server, its counters at zero, answering with shorter captions than the first run's,
    so a caption asked again is seen to change."""
    fake.reset_counters()
    fake.configure(caption_words=20)
    yield fake
    fake.configure(caption_words=60)


def caption(src, out, server, *extra: str) -> tuple[int, str, str]:
    return run_cli_here("caption", str(src), str(out), "--base-url", server.base_url, "--quiet", *extra)


def rows(path) -> dict[str, dict]:
    ds = Dataset(path)
    return {r["key"]: r for i in ds.completed_ids() for r in ds.read_table(i).to_pylist()}


def asked_keys(server, before: dict[str, dict]) -> list[str]:
    """The keys whose images the server was asked about: a fake caption names its image's digest."""
    refs = {
        re.search(r"reference ([0-9a-f]{8})", r["caption"]).group(1): k for k, r in before.items() if r["caption_status"] == "ok"
    }
    return sorted(refs[sha[:8]] for sha in server.stats()["image_requests"])


def test_redo_asks_only_the_selected_samples_and_carries_the_others(tmp_path, server, captioned):
    before = rows(captioned)
    assert "caption_run" not in Dataset(captioned).read_schema(0).names  # only a redo output has it
    out = tmp_path / "redone"
    code, stdout, err = caption(captioned, out, server, "--redo", EXPR, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert server.stats()["requests"] == 4 and asked_keys(server, before) == REDONE  # not from the cache either
    after = rows(out)
    assert sorted(after) == sorted(before)
    for key in REDONE:
        row, old = after[key], before[key]
        assert row["caption_status"] == "ok" and row["caption"] != old["caption"] and len(row["caption"].split()) == 20
        assert row["previous_caption"] == old["caption"] and row["alt_text"] == old["alt_text"]
        assert row["caption_run"] == str(out) and row["caption_cached"] is False
    assert after[NO_IMAGE]["caption_status"] == "skipped" and after[NO_IMAGE]["caption_run"] == str(out)
    for key in set(before) - set(REDONE) - {NO_IMAGE}:
        assert {c: after[key][c] for c in before[key]} == before[key], key  # every input column as it was
        assert after[key]["caption_run"] == str(captioned)
    new_cost = sum(after[k]["caption_cost_usd"] for k in REDONE)
    assert summary["spent_usd"] == pytest.approx(new_cost, abs=1e-4)
    ds = Dataset(out)
    assert sum(ds.read_stats(i)["caption_spent_usd"] for i in ds.completed_ids()) == pytest.approx(new_cost)
    assert json.loads((out / "lenscap.json").read_text())["parameters"]["redo"] == EXPR

    # The same command again: done before, nothing asked. Another --redo into it: refused.
    code, _, err = caption(captioned, out, server, "--redo", EXPR)
    assert code == 0 and server.stats()["requests"] == 4, err
    assert rows(out) == after
    code, _, err = caption(captioned, out, server, "--redo", "key = '000000000'")
    assert code == 2 and "other settings" in err and "redo" in err, err

    # A redo of a redo: a carried row keeps the run that wrote it.
    code, _, err = caption(out, tmp_path / "again", server, "--redo", "key = '000000000'")
    assert code == 0, err
    again = rows(tmp_path / "again")
    assert again["000000000"]["caption_run"] == str(tmp_path / "again")
    assert again[REDONE[0]]["caption_run"] == str(out) and again["000000002"]["caption_run"] == str(captioned)
    assert server.stats()["requests"] == 5


def test_an_interrupted_redo_resumes_without_asking_twice(tmp_path, server, captioned):
    out = tmp_path / "redone"
    # A request is sent when its worst case (about $0.0006 here) fits under the cap: one is, then the run stops (exit 4).
    code, _, err = caption(captioned, out, server, "--redo", EXPR, "--max-cost", "0.001")
    assert code == 4, err
    first = server.stats()["requests"]
    assert 0 < first < 4
    code, stdout, err = caption(captioned, out, server, "--redo", EXPR, "--json")
    assert code == 0, err
    assert server.stats()["requests"] == 4 and all(n == 1 for n in server.stats()["image_requests"].values())
    after = rows(out)
    assert json.loads(stdout)["spent_usd"] == pytest.approx(sum(after[k]["caption_cost_usd"] for k in REDONE), abs=1e-4)


@pytest.mark.parametrize(
    ("redo", "message"),
    [
        ("caption_status = ", "--redo must be one SQL expression"),
        ("true); DROP TABLE t; --", "--redo must be one SQL expression"),
        ("nope = 1", "columns: key, url, caption"),
        ("read_csv('x') IS NOT NULL", "read_csv"),
        ("(SELECT count(*) FROM read_csv('/etc/hostname')) > 0", "disabled by configuration"),
        ("  ", "--redo is empty"),
    ],
)
def test_a_bad_redo_is_a_usage_error_before_any_request(tmp_path, server, captioned, redo, message):
    code, _, err = caption(captioned, tmp_path / "out", server, "--redo", redo)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert server.stats()["requests"] == 0


def test_redo_needs_a_captioned_input_and_no_retry_errors(tmp_path, server, captioned):
    src = write_image_dataset(tmp_path / "in", 2).path
    code, _, err = caption(src, tmp_path / "out", server, "--redo", "true")
    assert code == 2 and "has no caption_status column" in err, err
    code, _, err = caption(captioned, tmp_path / "out2", server, "--redo", "true", "--retry-errors")
    assert code == 2 and "--redo and --retry-errors" in err, err
    assert server.stats()["requests"] == 0


def test_estimate_counts_the_rows_where_selects(captioned):
    ds = Dataset(captioned)
    # The expression also selects the skipped sample, which has no image: a redo asks nothing for it.
    expected = sum(
        1
        for i in ds.completed_ids()
        for r in ds.read_table(i).to_pylist()
        if (r["key"] in REDONE or r["caption_status"] == "skipped") and r["status"] == "success"
    )
    code, stdout, err = run_cli_here("estimate", "--from", str(captioned), "--where", EXPR, "--model", "gpt-4.1-mini", "--json")
    assert code == 0, err
    out = json.loads(stdout)
    assert out["selected"] == expected == 4
    assert out["total"]["input_tokens"] == round(out["per_image"]["input_tokens"] * expected)
    code, stdout, _ = run_cli_here("estimate", "--from", str(captioned), "--where", EXPR, "--model", "gpt-4.1-mini")
    assert code == 0 and f"{expected} images of {captioned} selected by --where" in stdout
    for args, message in (
        (["--where", "true", "--images", "5"], "with --from DIR"),
        (["--from", str(captioned), "--where", "true", "--images", "5"], "not both"),
        ([], "--images is needed"),
        (["--from", str(captioned), "--where", "nope"], "columns: key"),
        (["--from", str(captioned), "--where", "(SELECT 1 FROM read_parquet('/x')) = 1"], "disabled by configuration"),
    ):
        code, _, err = run_cli_here("estimate", "--model", "gpt-4.1-mini", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
