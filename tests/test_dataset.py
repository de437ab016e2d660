"""The dataset directory: shard round trip, stats, listing, crash-safe commits, manifest, opening errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile

import pyarrow.parquet as pq
import pytest
from PIL import Image

from lenscap.core.dataset import Dataset
from lenscap.core.errors import DatasetError
from lenscap.core.layout import parquet_name, shard_name, tar_name
from lenscap.core.record import Sample


def jpeg(i: int, size: tuple[int, int] = (16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, 100)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def make_samples(n: int, start: int = 0, tag: str = "") -> list[Sample]:
    """Every third sample (index 2, 5, ...) failed; failed ones alternate between two error messages."""
    out = []
    for i in range(start, start + n):
        key = shard_name(i)
        if i % 3 == 2:
            err = "404 Not Found" if (i // 3) % 2 == 0 else "timeout"
            row = {
                "url": f"http://img/{i}.jpg",
                "caption": f"failed {i}{tag}",
                "status": "failed_to_download",
                "error_message": err,
            }
            # A failed sample that still carries bytes must not reach the tar.
            out.append(Sample(key=key, row=row, image=jpeg(i) if i % 2 else None))
        else:
            row = {
                "url": f"http://img/{i}.jpg",
                "caption": f"a photo number {i}{tag}",
                "status": "success",
                "error_message": None,
            }
            out.append(Sample(key=key, row=row, image=jpeg(i)))
    return out


def write_shard(ds: Dataset, shard_id: int, samples: list[Sample], extra_stats=None) -> dict:
    w = ds.writer(shard_id)
    for s in samples:
        w.write(s)
    return w.commit(extra_stats)


def tmp_files(path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.endswith(".tmp"))


# -- round trip ----------------------------------------------------------------------------------


def test_shard_round_trips_in_parquet_order(tmp_path):
    ds = Dataset.create(tmp_path / "out")
    samples = make_samples(7)
    write_shard(ds, 0, samples)

    got = list(ds.iter_samples(0))
    assert [s.key for s in got] == [s.key for s in samples]
    for want, have in zip(samples, got):
        assert {k: v for k, v in have.row.items() if k not in ("image_offset", "image_size")} == {**want.row, "key": want.key}
        assert (have.row["image_offset"] is not None) == (want.status == "success")
        if want.status == "success":
            assert have.image == want.image
            assert have.ok
        else:
            assert have.image is None
            assert not have.ok

    table = ds.read_table(0)
    assert table.num_rows == 7
    assert table.column("key").to_pylist() == [s.key for s in samples]
    assert table.column("status").to_pylist() == [s.status for s in samples]


def test_tar_holds_only_successful_samples_with_dot_free_keys(tmp_path):
    ds = Dataset.create(tmp_path / "out")
    samples = make_samples(7)
    write_shard(ds, 0, samples)

    ok = [s for s in samples if s.status == "success"]
    with tarfile.open(ds.tar_path(0)) as tar:
        names = tar.getnames()
        expected = [f"{s.key}.{ext}" for s in ok for ext in ("jpg", "txt", "json")]
        assert names == expected
        for name in names:
            key, ext = name.split(".")  # exactly one dot: webdataset splits at the first one
            assert key.isdigit() and len(key) == 5
        for s in ok:
            assert tar.extractfile(f"{s.key}.jpg").read() == s.image
            assert tar.extractfile(f"{s.key}.txt").read().decode() == s.caption
            assert json.loads(tar.extractfile(f"{s.key}.json").read()) == {"key": s.key, **s.row}
    failed_keys = {s.key for s in samples if s.status != "success"}
    assert failed_keys and not failed_keys & {n.split(".")[0] for n in names}


def test_identical_input_gives_byte_identical_shards(tmp_path):
    a, b = Dataset.create(tmp_path / "a"), Dataset.create(tmp_path / "b")
    write_shard(a, 0, make_samples(5))
    write_shard(b, 0, make_samples(5))
    assert a.tar_path(0).read_bytes() == b.tar_path(0).read_bytes()
    assert a.read_table(0).equals(b.read_table(0))


# -- stats and listing ---------------------------------------------------------------------------


def test_stats_written_only_on_commit_with_right_counts(tmp_path):
    ds = Dataset.create(tmp_path / "out")
    w = ds.writer(3)
    for s in make_samples(9):
        w.write(s)
    # Before commit: temporary files only, nothing that looks like a shard.
    assert not ds.stats_path(3).exists()
    assert not ds.tar_path(3).exists() and not ds.parquet_path(3).exists()
    assert ds.completed_ids() == [] and ds.shard_ids() == []
    assert tmp_files(ds.path) == [".00003.tar.tmp"]

    stats = w.commit({"stage": "test"})
    expected = {
        "shard": "00003",
        "count": 9,
        "successes": 6,
        "status": {"failed_to_download": 3, "success": 6},
        "stage_status": {},
        "errors": {"404 Not Found": 2, "timeout": 1},
        "stage": "test",
        # What a resume checks the shard's files against (Dataset.damaged_shards), and lenscap verify too.
        "files": {"00003.tar": ds.tar_path(3).stat().st_size, "00003.parquet": ds.parquet_path(3).stat().st_size},
        "head_sha256": {n: hashlib.sha256((ds.path / n).read_bytes()[:4096]).hexdigest() for n in ("00003.tar", "00003.parquet")},
        "sha256": {n: hashlib.sha256((ds.path / n).read_bytes()).hexdigest() for n in ("00003.tar", "00003.parquet")},
    }
    assert stats == expected
    assert ds.read_stats(3) == expected
    assert json.loads((ds.path / "00003_stats.json").read_text()) == expected
    assert ds.is_complete(3)
    assert tmp_files(ds.path) == []
    assert list((ds.work_dir / "pending").iterdir()) == []


def test_completed_incomplete_and_shard_ids(tmp_path):
    ds = Dataset.create(tmp_path / "out")
    write_shard(ds, 0, make_samples(3))
    write_shard(ds, 2, make_samples(3, start=6))
    ds.tar_path(1).write_bytes(b"")  # a shard with files but no _stats.json
    (ds.path / "notes.txt").write_text("not a shard")
    (ds.path / "123.tar.bak").write_text("not a shard")

    assert ds.completed_ids() == [0, 2]
    assert ds.shard_ids() == [0, 1, 2]
    assert ds.incomplete_ids() == [1]
    assert ds.incomplete_ids(range(5)) == [1, 3, 4]
    assert ds.incomplete_ids([0, 2]) == []
    assert ds.is_complete(0) and not ds.is_complete(1) and not ds.is_complete(3)


# -- crash safety --------------------------------------------------------------------------------


class Crash(OSError):
    pass


def crash_on_replace_call(monkeypatch, n: int) -> list:
    """Make the n-th os.replace call (and later ones) raise, as if the process died there."""
    real = os.replace
    calls: list = []

    def fake(src, dst):
        calls.append((os.fspath(src), os.fspath(dst)))
        if len(calls) >= n:
            raise Crash("simulated crash")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fake)
    return calls


@pytest.mark.parametrize("crash_at", [2, 3], ids=["before-renames", "after-tar-rename"])
def test_crash_after_journal_leaves_incomplete_shard_that_recover_finishes(tmp_path, monkeypatch, crash_at):
    ds = Dataset.create(tmp_path / "out")
    samples = make_samples(6)
    w = ds.writer(0)
    for s in samples:
        w.write(s)
    calls = crash_on_replace_call(monkeypatch, crash_at)
    with pytest.raises(Crash):
        w.commit()
    monkeypatch.undo()

    # Call 1 put the journal in place; the crash came at a shard rename.
    assert calls[0][1].endswith(os.path.join(".lenscap", "pending", "00000.json"))
    assert (ds.work_dir / "pending" / "00000.json").exists()
    assert not ds.stats_path(0).exists()
    assert not ds.is_complete(0)
    assert ds.completed_ids() == []
    assert ds.incomplete_ids(range(1)) == [0]
    assert not ds.parquet_path(0).exists()
    if crash_at == 3:
        assert ds.tar_path(0).exists() and ds.shard_ids() == [0] and ds.incomplete_ids() == [0]

    fresh = Dataset(ds.path)  # a new process
    assert fresh.recover() == 1
    assert fresh.is_complete(0)
    assert fresh.completed_ids() == [0]
    assert fresh.read_stats(0)["count"] == 6
    assert fresh.read_stats(0)["successes"] == 4
    got = list(fresh.iter_samples(0))
    assert [s.key for s in got] == [s.key for s in samples]
    assert [s.image for s in got] == [s.image if s.status == "success" else None for s in samples]
    assert tmp_files(fresh.path) == []
    assert list((fresh.work_dir / "pending").iterdir()) == []
    assert fresh.recover() == 0


def test_crash_while_rewriting_complete_shard_unmarks_it_then_recover_gives_new_content(tmp_path, monkeypatch):
    ds = Dataset.create(tmp_path / "out")
    write_shard(ds, 0, make_samples(3, tag=" v1"))
    assert ds.is_complete(0)

    w = ds.writer(0)
    for s in make_samples(3, tag=" v2"):
        w.write(s)
    crash_on_replace_call(monkeypatch, 2)
    with pytest.raises(Crash):
        w.commit()
    monkeypatch.undo()

    # The old files are still there, but the shard must not look complete any more.
    assert not ds.is_complete(0)
    assert ds.read_table(0).column("caption").to_pylist()[0].endswith(" v1")
    assert Dataset(ds.path).recover() == 1
    assert ds.is_complete(0)
    assert [s.caption for s in ds.iter_samples(0)] == ["a photo number 0 v2", "a photo number 1 v2", "failed 2 v2"]


def test_crash_by_hand_journal_then_recover(tmp_path):
    """The state Dataset.commit leaves after writing its journal, built by hand."""
    ds = Dataset.create(tmp_path / "out")
    src = Dataset.create(tmp_path / "src")
    write_shard(src, 4, make_samples(4))
    ds.staging_file(tar_name(4)).write_bytes(src.tar_path(4).read_bytes())
    ds.staging_file(parquet_name(4)).write_bytes(src.parquet_path(4).read_bytes())
    pending = ds.work_dir / "pending"
    pending.mkdir(parents=True, exist_ok=True)
    stats = src.read_stats(4)
    (pending / "00004.json").write_text(
        json.dumps(
            {
                "renames": [
                    [str(ds.staging_file(tar_name(4))), str(ds.tar_path(4))],
                    [str(ds.staging_file(parquet_name(4))), str(ds.parquet_path(4))],
                ],
                "stats": stats,
            }
        )
    )
    assert ds.completed_ids() == [] and ds.shard_ids() == []

    assert ds.recover() == 1
    assert ds.completed_ids() == [4]
    assert ds.read_stats(4) == stats
    assert ds.tar_path(4).read_bytes() == src.tar_path(4).read_bytes()
    assert ds.read_table(4).equals(src.read_table(4))
    assert tmp_files(ds.path) == []


def test_recover_removes_stray_tmp_files(tmp_path):
    ds = Dataset.create(tmp_path / "out")
    write_shard(ds, 0, make_samples(3))
    w = ds.writer(1)  # a writer that died before its journal
    w.write(make_samples(1)[0])
    w._tar.close()
    (ds.path / ".00001.parquet.tmp").write_bytes(b"partial")
    (ds.path / ".lenscap.json.tmp").write_text("{")
    (ds.path / ".keep").write_text("not ours")
    assert tmp_files(ds.path) == [".00001.parquet.tmp", ".00001.tar.tmp", ".lenscap.json.tmp"]

    assert ds.recover() == 0
    assert tmp_files(ds.path) == []
    assert (ds.path / ".keep").exists()
    assert ds.completed_ids() == [0]
    assert ds.shard_ids() == [0]


def test_abort_removes_temporary_files(tmp_path):
    ds = Dataset.create(tmp_path / "out")
    w = ds.writer(0)
    w.write(make_samples(1)[0])
    w.abort()
    assert tmp_files(ds.path) == []
    assert ds.shard_ids() == []


# -- manifest ------------------------------------------------------------------------------------

SECRETS = {
    "api_key": "sk-TOPSECRET-0001",
    "OPENAI_API_KEY": "sk-TOPSECRET-0002",
    "apikey": "sk-TOPSECRET-0003",
    "client_secret": "TOPSECRET-0004",
    "db_password": "TOPSECRET-0005",
    "Authorization": "Bearer TOPSECRET-0006",
}


def test_write_manifest_counts_schema_history_and_redaction(tmp_path):
    ds = Dataset.create(tmp_path / "out")
    write_shard(ds, 0, make_samples(6))
    write_shard(ds, 1, make_samples(4, start=6))
    prior = [
        {
            "stage": "download",
            "parameters": {"processes": 4},
            "input": "urls.txt",
            "lenscap_version": "0.0.9",
            "at": "2026-01-01T00:00:00Z",
        }
    ]
    params = {"model": "tiny", "temperature": 0.5, **SECRETS}

    m = ds.write_manifest("caption", params, "/data/in", expected_shards=3, history=prior)

    on_disk = json.loads((ds.path / "lenscap.json").read_text())
    assert on_disk == m
    assert ds.read_manifest() == m
    assert m["stage"] == "caption"
    assert m["input"] == "/data/in"
    assert m["parameters"] == {"model": "tiny", "temperature": 0.5}
    assert m["shards"] == {"expected": 3, "completed": 2}
    assert m["complete"] is False
    # Shard 0: samples 0..5 (2 and 5 failed); shard 1: samples 6..9 (8 failed).
    assert m["counts"] == {"samples": 10, "status": {"failed_to_download": 3, "success": 7}}
    pschema = pq.read_schema(ds.parquet_path(0))
    assert m["schema"] == [{"name": f.name, "type": str(f.type)} for f in pschema]
    assert [c["name"] for c in m["schema"]] == ["url", "caption", "status", "error_message", "key", "image_offset", "image_size"]
    assert m["history"][:1] == prior
    assert len(m["history"]) == 2
    last = m["history"][-1]
    assert last["stage"] == "caption"
    assert last["parameters"] == {"model": "tiny", "temperature": 0.5}
    assert last["input"] == "/data/in"

    text = (ds.path / "lenscap.json").read_text()
    for name, value in SECRETS.items():
        assert value not in text, f"value of {name} leaked into lenscap.json"
        assert value.split("-")[-1] not in text
    assert prior[0] == {
        "stage": "download",
        "parameters": {"processes": 4},
        "input": "urls.txt",
        "lenscap_version": "0.0.9",
        "at": "2026-01-01T00:00:00Z",
    }  # caller's list untouched

    again = ds.write_manifest("caption", params, "/data/in", expected_shards=2, history=prior)
    assert again["complete"] is True
    assert len(again["history"]) == 2  # history comes from the input, not accumulated per write


def test_write_manifest_redacts_nested_secret_parameters(tmp_path):
    """A stage recording a backend's options must not leak a key held one level down."""
    ds = Dataset.create(tmp_path / "out")
    write_shard(ds, 0, make_samples(2))
    params = {
        "backend": {"name": "openai", "api_key": "sk-NESTED-SECRET-1", "headers": {"Authorization": "Bearer NESTED-SECRET-2"}}
    }
    ds.write_manifest("caption", params, None, expected_shards=1)
    text = (ds.path / "lenscap.json").read_text()
    assert "NESTED-SECRET-1" not in text
    assert "NESTED-SECRET-2" not in text


