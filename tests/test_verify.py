"""A complete shard is trusted only while it is what its commit wrote: a resume checks sizes, the first
bytes of each file and the stats file (same-size garbage, another shard's tar, a stats file of ``{}``
are written again), and ``lenscap verify`` reads every byte against the recorded SHA-256."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import run_cli_here

import lenscap.api as lc
from lenscap.core.dataset import Dataset
from lenscap.demo.datasets import write_image_dataset
from lenscap.demo.pictures import jpeg_bytes, scene
from lenscap.demo.server import Route

PER_SHARD = 4
SHARDS = 4
FAST = ["--samples-per-shard", str(PER_SHARD), "--processes", "1", "--threads", "2", "--quiet"]


def _contents(out: Path) -> dict[int, tuple[list[dict], dict[str, bytes]]]:
    """Each shard's rows and tar members (img2dataset writes a tar in the order downloads finish, so
    two runs may place the same images differently: offsets are left out, members compared by name)."""
    ds = Dataset(out)
    found = {}
    for shard_id in ds.completed_ids():
        with tarfile.open(ds.tar_path(shard_id)) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        rows = [{k: v for k, v in r.items() if k != "image_offset"} for r in ds.read_table(shard_id).to_pylist()]
        found[shard_id] = (rows, members)
    return found


@pytest.fixture(scope="module")
def urls(image_server, tmp_path_factory) -> Path:
    """Every URL serves the same picture under a name of the same length: every shard's tar has the
    same size, so one shard's tar copied over another's is damage of the same size."""
    picture = jpeg_bytes(scene(7))
    paths = [f"/same/{i:02d}.jpg" for i in range(PER_SHARD * SHARDS)]
    for path in paths:
        image_server.routes[path] = Route(picture)
    listing = tmp_path_factory.mktemp("urls") / "urls.txt"
    listing.write_text("".join(image_server.url(p) + "\n" for p in paths))
    return listing


@pytest.fixture(scope="module")
def reference(urls, tmp_path_factory) -> Path:
    """An uninterrupted download: what every damaged and rewritten one must equal."""
    out = tmp_path_factory.mktemp("ref") / "raw"
    code, _, err = run_cli_here("download", str(urls), str(out), *FAST)
    assert code == 0, err
    return out


def _download(urls: Path, out: Path) -> str:
    code, _, err = run_cli_here("download", str(urls), str(out), *FAST)
    assert code == 0, err
    return err


def _shard_hits(server, shard_id: int) -> list[int]:
    return [server.hits.get(f"/same/{i:02d}.jpg", 0) for i in range(shard_id * PER_SHARD, (shard_id + 1) * PER_SHARD)]


def test_same_size_damage_and_an_empty_stats_file_are_downloaded_again(urls, reference, image_server, tmp_path):
    out = tmp_path / "raw"
    shutil.copytree(reference, out)
    tar1, tar0, tar2 = out / "00001.tar", out / "00000.tar", out / "00002.tar"
    assert tar0.stat().st_size == tar2.stat().st_size
    tar1.write_bytes(os.urandom(tar1.stat().st_size))  # same-size garbage
    shutil.copyfile(tar0, tar2)  # another shard's tar: same size, shard 0's images under shard 2's rows
    (out / "00003_stats.json").write_text("{}")  # no proof of anything: its totals would be 0
    assert sorted(Dataset(out).damaged_shards()) == [1, 2, 3]

    hits = {i: _shard_hits(image_server, i) for i in range(SHARDS)}
    err = _download(urls, out)
    for shard_id, why in (
        (1, "00001.tar does not begin with the bytes written"),
        (2, "00002.tar does not begin with the bytes written"),
        (3, "00003_stats.json has no row count"),
    ):
        assert f"shard {shard_id:05d} of {out} was damaged since it was written ({why}" in err, err
        assert _shard_hits(image_server, shard_id) == [n + 1 for n in hits[shard_id]]  # fetched again
    assert _shard_hits(image_server, 0) == hits[0]  # sound: kept
    assert _contents(out) == _contents(reference)
    counts = [Dataset(p).read_manifest()["counts"] for p in (out, reference)]
    assert counts[0] == counts[1] and counts[0]["samples"] == PER_SHARD * SHARDS


def test_verify_names_flipped_bytes_and_repair_has_them_written_again(urls, reference, image_server, tmp_path):
    code, stdout, err = run_cli_here("verify", str(reference), "--json", "--processes", "2")
    summary = json.loads(stdout)
    assert code == 0 and summary["ok"] and summary["exit_code"] == 0, err
    assert summary["shards"] == {"checked": SHARDS, "ok": SHARDS, "unchecked": 0, "damaged": 0, "incomplete": 0}
    assert summary["bytes_read"] == sum(p.stat().st_size for p in reference.iterdir() if p.suffix in (".tar", ".parquet"))

    out = tmp_path / "raw"
    shutil.copytree(reference, out)
    tar = out / "00001.tar"
    data = bytearray(tar.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    tar.write_bytes(bytes(data))
    assert Dataset(out).damaged_shards() == {}  # past the first bytes: only a read of every byte finds it

    code, stdout, err = run_cli_here("verify", str(out), "--processes", "1")
    assert code == 1
    assert "damaged 00001: 00001.tar does not have the SHA-256 written" in stdout
    assert "1 damaged" in stdout and "verify --repair" in err

    code, stdout, _ = run_cli_here("verify", str(out), "--json", "--repair", "--processes", "1", "--quiet")
    summary = json.loads(stdout)
    assert code == 1 and list(summary["damaged_shards"]) == ["00001"] and summary["repaired"] == ["00001"]
    assert Dataset(out).completed_ids() == [0, 2, 3]

    hits = _shard_hits(image_server, 1)
    _download(urls, out)
    assert _shard_hits(image_server, 1) == [n + 1 for n in hits]
    assert _contents(out) == _contents(reference)
    code, stdout, _ = run_cli_here("verify", str(out), "--json", "--processes", "1")
    assert code == 0 and json.loads(stdout)["shards"]["ok"] == SHARDS


def _write_old(path: Path) -> Dataset:
    """A dataset as lenscap wrote it before checksums were recorded: sizes in its stats, no SHA-256."""
    ds = write_image_dataset(path, 8, per_shard=4)
    for shard_id in ds.completed_ids():
        stats = ds.read_stats(shard_id)
        del stats["sha256"], stats["head_sha256"]
        ds.stats_path(shard_id).write_text(json.dumps(stats))
    return ds


def test_a_shard_written_before_checksums_is_unchecked_yet_its_tar_must_be_one(tmp_path):
    ds = _write_old(tmp_path / "old")
    code, stdout, err = run_cli_here("verify", str(ds.path), "--json", "--processes", "1")
    summary = json.loads(stdout)
    assert code == 0, err
    assert summary["shards"] == {"checked": 2, "ok": 0, "unchecked": 2, "damaged": 0, "incomplete": 0}
    assert summary["unchecked_shards"] == {"00000": ["00000.tar", "00000.parquet"], "00001": ["00001.tar", "00001.parquet"]}

    tar = ds.tar_path(1)
    tar.write_bytes(os.urandom(tar.stat().st_size))
    assert ds.damaged_shards() == {1: "00001.tar does not begin with a tar header"}
    code, stdout, _ = run_cli_here("verify", str(ds.path), "--json", "--processes", "1")
    assert code == 1 and json.loads(stdout)["damaged_shards"] == {"00001": "00001.tar does not begin with a tar header"}


def test_a_stats_file_that_is_not_this_shards_is_not_trusted(tmp_path):
    ds = write_image_dataset(tmp_path / "raw", 12, per_shard=4)
    sound = ds.stats_path(0).read_text()
    ds.stats_path(1).write_text(sound)  # shard 0's stats: its sizes and checksums, not shard 1's
    ds.stats_path(2).write_text(json.dumps({**json.loads(sound), "shard": "00002", "count": "4"}))
    assert ds.damaged_shards() == {
        1: "00001_stats.json is the stats file of shard 00000, not of 00001",
        2: "00002_stats.json has no row count: it is not a stats file lenscap wrote",
    }


def test_verify_refuses_an_export(tmp_path):
    src = write_image_dataset(tmp_path / "raw", 4, per_shard=4)
    code, _, err = run_cli_here("shard", str(src.path), str(tmp_path / "release"), "--processes", "1", "--quiet")
    assert code == 0, err
    code, _, err = run_cli_here("verify", str(tmp_path / "release"), "--quiet")
    assert code == 2 and "is an export" in err and "Traceback" not in err


def test_a_tar_moved_inside_a_store_is_checked_by_its_size_and_head(tmp_path):
    """img2dataset's tar staged in the output's store (download on Ray) is moved in place there, never
    through this machine: its size and first 4 KiB are recorded, not its SHA-256 (verify: unchecked)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        member = tarfile.TarInfo("000000000.jpg")
        member.size = 10000
        tar.addfile(member, io.BytesIO(os.urandom(member.size)))
    ds = Dataset.create("memory://verify-moved/raw")
    ds.put_bytes(".lenscap/img2dataset/00000.tar", buffer.getvalue())
    parquet = ds.staging_file("00000.parquet")
    parquet.write_bytes(b"PAR1 rows PAR1")
    stats = ds.commit(
        0, {"00000.tar": ".lenscap/img2dataset/00000.tar", "00000.parquet": parquet}, {"shard": "00000", "count": 1}
    )
    assert set(stats["head_sha256"]) == {"00000.tar", "00000.parquet"} and set(stats["sha256"]) == {"00000.parquet"}

    summary = lc.verify("memory://verify-moved/raw")
    assert summary["exit_code"] == 0 and summary["unchecked_shards"] == {"00000": ["00000.tar"]}
    data = bytearray(ds.fs.cat_file(ds.file("00000.tar")))
    data[0] ^= 1  # the first member's name
    ds.put_bytes("00000.tar", bytes(data))
    assert ds.damaged_shards() == {0: "00000.tar does not begin with the bytes written (replaced or overwritten since)"}
    assert lc.verify("memory://verify-moved/raw")["damaged_shards"] == {"00000": ds.damaged_shards()[0]}
