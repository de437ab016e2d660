"""inspect_dataset numbers, and the ``lenscap inspect`` command's JSON and error output."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lenscap.core.dataset import Dataset
from lenscap.core.errors import DatasetError
from lenscap.core.layout import shard_name
from lenscap.core.record import Sample
from lenscap.inspect.summary import inspect_dataset

REPO = Path(__file__).resolve().parents[1]


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), ((i * 41) % 256, 90, 30)).save(buf, "JPEG")
    return buf.getvalue()


def words(n: int) -> str:
    return " ".join(f"w{k}" for k in range(n))


def success(i: int, caption: str | None) -> Sample:
    return Sample(
        key=shard_name(i),
        row={"url": f"http://img/{i}.jpg", "caption": caption, "status": "success", "error_message": None},
        image=jpeg(i),
    )


def failure(i: int, caption: str | None, error: str) -> Sample:
    return Sample(
        key=shard_name(i),
        row={"url": f"http://img/{i}.jpg", "caption": caption, "status": "failed_to_download", "error_message": error},
    )


def write(ds: Dataset, shard: int, samples: list[Sample]) -> None:
    w = ds.writer(shard)
    for s in samples:
        w.write(s)
    w.commit()


def build(path: Path) -> Dataset:
    """Shard 0: success captions of 1..10 words + 2 failures (404, long captions);
    shard 1: success captions of 11..20 words + 1 failure (timeout); shard 2 expected but missing."""
    ds = Dataset.create(path)
    s0 = [success(i, words(i + 1)) for i in range(10)]
    s0.insert(3, failure(100, words(300), "404 Not Found"))
    s0.append(failure(101, words(500), "404 Not Found"))
    write(ds, 0, s0)
    s1 = [success(10 + i, words(11 + i)) for i in range(10)]
    s1.insert(0, failure(102, None, "timeout"))
    write(ds, 1, s1)
    ds.write_manifest("download", {"processes": 1}, "urls.txt", expected_shards=3)
    return ds


def lower_percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def test_inspect_numbers(tmp_path):
    ds = build(tmp_path / "ds")
    info = inspect_dataset(ds.path)

    assert info["path"] == str(ds.path)
    assert info["stage"] == "download"
    assert info["history"] == ["download"]
    assert info["samples"] == 23
    assert info["status"] == {"success": 20, "failed_to_download": 3}
    assert info["errors"] == {"404 Not Found": 2, "timeout": 1}
    lengths = list(range(1, 21))  # success rows only: the 300/500-word failed captions do not count
    assert info["caption_words"] == {
        "count": 20,
        "mean": 10.5,
        "p50": lower_percentile(lengths, 0.50),
        "p95": lower_percentile(lengths, 0.95),
        "histogram": [[n, 1] for n in lengths],
    }
    assert info["caption_words"]["p50"] == 10 and info["caption_words"]["p95"] == 19
    assert info["columns"] == ["url", "caption", "status", "error_message", "key", "image_offset", "image_size"]
    assert info["shards"] == {"complete": 2, "incomplete": 1, "damaged": 0, "expected": 3}
    assert info["incomplete_shards"] == [2]

    shard_bytes = sum(p.stat().st_size for s in (0, 1) for p in (ds.tar_path(s), ds.parquet_path(s), ds.stats_path(s)))
    assert info["bytes"]["shards"] == shard_bytes
    assert info["bytes"]["total"] == shard_bytes + (ds.path / "lenscap.json").stat().st_size


def test_inspect_without_manifest_counts_half_written_shards(tmp_path):
    ds = Dataset.create(tmp_path / "ds")
    write(ds, 0, [success(0, "one two"), success(1, "three")])
    ds.tar_path(4).write_bytes(b"")  # files of shard 4, no _stats.json
    info = inspect_dataset(ds.path)
    assert info["stage"] is None
    assert info["history"] == []
    assert info["shards"] == {"complete": 1, "incomplete": 1, "damaged": 0, "expected": None}
    assert info["incomplete_shards"] == [4]
    assert info["samples"] == 2
    assert info["status"] == {"success": 2}
    assert info["errors"] == {}
    assert info["caption_words"] == {"count": 2, "mean": 1.5, "p50": 1, "p95": 1, "histogram": [[1, 1], [2, 1]]}


def test_inspect_caption_words_ignore_surrounding_whitespace(tmp_path):
    ds = Dataset.create(tmp_path / "ds")
    write(ds, 0, [success(0, "  padded   caption  "), success(1, "\tone two three\n")])
    cw = inspect_dataset(ds.path)["caption_words"]
    assert cw == {"count": 2, "mean": 2.5, "p50": 2, "p95": 2, "histogram": [[2, 1], [3, 1]]}


def test_inspect_missing_and_empty_captions_have_no_words(tmp_path):
    """A .txt URL list gives success rows without captions: they must not count as one-word captions."""
    ds = Dataset.create(tmp_path / "ds")
    write(ds, 0, [success(0, None), success(1, ""), success(2, "   ")])
    cw = inspect_dataset(ds.path)["caption_words"]
    assert cw["p95"] in (0, None)
    assert cw["mean"] in (0.0, None)


def test_inspect_dataset_without_successes(tmp_path):
    ds = Dataset.create(tmp_path / "ds")
    write(ds, 0, [failure(0, "a b c", "404 Not Found")])
    info = inspect_dataset(ds.path)
    assert info["samples"] == 1
    assert info["caption_words"] == {"count": 0, "mean": None, "p50": None, "p95": None, "histogram": []}


def test_inspect_missing_directory_raises(tmp_path):
    with pytest.raises(DatasetError):
        inspect_dataset(tmp_path / "nope")


# -- the command ---------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("LENSCAP_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "lenscap.cli", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        env=env,
        cwd=REPO,
    )


def test_cli_inspect_json(tmp_path):
    ds = build(tmp_path / "ds")
    proc = run_cli("inspect", str(ds.path), "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n") and proc.stdout.count("\n") == 1  # one object, one line
    info = json.loads(proc.stdout)
    assert isinstance(info, dict)
    assert (info.pop("ok"), info.pop("exit_code"), info.pop("command")) == (True, 0, "inspect")  # every summary's
    assert info == inspect_dataset(ds.path)
    assert info["samples"] == 23
    assert info["caption_words"]["mean"] == 10.5


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_cli_inspect_bad_directory_is_one_line_exit_2(tmp_path, kind):
    target = tmp_path / "target"
    if kind == "file":
        target.write_text("x")
    elif kind == "empty":
        target.mkdir()
    proc = run_cli("inspect", str(target), "--json")
    assert proc.returncode == 2
    said = json.loads(proc.stdout)  # --json: the error as the one object on stdout too
    assert said["ok"] is False and said["exit_code"] == 2 and str(target) in said["error"]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lenscap: error:")
    assert str(target) in lines[0]
    assert "Traceback" not in proc.stderr


# -- errors apart from skips, outcomes in pipeline order, the cost figure ---------------------------------


def staged(path: Path, history: list[str]) -> Dataset:
    """Rows as download -> filter -> caption -> dedup (or ``history``'s order) leave them."""
    ds = Dataset.create(path)
    rows = []
    for i in range(6):
        ok = i != 0
        row = {
            "url": f"http://img/{i}.jpg",
            "status": "success" if ok else "failed_to_download",
            "error_message": None if ok else "HTTP Error 404",
            "caption": words(i + 1),
            "filter_status": "dropped" if i == 1 else "kept",
            "filter_reason": "min-side" if i == 1 else None,
            "caption_status": "skipped" if i in (0, 1) else "error" if i == 2 else "ok",
            "caption_error": (
                "no image (download status: failed_to_download)"
                if i == 0
                else "no image (filter: min-side)"
                if i == 1
                else "HTTP 500 after 3 tries"
                if i == 2
                else None
            ),
            "dedup_status": "duplicate" if i == 5 else "unique",
            "caption_cost_usd": 0.5 if i >= 2 else None,
            "caption_cached": i == 4 if i >= 2 else None,
        }
        rows.append(Sample(key=shard_name(i), row=row, image=jpeg(i) if ok else None))
    write(ds, 0, rows)
    ds.write_manifest(history[-1], {}, None, expected_shards=1)
    manifest = json.loads((ds.path / "lenscap.json").read_text())
    manifest["history"] = [{"stage": s} for s in history]
    (ds.path / "lenscap.json").write_text(json.dumps(manifest))
    return ds


def test_skips_are_not_errors(tmp_path):
    info = inspect_dataset(staged(tmp_path / "ds", ["download", "filter", "caption", "dedup"]).path)
    assert info["errors"] == {"HTTP Error 404": 1, "caption: HTTP 500 after 3 tries": 1}
    assert info["skips"] == {
        "caption: no image (download status: failed_to_download)": 1,
        "caption: no image (filter: min-side)": 1,
    }


@pytest.mark.parametrize(
    "history, order",
    [
        (["download", "filter", "caption", "dedup"], ["status", "filter_status", "caption_status", "dedup_status"]),
        (["download", "filter", "dedup", "caption"], ["status", "filter_status", "dedup_status", "caption_status"]),
        (["caption"], ["status", "filter_status", "dedup_status", "caption_status"]),  # history silent: the usual order
    ],
)
def test_outcomes_in_pipeline_order(tmp_path, history, order):
    ds = staged(tmp_path / "ds", history)
    info = inspect_dataset(ds.path)
    assert list(info["outcomes"]) == order
    assert list(info["stage_status"]) == [c for c in order if c != "status"]
    proc = run_cli("inspect", str(ds.path), "--json")
    assert proc.returncode == 0, proc.stderr
    assert list(json.loads(proc.stdout)["outcomes"]) == order  # the JSON keeps the order
    text = run_cli("inspect", str(ds.path)).stdout
    positions = [text.index(c) for c in order if c != "status"]
    assert positions == sorted(positions), text


def test_outcomes_put_filter_reasons_after_filter_status(tmp_path):
    ds = staged(tmp_path / "ds", ["download", "filter", "caption", "dedup"])
    stats = json.loads(ds.stats_path(0).read_text())
    stats["filter_reasons"] = {"kept": 5, "min-side": 1}
    ds.stats_path(0).write_text(json.dumps(stats))
    assert list(inspect_dataset(ds.path)["outcomes"]) == [
        "status",
        "filter_status",
        "filter_reasons",
        "caption_status",
        "dedup_status",
    ]


def test_caption_cost_counts_cached_answers_apart(tmp_path):
    """An answer from the response cache cost nothing in the run that wrote it: not in spent_usd
    (caption --json's figure), but in cached_usd (what it cost when first asked)."""
    cost = inspect_dataset(staged(tmp_path / "ds", ["download", "caption"]).path)["caption_cost"]
    assert cost["spent_usd"] == cost["usd"] == 1.5 and cost["cached_usd"] == 0.5 and cost["cached_answers"] == 1