def test_write_manifest_on_empty_dataset(tmp_path):
    ds = Dataset.create(tmp_path / "out")
    m = ds.write_manifest("download", {}, None)
    assert m["counts"] == {"samples": 0, "status": {}}
    assert m["schema"] == []
    assert m["shards"] == {"expected": None, "completed": 0}
    assert m["complete"] is False
    assert [h["stage"] for h in m["history"]] == ["download"]


# -- opening -------------------------------------------------------------------------------------


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


def test_open_missing_path(tmp_path):
    p = tmp_path / "nope"
    with pytest.raises(DatasetError, match=exact(f"dataset directory {p} does not exist")):
        Dataset.open(p)


def test_open_file(tmp_path):
    p = tmp_path / "file.txt"
    p.write_text("x")
    with pytest.raises(DatasetError, match=exact(f"{p} is a file, not a dataset directory")):
        Dataset.open(p)


def test_open_empty_directory(tmp_path):
    p = tmp_path / "empty"
    p.mkdir()
    with pytest.raises(DatasetError, match=exact(f"{p} is not a dataset directory (no shards and no lenscap.json)")):
        Dataset.open(p)


def test_open_dataset_with_shards_or_manifest(tmp_path):
    ds = Dataset.create(tmp_path / "a")
    write_shard(ds, 0, make_samples(2))
    assert Dataset.open(tmp_path / "a").completed_ids() == [0]
    only_manifest = Dataset.create(tmp_path / "b")
    only_manifest.write_manifest("download", {}, None)
    assert Dataset.open(tmp_path / "b").completed_ids() == []


