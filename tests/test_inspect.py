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

from lenscap.dataset import Dataset
from lenscap.errors import DatasetError
from lenscap.inspect import inspect_dataset
from lenscap.layout import shard_name
from lenscap.record import Sample

REPO = Path(__file__).resolve().parents[1]


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), ((i * 41) % 256, 90, 30)).save(buf, "JPEG")
    return buf.getvalue()


def words(n: int) -> str:
    return " ".join(f"w{k}" for k in range(n))


def success(i: int, caption: str | None) -> Sample:
    return Sample(key=shard_name(i), row={"url": f"http://img/{i}.jpg", "caption": caption, "status": "success",
                                          "error_message": None}, image=jpeg(i))


def failure(i: int, caption: str | None, error: str) -> Sample:
    return Sample(key=shard_name(i), row={"url": f"http://img/{i}.jpg", "caption": caption,
                                          "status": "failed_to_download", "error_message": error})


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

    shard_bytes = sum(p.stat().st_size for s in (0, 1)
                      for p in (ds.tar_path(s), ds.parquet_path(s), ds.stats_path(s)))
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
    return subprocess.run([sys.executable, "-m", "lenscap.cli", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60, env=env, cwd=REPO)


def test_cli_inspect_json(tmp_path):
    ds = build(tmp_path / "ds")
    proc = run_cli("inspect", str(ds.path), "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n") and proc.stdout.count("\n") == 1  # one object, one line
    info = json.loads(proc.stdout)
    assert isinstance(info, dict)
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
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lenscap: error:")
    assert str(target) in lines[0]
    assert "Traceback" not in proc.stderr
