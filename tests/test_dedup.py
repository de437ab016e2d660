"""lenscap dedup: planted exact, resized, recompressed and cropped copies across shards; blanks and
broken images; --mark-only, --keep largest, --captions, --against; determinism; bad input; SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import duckdb
import pytest
from conftest import run_cli
from PIL import Image

from lenscap.core.dataset import Dataset
from lenscap.demo.datasets import write_image_dataset
from lenscap.demo.pictures import jpeg_bytes, photo, truncated_jpeg

ORIGINALS = 60
KINDS = ("exact", "resized", "recompressed", "crop")


def planted(i: int) -> tuple[str, int]:
    """What sample ``i`` of the planted set is: (kind, seed). Originals first, copies after, so copies
    land in other shards than their originals."""
    if i < ORIGINALS:
        return "original", i
    if i < ORIGINALS + 40:
        j = i - ORIGINALS
        return KINDS[j % 4], j // 4 * 3 + j % 4  # 40 copies of 40 different originals
    if i < ORIGINALS + 44:  # the last blank is an exact copy of the first
        return "blank", ORIGINALS + 40 if i == ORIGINALS + 43 else i
    return "broken", ORIGINALS + 44


def planted_image(i: int) -> bytes:
    kind, seed = planted(i)
    img = photo(seed)
    if kind in ("original", "exact"):
        return jpeg_bytes(img)
    if kind == "resized":
        return jpeg_bytes(img.resize((320, 240), Image.Resampling.LANCZOS))
    if kind == "recompressed":
        return jpeg_bytes(img, quality=35)
    if kind == "crop":  # 1% off each side: 2% of the width and height
        w, h = img.size
        return jpeg_bytes(img.crop((w // 100, h // 100, w - w // 100, h - h // 100)))
    if kind == "blank":  # three blank images of different sizes, then an exact copy of the first
        side = {ORIGINALS + 40: 200, ORIGINALS + 41: 300, ORIGINALS + 42: 400, ORIGINALS + 43: 200}[i]
        return jpeg_bytes(Image.new("RGB", (side, side), (250, 250, 250)))
    return truncated_jpeg(7)  # two identical undecodable files


N = ORIGINALS + 46


def make_planted(path: Path, caption=lambda i: f"sample number {i}") -> Path:
    return write_image_dataset(path, N, per_shard=20, image=planted_image, caption=caption, failed=lambda i: i == 5).path


def rows(path: Path) -> dict[str, dict]:
    ds = Dataset(path)
    out = {}
    for shard_id in ds.completed_ids():
        for r in ds.read_table(shard_id).to_pylist():
            out[r["key"]] = r
    return out


def tar_members(path: Path) -> dict[str, bytes]:
    out = {}
    for tar_path in sorted(Path(path).glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                out[m.name] = tar.extractfile(m).read()
    return out


def seed_of(key: str) -> int:
    return planted(int(key))[1]


@pytest.fixture(scope="module")
def deduped(tmp_path_factory):
    base = tmp_path_factory.mktemp("dedup")
    src = make_planted(base / "in")
    r = run_cli("dedup", str(src), str(base / "out"), "--json", "--quiet", "--processes", "2")
    assert r.returncode == 0, r.stderr
    return base, json.loads(r.stdout)


def test_planted_copies_are_found_and_nothing_unrelated_is_merged(deduped):
    base, summary = deduped
    got = rows(base / "out")
    assert len(got) == N  # every row stays, failed download included
    assert got["000000005"]["dedup_status"] == "skipped"
    for key, r in got.items():
        kind, seed = planted(int(key))
        if kind in ("exact", "resized", "recompressed") and seed != 5:
            assert r["dedup_status"] == "duplicate", (key, kind, r)
            assert r["dup_of"] == f"{seed:09d}", (key, kind)
            assert r["dup_reason"] == ("exact" if kind == "exact" else "phash")
            assert r["dup_distance"] is None if kind == "exact" else r["dup_distance"] <= 4
        if r["dedup_status"] == "duplicate":  # whatever was merged is a copy of the same original
            assert kind != "original" and seed_of(r["dup_of"]) == seed, (key, r)
    originals = [r for k, r in got.items() if planted(int(k))[0] == "original" and k != "000000005"]
    assert all(r["dedup_status"] in ("kept", "unique") for r in originals)
    crops = [r for k, r in got.items() if planted(int(k))[0] == "crop"]
    assert crops and all(r["dedup_status"] in ("duplicate", "unique") for r in crops)
    # duplicates lost their images; every other image is still there, unchanged (in the input's tars)
    assert not list((base / "out").glob("*.tar"))
    out, src = Dataset.open(base / "out"), Dataset.open(base / "in")
    images = {s.key: s.image for i in out.completed_ids() for s in out.iter_samples(i) if s.has_image}
    src_images = {s.key: s.image for i in src.completed_ids() for s in src.iter_samples(i) if s.has_image}
    for key, r in got.items():
        if r["dedup_status"] == "duplicate":
            assert key not in images
        elif r["dedup_status"] != "skipped":
            assert images[key] == src_images[key]
    assert summary["duplicates"] == sum(r["dedup_status"] == "duplicate" for r in got.values())
    assert summary["exit_code"] == 0


def test_blank_and_broken_images(deduped):
    base, _ = deduped
    got = rows(base / "out")
    blanks = [f"{i:09d}" for i in range(ORIGINALS + 40, ORIGINALS + 44)]
    # blank images all share a perceptual hash; they are compared by bytes only
    assert [got[k]["dedup_status"] for k in blanks] == ["kept", "unique", "unique", "duplicate"]
    assert got[blanks[3]]["dup_of"] == blanks[0] and got[blanks[3]]["dup_reason"] == "exact"
    broken = [f"{i:09d}" for i in range(ORIGINALS + 44, N)]
    assert [got[k]["dedup_status"] for k in broken] == ["kept", "duplicate"]
    assert all("cannot compute a perceptual hash" in got[k]["dedup_error"] for k in broken)
    report = json.loads((base / "out" / "dedup" / "report.json").read_text())
    assert report["degenerate_images"] == 4 and report["unhashable_images"] == 2


def test_report_names_every_cluster_and_its_keeper(deduped):
    base, summary = deduped
    report = json.loads((base / "out" / "dedup" / "report.json").read_text())
    clusters = duckdb.sql(f"SELECT cluster, size, key, kept, why FROM '{base / 'out' / 'dedup' / 'clusters.parquet'}'").fetchall()
    keepers = [c for c in clusters if c[3]]
    assert len(keepers) == report["clusters"] == summary["clusters"]
    assert all(why == "first in input order" for *_, why in keepers)
    assert len(clusters) - len(keepers) == report["duplicates"]
    assert sum(report["duplicates_by_reason"].values()) == report["duplicates"]
    info = json.loads(run_cli("inspect", str(base / "out"), "--json").stdout)
    assert info["dedup"]["duplicates"] == report["duplicates"] and info["dedup"]["clusters"] == report["clusters"]
    assert info["stage_status"]["dedup_status"]["duplicate"] == report["duplicates"]
    got = rows(base / "out")
    for cluster, _size, key, kept, _why in clusters:
        assert got[key]["dup_cluster"] == cluster
        assert got[key]["dedup_status"] == ("kept" if kept else "duplicate")


def test_rerun_is_deterministic(tmp_path, deduped):
    base, _ = deduped
    r = run_cli("dedup", str(base / "in"), str(tmp_path / "again"), "--quiet", "--processes", "1")
    assert r.returncode == 0, r.stderr
    assert rows(tmp_path / "again") == rows(base / "out")
    assert tar_members(tmp_path / "again") == tar_members(base / "out")
    # rerunning a finished job does nothing and changes nothing
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "again").iterdir() if p.is_file()}
    decisions = (tmp_path / "again" / ".lenscap" / "dedup" / "decisions.json").stat().st_mtime_ns
    assert run_cli("dedup", str(base / "in"), str(tmp_path / "again"), "--quiet").returncode == 0
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "again").iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if k != "lenscap.json"} == {k: v for k, v in before.items() if k != "lenscap.json"}
    assert (tmp_path / "again" / ".lenscap" / "dedup" / "decisions.json").stat().st_mtime_ns == decisions


def test_captioning_after_dedup_says_which_image_a_duplicate_repeats(tmp_path, deduped):
    base, _ = deduped
    args = ["--backend", "describe", "--option", "ocr=off", "--option", "faces=off", "--quiet"]
    r = run_cli("caption", str(base / "out"), str(tmp_path / "c"), *args, env={"LENSCAP_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    captioned, deduplicated = rows(tmp_path / "c"), rows(base / "out")
    duplicates = {k: row["dup_of"] for k, row in deduplicated.items() if row["dedup_status"] == "duplicate"}
    assert duplicates and all(captioned[k]["caption_status"] == "skipped" for k in duplicates)
    assert {k: captioned[k]["caption_error"] for k in duplicates} == {
        k: f"no image (dedup: duplicate of {of})" for k, of in duplicates.items()
    }


def test_mark_only_removes_nothing(tmp_path, deduped):
    base, _ = deduped
    r = run_cli("dedup", str(base / "in"), str(tmp_path / "marked"), "--mark-only", "--quiet")
    assert r.returncode == 0, r.stderr
    marked, removed = rows(tmp_path / "marked"), rows(base / "out")
    source = rows(base / "in")
    for key, row in marked.items():  # the same decisions; a marked duplicate keeps its image
        assert {c: v for c, v in row.items() if not c.startswith("image_")} == {
            c: v for c, v in removed[key].items() if not c.startswith("image_")
        }
        assert (row["image_offset"], row["image_size"]) == (source[key]["image_offset"], source[key]["image_size"])


def test_keep_largest(tmp_path):
    # a small copy first, the large original later: --keep first keeps the small one, largest the large
    def image(i: int) -> bytes:
        img = photo(i % 3)
        return jpeg_bytes(img.resize((160, 120)) if i < 3 else img)

    src = write_image_dataset(tmp_path / "in", 6, per_shard=3, image=image).path
    for keep, kept in (("first", {"000000000", "000000001", "000000002"}), ("largest", {"000000003", "000000004", "000000005"})):
        r = run_cli("dedup", str(src), str(tmp_path / keep), "--keep", keep, "--quiet")
        assert r.returncode == 0, r.stderr
        got = rows(tmp_path / keep)
        assert {k for k, r in got.items() if r["dedup_status"] == "kept"} == kept
    clusters = duckdb.sql(f"SELECT why FROM '{tmp_path / 'largest' / 'dedup' / 'clusters.parquet'}' WHERE kept").fetchall()
    assert clusters == [("largest (307200 pixels)",)] * 3


def test_captions(tmp_path):
    captions = {0: "A red Bus, parked.", 1: "a red bus parked", 2: "", 3: "", 4: "a blue bus"}
    src = write_image_dataset(
        tmp_path / "in", 5, per_shard=5, image=lambda i: jpeg_bytes(photo(i)), caption=lambda i: captions[i]
    ).path
    r = run_cli("dedup", str(src), str(tmp_path / "out"), "--captions", "--quiet")
    assert r.returncode == 0, r.stderr
    got = rows(tmp_path / "out")
    assert [got[f"{i:09d}"]["dedup_status"] for i in range(5)] == ["kept", "duplicate", "unique", "unique", "unique"]
    assert got["000000001"]["dup_reason"] == "caption"
    # captions only: the images were not compared
    manifest = json.loads((tmp_path / "out" / "lenscap.json").read_text())
    assert manifest["parameters"]["exact"] is False and manifest["parameters"]["phash"] is False


def test_against_an_earlier_release(tmp_path):
    prev = write_image_dataset(tmp_path / "prev", 10, per_shard=5, image=lambda i: jpeg_bytes(photo(i))).path
    prev_rows, prev_members = rows(prev), tar_members(prev)

    # new: copies of released 0 and 1 (first in order, so they would win without --against),
    # two new copies of released 2, and two new images duplicating each other
    def image(i: int) -> bytes:
        seed = {0: 0, 1: 1, 2: 2, 3: 2, 4: 100, 5: 100, 6: 101}[i]
        img = photo(seed)
        return jpeg_bytes(img.resize((320, 240)) if i == 1 else img)

    new = write_image_dataset(tmp_path / "new", 7, per_shard=4, image=image).path
    r = run_cli("dedup", str(new), str(tmp_path / "out"), "--against", str(prev), "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    got = rows(tmp_path / "out")
    status = {k: v["dedup_status"] for k, v in got.items()}
    assert status == {
        "000000000": "duplicate",
        "000000001": "duplicate",
        "000000002": "duplicate",
        "000000003": "duplicate",
        "000000004": "kept",
        "000000005": "duplicate",
        "000000006": "unique",
    }
    for key, released in (
        ("000000000", "000000000"),
        ("000000001", "000000001"),
        ("000000002", "000000002"),
        ("000000003", "000000002"),
    ):
        assert got[key]["dup_of"] == released and got[key]["dup_in"] == str(prev)
    assert got["000000005"]["dup_of"] == "000000004" and got["000000005"]["dup_in"] is None
    summary = json.loads(r.stdout)
    assert summary["duplicates"] == 5
    report = json.loads((tmp_path / "out" / "dedup" / "report.json").read_text())
    assert report["duplicates_of_earlier_releases"] == 4
    assert rows(prev) == prev_rows and tar_members(prev) == prev_members  # never the reverse


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-distance", "3", "--exact"], "--max-distance applies to --phash"),
        (["--keep", "biggest"], "--keep must be first or largest"),
        (["--max-distance", "40"], "--max-distance must be between 0 and 16"),
        (["--memory-limit", "lots"], "--memory-limit takes a size"),
        (["--memory-limit", "1GB'; DROP TABLE x"], "--memory-limit takes a size"),
        (["--against", "/nonexistent/prev"], "does not exist"),
        (["--processes", "0"], "--processes must be at least 1"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, args, message):
    src = write_image_dataset(tmp_path / "in", 4, per_shard=4, image=lambda i: jpeg_bytes(photo(i))).path
    r = run_cli("dedup", str(src), str(tmp_path / "out"), "--quiet", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_missing_input_and_changed_settings(tmp_path):
    r = run_cli("dedup", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    src = write_image_dataset(tmp_path / "in", 4, per_shard=4, image=lambda i: jpeg_bytes(photo(i))).path
    assert run_cli("dedup", str(src), str(tmp_path / "out"), "--quiet").returncode == 0
    r = run_cli("dedup", str(src), str(tmp_path / "out"), "--captions", "--quiet")
    assert r.returncode == 2 and "other settings (captions: False -> True" in r.stderr and "--overwrite" in r.stderr
    r = run_cli("dedup", str(src), str(src), "--quiet")
    assert r.returncode == 2 and "is the input" in r.stderr


@pytest.mark.parametrize("fraction", [0.15, 0.35, 0.5, 0.65, 0.8])
def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path, deduped, fraction):
    base, _ = deduped
    src = base / "in"
    args = ["dedup", str(src), str(tmp_path / "out"), "--quiet", "--processes", "2"]
    started = time.monotonic()
    assert run_cli("dedup", str(src), str(tmp_path / "timing"), "--quiet", "--processes", "2").returncode == 0
    whole = time.monotonic() - started
    delay = whole * fraction
    for _ in range(4):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        proc = subprocess.Popen([sys.executable, "-m", "lenscap.cli", *args], start_new_session=True)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        delay /= 2  # it finished first: the timing run was slower (a busy machine); kill earlier
    else:
        pytest.fail("the run always finished before the kill")
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not after
    work = tmp_path / "out" / ".lenscap" / "dedup"
    print(
        "killed with",
        len(list((work / "signatures").glob("*_stats.json"))),
        "signature shards,",
        "decisions" if (work / "decisions.json").exists() else "no decisions,",
        len(list((tmp_path / "out").glob("*_stats.json"))),
        "output shards",
    )
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert rows(tmp_path / "out") == rows(base / "out")
    assert tar_members(tmp_path / "out") == tar_members(base / "out")


def test_sigkill_while_writing_output_shards(tmp_path, deduped):
    base, _ = deduped
    args = ["dedup", str(base / "in"), str(tmp_path / "out"), "--quiet", "--processes", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "lenscap.cli", *args], start_new_session=True)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and not list((tmp_path / "out").glob("*_stats.json")):
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert 0 < len(Dataset(tmp_path / "out").completed_ids()) < 6
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert rows(tmp_path / "out") == rows(base / "out")
    assert tar_members(tmp_path / "out") == tar_members(base / "out")