def test_create_on_file_raises(tmp_path):
    p = tmp_path / "file"
    p.write_text("x")
    with pytest.raises(DatasetError, match=exact(f"output directory {p} exists and is a file")):
        Dataset.create(p)
    assert p.read_text() == "x"


def test_create_below_file_raises(tmp_path):
    p = tmp_path / "file"
    p.write_text("x")
    with pytest.raises(DatasetError, match="^" + re.escape(f"cannot create output directory {p / 'sub'}: ")):
        Dataset.create(p / "sub")


def test_create_makes_directory_and_is_reentrant(tmp_path):
    p = tmp_path / "deep" / "out"
    ds = Dataset.create(p)
    assert ds.path == p and p.is_dir() and ds.work_dir.is_dir()
    write_shard(ds, 0, make_samples(2))
    again = Dataset.create(p)
    assert again.completed_ids() == [0]


def test_a_local_path_and_a_file_url_read_through_one_filesystem_interface(tmp_path):
    """A local dataset is fsspec's local filesystem, as a remote one is its own: the same reads, one code path."""
    from fsspec.implementations.local import LocalFileSystem

    from lenscap.demo.datasets import write_image_dataset

    src = write_image_dataset(tmp_path / "raw", 6, per_shard=3)
    as_url = Dataset.open(f"file://{tmp_path / 'raw'}")
    assert isinstance(src.fs, LocalFileSystem) and isinstance(as_url.fs, LocalFileSystem) and not as_url.remote
    assert as_url.location == src.location and as_url.completed_ids() == [0, 1]
    for shard_id in (0, 1):
        assert as_url.read_table(shard_id) == src.read_table(shard_id)
        assert [s.image for s in as_url.iter_samples(shard_id)] == [s.image for s in src.iter_samples(shard_id)]
    assert as_url.read_all_stats([0, 1]) == [src.read_stats(0), src.read_stats(1)]
    shard_bytes, total = src.disk_usage()
    assert shard_bytes == sum(p.stat().st_size for p in (tmp_path / "raw").iterdir() if p.name[0].isdigit())
    assert total >= shard_bytes + (tmp_path / "raw" / "lenscap.json").stat().st_size


