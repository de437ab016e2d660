"""lenscap shard: WebDataset and Parquet exports that datasets, webdataset and DuckDB read; shard sizes;
deterministic shuffles; what is left out and why; the dataset card; bad input; SIGKILL and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import run_cli

from lenscap.core.dataset import Dataset
from lenscap.core.record import Sample
from lenscap.demo.pictures import jpeg_bytes, photo

N = 240
TARGET = 400_000


def outcome(i: int) -> str:
    """What happened to sample ``i`` upstream."""
    if i % 17 == 3:
        return "failed"
    if i % 19 == 4:
        return "filtered"
    if i % 23 == 5:
        return "duplicate"
    if i % 29 == 6:
        return "caption error"
    return "ok"


def make_pipeline_output(path: Path) -> tuple[Path, dict[str, bytes]]:
    """A dataset as download -> filter -> dedup -> caption leave it; returns it and the exported images."""
    ds = Dataset.create(path)
    images = {}
    per_shard = 60
    for shard_id in range(N // per_shard):
        writer = ds.writer(shard_id)
        for i in range(shard_id * per_shard, (shard_id + 1) * per_shard):
            key, what = f"{i:09d}", outcome(i)
            image = None if what in ("failed", "filtered", "duplicate") else jpeg_bytes(photo(i, (320 + i % 7 * 40, 240)))
            row = {
                "url": f"http://example.invalid/{i}.jpg",
                "status": "failed_to_download" if what == "failed" else "success",
                "error_message": None,
                "width": 320,
                "height": 240,
                "alt_text": f"alt {i}",
                "caption": f"a dense caption of image {i} " + "word " * (i % 40),
                "filter_status": "dropped" if what == "filtered" else "kept",
                "filter_reason": "min-side" if what == "filtered" else None,
                "dedup_status": "duplicate" if what == "duplicate" else "unique",
                "caption_status": "error" if what == "caption error" else "ok",
                "caption_model": "gpt-4.1-mini",
            }
            writer.write(Sample(key, row, image))
            if what == "ok":
                images[key] = image
        writer.commit({"stage": "caption"})
    ds.write_manifest("caption", {"backend": "openai"}, None, expected_shards=N // per_shard)
    return path, images


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_pipeline_output(tmp_path_factory.mktemp("shard") / "in")


def export(src: Path, out: Path, *args: str) -> dict:
    r = run_cli("shard", str(src), str(out), "--json", "--quiet", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def tar_samples(path: Path) -> list[tuple[str, bytes, str, dict]]:
    out = []
    for tar_path in sorted(path.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        keys = list(dict.fromkeys(name.partition(".")[0] for name in members))
        out += [(k, members[f"{k}.jpg"], members[f"{k}.txt"].decode(), json.loads(members[f"{k}.json"])) for k in keys]
    return out


def hf_load(*args, **kwargs):
    import datasets

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return datasets.load_dataset(*args, split="train", cache_dir=kwargs.pop("cache_dir"), **kwargs)


def test_webdataset_export(tmp_path, source):
    src, images = source
    summary = export(src, tmp_path / "wds", "--target-size", f"{TARGET}B", "--min-shards", "1", "--processes", "2")
    assert summary["samples"] == len(images)
    assert summary["left_out"] == {
        "caption: error": sum(outcome(i) == "caption error" for i in range(N)),
        "download: failed_to_download": sum(outcome(i) == "failed" for i in range(N)),
        "duplicate": sum(outcome(i) == "duplicate" for i in range(N)),
        "filter: min-side": sum(outcome(i) == "filtered" for i in range(N)),
    }
    index = json.loads((tmp_path / "wds" / "shards.json").read_text())
    sizes = [s["bytes"] for s in index["shards"]]
    assert len(sizes) >= 4 and all(abs(s - TARGET) <= TARGET * 0.1 for s in sizes[:-1]), sizes
    assert sizes == [(tmp_path / "wds" / s["file"]).stat().st_size for s in index["shards"]]
    got = tar_samples(tmp_path / "wds")
    assert [k for k, *_ in got] == sorted(images)  # input order without --shuffle
    assert all(image == images[k] for k, image, _, _ in got)  # the very bytes, not re-encoded
    key, _, caption, meta = got[0]
    assert caption.startswith("a dense caption") and meta["alt_text"] == f"alt {int(key)}" and "status" not in meta
    assert [s["samples"] for s in index["shards"]] == [len(tar_samples_of(tmp_path / "wds" / s["file"])) for s in index["shards"]]
    sizes_json = json.loads((tmp_path / "wds" / "sizes.json").read_text())  # open_clip's: samples per tar, by name
    assert sizes_json == {s["file"]: len(tar_samples_of(tmp_path / "wds" / s["file"])) for s in index["shards"]}

    import webdataset as wds

    urls = [str(tmp_path / "wds" / s["file"]) for s in index["shards"]]
    pipeline = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt")
    assert [(k, img.size) for k, img, _ in pipeline] == [(k, _size(images[k])) for k, *_ in got]
    loaded = hf_load(str(tmp_path / "wds"), cache_dir=str(tmp_path / "hf"))  # through the card's configs
    assert loaded.num_rows == len(images) and loaded[0]["jpg"].size == _size(images[got[0][0]])
    assert hf_load("webdataset", data_files=urls, cache_dir=str(tmp_path / "hf2")).num_rows == len(images)


def tar_samples_of(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        return {m.name.partition(".")[0] for m in tar}


def _size(data: bytes) -> tuple[int, int]:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).size


def test_parquet_export(tmp_path, source):
    src, images = source
    summary = export(src, tmp_path / "pq", "--format", "parquet", "--target-size", f"{TARGET}B", "--min-shards", "1")
    files = sorted((tmp_path / "pq" / "data").glob("train-*.parquet"))
    assert len(files) == summary["shards"] >= 4
    assert all(f.name.endswith(f"-of-{len(files):05d}.parquet") for f in files)
    assert all(abs(f.stat().st_size - TARGET) <= TARGET * 0.1 for f in files[:-1]), [f.stat().st_size for f in files]
    meta = pq.ParquetFile(files[0]).metadata
    assert all(meta.row_group(i).total_byte_size <= 100_000_000 for i in range(meta.num_row_groups))
    loaded = hf_load(str(tmp_path / "pq"), cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == len(images)
    first = loaded[0]
    assert first["image"].size == _size(images[first["key"]]) and first["caption"].startswith("a dense caption")
    assert hf_load("parquet", data_files=[str(f) for f in files], cache_dir=str(tmp_path / "hf2")).num_rows == len(images)
    rows = duckdb.sql(
        f"SELECT key, image.bytes, image.path, caption_model FROM '{tmp_path / 'pq' / 'data'}/*.parquet' ORDER BY key"
    ).fetchall()
    assert [(k, b, p) for k, b, p, _ in rows] == [(k, images[k], f"{k}.jpg") for k in sorted(images)]
    assert {m for *_, m in rows} == {"gpt-4.1-mini"}


def test_samples_per_shard_and_shuffle(tmp_path, source):
    src, images = source
    export(src, tmp_path / "a", "--samples-per-shard", "50", "--shuffle", "--seed", "7")
    export(src, tmp_path / "b", "--samples-per-shard", "50", "--shuffle", "--seed", "7", "--processes", "1")
    export(src, tmp_path / "c", "--samples-per-shard", "50", "--shuffle", "--seed", "8")
    a, b, c = ([k for k, *_ in tar_samples(tmp_path / d)] for d in "abc")
    assert a == b  # same seed, same order
    assert a != c and sorted(a) == sorted(c) == sorted(images)
    assert a != sorted(a)  # shuffled across the input shards
    counts = [s["samples"] for s in json.loads((tmp_path / "a" / "shards.json").read_text())["shards"]]
    assert counts[:-1] == [50] * (len(counts) - 1) and sum(counts) == len(images)
    assert all(
        (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        for name in os.listdir(tmp_path / "a")
        if name.endswith(".tar")
    )


def test_caption_status_any_keeps_failed_captions(tmp_path, source):
    src, images = source
    summary = export(src, tmp_path / "any", "--caption-status", "any")
    assert summary["samples"] == len(images) + sum(outcome(i) == "caption error" for i in range(N))
    assert "caption: error" not in summary["left_out"]


def test_dataset_card(tmp_path, source):
    src, images = source
    export(src, tmp_path / "pq", "--format", "parquet")
    text = (tmp_path / "pq" / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["license"] == "other" and front["size_categories"] == ["n<1K"]
    assert front["configs"][0]["data_files"][0]["path"] == "data/train-*.parquet"
    assert front["dataset_info"]["splits"][0]["num_examples"] == len(images)
    assert {"name": "image", "dtype": "image"} in front["dataset_info"]["features"]
    assert "| gpt-4.1-mini |" in text and "| duplicate |" in text and "1. `caption`" in text and "2. `shard`" in text
    assert "## Licence" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "zip"], "--format must be webdataset or parquet"),
        (["--target-size", "lots"], "expected a size such as 500MB"),
        (["--samples-per-shard", "0"], "--samples-per-shard must be at least 1"),
        (["--caption-status", "some"], "--caption-status must be ok or any"),
    ],
)
def test_bad_flags(tmp_path, source, args, message):
    r = run_cli("shard", str(source[0]), str(tmp_path / "out"), *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_input_and_changed_settings(tmp_path, source):
    r = run_cli("shard", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    export(source[0], tmp_path / "out", "--samples-per-shard", "100")
    r = run_cli("shard", str(source[0]), str(tmp_path / "out"), "--samples-per-shard", "50")
    assert r.returncode == 2 and "other settings (options.samples_per_shard: 100 -> 50)" in r.stderr


def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path, source):
    src, _ = source
    args = ["shard", str(src), str(tmp_path / "out"), "--samples-per-shard", "8", "--processes", "1", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "lenscap.cli", *args], start_new_session=True)
    done = tmp_path / "out" / ".lenscap" / "done"
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and len(list(done.glob("*.json")) if done.exists() else []) < 3:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert 0 < len(list(done.glob("*.json"))) < 25
    assert run_cli(*args).returncode == 0
    export(src, tmp_path / "clean", *args[3:])
    names = sorted(n for n in os.listdir(tmp_path / "clean") if n.endswith(".tar"))
    assert names == sorted(n for n in os.listdir(tmp_path / "out") if n.endswith((".tar", ".tmp")))
    assert all((tmp_path / "out" / n).read_bytes() == (tmp_path / "clean" / n).read_bytes() for n in names)
    assert json.loads((tmp_path / "out" / "shards.json").read_text()) == json.loads(
        (tmp_path / "clean" / "shards.json").read_text()
    )


def test_tar_headers_match_tarfile_and_scanning_reads_pax(tmp_path):
    import io

    from lenscap.core.tario import TarOut, _header, scan_members

    for name, size in (("000000001.jpg", 12345), ("a" * 100, 0), ("k.json", 8**11 - 1)):
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, 0
        assert _header(name, size) == info.tobuf(tarfile.USTAR_FORMAT)
    out = TarOut(tmp_path / "ours.tar")
    out.add("000000001.txt", b"caption")
    out.close()
    with tarfile.open(tmp_path / "ours.tar") as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar] == [("000000001.txt", b"caption")]
    # tarfile's PAX format, long and non-ASCII names included
    with tarfile.open(tmp_path / "pax.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("000000001.jpg", b"x" * 700), ("é" * 120 + ".jpg", b"y" * 10), ("000000002.txt", b"t")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    found = scan_members(tmp_path / "pax.tar", "jpg")
    with tarfile.open(tmp_path / "pax.tar") as tar:
        expected = {m.name.partition(".")[0]: (m.offset_data, m.size) for m in tar if m.name.endswith(".jpg")}
    assert found == expected and len(found) == 2


@pytest.mark.parametrize("shuffle", [[], ["--shuffle"]])
def test_samples_larger_than_the_target_get_a_shard_each(tmp_path, source, shuffle):
    src, images = source
    summary = export(src, tmp_path / "tiny", "--target-size", "1KB", *shuffle)
    index = json.loads((tmp_path / "tiny" / "shards.json").read_text())
    assert summary["shards"] == len(images) == len(index["shards"])  # numbered densely: no empty shard
    assert [s["file"] for s in index["shards"]] == [f"{i:05d}.tar" for i in range(len(images))]
    assert all(s["samples"] == 1 for s in index["shards"])


@pytest.mark.parametrize("shuffle", [[], ["--shuffle"]])
def test_a_small_export_has_at_least_min_shards(tmp_path, source, shuffle):
    """One 500MB target would hold it all: cut into --min-shards (default 8) even shards instead, so
    every worker of an 8-worker loader has a shard; never more shards than samples."""
    from lenscap.shard.command import run_shard
    from lenscap.shard.options import ShardOptions

    src, images = source
    summary = export(src, tmp_path / "eight", *shuffle)  # the CLI's default
    counts = [s["samples"] for s in json.loads((tmp_path / "eight" / "shards.json").read_text())["shards"]]
    assert summary["shards"] == len(counts) == 8 and max(counts) - min(counts) <= 1 and sum(counts) == len(images)
    assert sorted(k for k, *_ in tar_samples(tmp_path / "eight")) == sorted(images)
    shuffled = bool(shuffle)
    assert (
        run_shard(src, tmp_path / "one", ShardOptions(min_shards=1, shuffle=shuffled, processes=1), quiet=True).shards_total == 1
    )
    # --samples-per-shard is an exact count: kept as given
    exact = run_shard(src, tmp_path / "exact", ShardOptions(samples_per_shard=100, shuffle=shuffled, processes=1), quiet=True)
    assert exact.shards_total == -(-len(images) // 100)
    # never more shards than samples: tests/test_exports_readers.py


def test_min_shards_is_checked_and_defaults_to_8():
    from lenscap.core.errors import UsageError
    from lenscap.shard.options import ShardOptions

    assert ShardOptions().min_shards == 8
    with pytest.raises(UsageError, match="--min-shards must be at least 1"):
        ShardOptions(min_shards=0)


def test_an_export_of_0_samples_exits_7_with_a_card_saying_so(tmp_path):
    empty = Dataset.create(tmp_path / "empty_in")
    writer = empty.writer(0)
    writer.write(Sample("000000000", {"status": "failed_to_download", "error_message": "HTTP Error 404", "caption": "x"}, None))
    writer.commit({"stage": "download"})
    empty.write_manifest("download", {}, None, expected_shards=1)
    r = run_cli("shard", str(tmp_path / "empty_in"), str(tmp_path / "out"), "--json", "--quiet")
    assert r.returncode == 7, r.stderr
    summary = json.loads(r.stdout)
    assert summary["exit_code"] == 7 and summary["empty"] is True and summary["samples"] == 0 and summary["shards"] == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "This export is empty" in card and "| download: failed_to_download | 1 |" in card
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {}

    from lenscap.core.result import JobResult

    assert JobResult("shard", "x", samples=0, empty=True).exit_code == 7
    assert JobResult("shard", "x", 2, 2, 10).exit_code == 0
    assert JobResult("shard", "x", 0, 0, 0, failed_shards={0: "boom"}, empty=False).exit_code == 1