LENSCAPS = {
    "00000.tar": b"t",
    "00000.parquet": b"p",
    "00000_stats.json": b"{}",
    ".00001.parquet.tmp": b"cut short",
    "lenscap.json": b"{}",
    "shards.json": b"{}",
    "sizes.json": b"{}",
    "README.md": b"---\nlicense: other\ntags:\n- lenscap\n- image-captioning\n---\n\n# A card\n",
    "data/train-00000-of-00001.parquet": b"p",
    "dedup/report.json": b"{}",
    "dedup/clusters.parquet": b"p",
}
PERSONS = {
    "notes.txt": b"mine",
    "sub/z.txt": b"z",
    "data/mine.csv": b"a,b",
    "dedup/my-notes.md": b"x",
    "mydataset/00000.tar": b"t",
    "mydataset/00000_stats.json": b"{}",
    "mydataset/lenscap.json": b"{}",
}


@pytest.mark.parametrize("where", ["local", "memory"])
def test_clear_removes_only_what_lenscap_wrote(tmp_path, where):
    """``--overwrite``'s clearing, on a local and a remote dataset: lenscap's files go, a person's stay."""
    ds = Dataset(tmp_path / "out" if where == "local" else f"memory://clear-{os.getpid()}/out", work_dir=tmp_path / "work")
    for name, data in {**LENSCAPS, **PERSONS}.items():
        ds.fs.makedirs(ds.file(name).rsplit("/", 1)[0], exist_ok=True)
        ds.fs.pipe_file(ds.file(name), data)
    ds.clear()
    left = {p[len(ds.root.rstrip("/")) + 1 :] for p in ds.fs.find(ds.root)}
    assert left == set(PERSONS)
    ds.fs.rm(ds.root, recursive=True)


def test_clear_keeps_a_readme_that_is_not_lenscaps_card(tmp_path):
    ds = Dataset(tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("---\ntags:\n- mine\n---\n# My project, which mentions - lenscap\n")
    (tmp_path / "out" / "00000_stats.json").write_text("{}")
    ds.clear()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md"]
