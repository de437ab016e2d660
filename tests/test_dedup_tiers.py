"""dedup's tiers with default settings: flipped and rotated copies are found, flat graphics and
same-layout colour pairs are not merged, every merge names its tier and distance, and ``--against`` a
plain folder of images removes an eval set's copies from the input."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli_here
from PIL import Image
from test_dedup import rows

from lenscap.core.dataset import Dataset
from lenscap.dedup.phash import ALGORITHM, LOW_QUALITY, phash
from lenscap.dedup.pigeonhole import PigeonholePlan, near_pairs
from lenscap.dedup.signatures import signature_algorithm
from lenscap.dedup.thumbnails import MAX_THUMBNAIL_DIFFERENCE, thumbnail_differences
from lenscap.demo.datasets import write_image_dataset
from lenscap.demo.pictures import colour_pair, graphic, jpeg_bytes, photo, png_bytes

PHOTOS, GRAPHICS, PAIRS = 20, 20, 10
DISTINCT = PHOTOS + GRAPHICS + 2 * PAIRS  # 60
FLIPPED, ROTATED = range(DISTINCT, DISTINCT + 10), range(DISTINCT + 10, DISTINCT + 20)
EXACT = DISTINCT + 20  # an exact copy of photo 0
N = EXACT + 1


def world(i: int) -> bytes:
    """Sample ``i``: 20 photos, 20 flat graphics, 10 same-layout colour pairs (the 60 distinct images),
    then flipped copies of photos 0-9, 90-degree rotated copies of photos 10-19, an exact copy."""
    if i < PHOTOS:
        return jpeg_bytes(photo(i))
    if i < PHOTOS + GRAPHICS:
        return png_bytes(graphic(i))
    if i < DISTINCT:
        j = i - PHOTOS - GRAPHICS
        return png_bytes(colour_pair(j // 2)[j % 2])
    if i in FLIPPED:
        return jpeg_bytes(photo(i - DISTINCT).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    if i in ROTATED:
        return jpeg_bytes(photo(i - DISTINCT).rotate(90, expand=True))
    return jpeg_bytes(photo(0))


def key(i: int) -> str:
    return f"{i:09d}"


def run(*args: str) -> dict:
    code, out, err = run_cli_here(*args, "--json", "--quiet", "--processes", "1")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def tiers(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiers")
    src = write_image_dataset(base / "in", N, per_shard=30, image=world, caption=lambda i: f"sample {i}").path
    summary = run("dedup", str(src), str(base / "out"))
    return base, summary, rows(base / "out")


def test_flipped_and_rotated_copies_are_found_and_no_distinct_image_is_merged(tiers):
    base, summary, got = tiers
    for i in [*FLIPPED, *ROTATED]:
        r = got[key(i)]
        assert r["dedup_status"] == "duplicate" and r["dup_of"] == key(i - DISTINCT), (i, r)
        assert (r["dup_tier"], r["dup_reason"]) == ("near", "phash") and 0 <= r["dup_distance"] <= 4
    assert got[key(EXACT)]["dup_of"] == key(0)
    assert (got[key(EXACT)]["dup_tier"], got[key(EXACT)]["dup_reason"], got[key(EXACT)]["dup_distance"]) == (
        "exact",
        "exact",
        None,
    )
    assert [key(i) for i in range(DISTINCT) if got[key(i)]["dedup_status"] == "duplicate"] == []
    assert summary["duplicates"] == 21 and summary["duplicates_by_reason"] == {"exact": 1, "phash": 20}
    report = json.loads((base / "out" / "dedup" / "report.json").read_text())
    assert report["duplicates_by_tier"] == summary["duplicates_by_tier"] == {"exact": 1, "near": 20, "caption": 0, "semantic": 0}
    # the colour pairs hash alike: the thumbnails, not the hashes, kept them apart
    assert report["pairs_rejected_by_thumbnail"] >= PAIRS
    assert report["low_quality_images"] + report["degenerate_images"] == GRAPHICS + 2 * PAIRS
    assert report["options"]["phash_algorithm"] == ALGORITHM


def test_a_copy_of_a_flat_graphic_is_merged_once_its_thumbnail_agrees(tmp_path):
    # graphic 3 and a resized, recompressed, mirrored copy; a colour pair beside it stays apart
    a, b = colour_pair(4)
    images = [
        png_bytes(graphic(3)),
        jpeg_bytes(graphic(3).resize((300, 225)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        png_bytes(a),
        png_bytes(b),
    ]
    src = write_image_dataset(tmp_path / "in", 4, image=lambda i: images[i]).path
    run("dedup", str(src), str(tmp_path / "out"))
    got = rows(tmp_path / "out")
    assert [got[key(i)]["dedup_status"] for i in range(4)] == ["kept", "duplicate", "unique", "unique"]
    assert got[key(1)]["dup_tier"] == "near"
    clusters = pq.read_table(tmp_path / "out" / "dedup" / "clusters.parquet").to_pylist()
    assert [c["why"] for c in clusters if not c["kept"]][0].endswith("thumbnails agree")


def test_against_a_folder_of_images_removes_the_eval_sets_copies(tiers, tmp_path):
    base, _, _ = tiers
    evalset = tmp_path / "eval"
    (evalset / "nested" / ".hidden").mkdir(parents=True)
    (evalset / "a.jpg").write_bytes(world(5))  # the same bytes as sample 5
    (evalset / "nested" / "b.PNG").write_bytes(png_bytes(photo(12).resize((320, 240)).transpose(Image.Transpose.ROTATE_270)))
    (evalset / "nested" / "c.webp").write_bytes(b"not an image at all")  # compared by its bytes only
    (evalset / "nested" / ".hidden" / "d.png").write_bytes(world(25))  # hidden: not part of the eval set
    (evalset / "notes.txt").write_text("not an image name")
    summary = run("dedup", str(base / "in"), str(tmp_path / "out"), "--against", str(evalset))
    got = rows(tmp_path / "out")
    assert (got[key(5)]["dedup_status"], got[key(5)]["dup_of"], got[key(5)]["dup_tier"]) == ("duplicate", "a.jpg", "exact")
    assert got[key(5)]["dup_in"] == str(evalset)
    # photo 5's flipped copy goes with it, and photo 12 and its rotated copy go for the eval set's turned copy
    for i, of in ((65, "a.jpg"), (12, "nested/b.PNG"), (72, "nested/b.PNG")):
        assert (got[key(i)]["dedup_status"], got[key(i)]["dup_of"], got[key(i)]["dup_tier"]) == ("duplicate", of, "near")
    assert got[key(25)]["dedup_status"] == "unique"
    report = json.loads((tmp_path / "out" / "dedup" / "report.json").read_text())
    assert report["duplicates_of_earlier_releases"] == 4
    assert summary["duplicates"] == 21 + 2  # the copies within the input, and photos 5 and 12 now too
    assert report["sources"][1] == {"dataset": str(evalset), "role": "against", "samples_with_images": 3}


def test_against_something_that_is_neither_is_refused(tiers, tmp_path):
    base, _, _ = tiers
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    code, _, err = run_cli_here("dedup", str(base / "in"), str(tmp_path / "out"), "--against", str(tmp_path / "empty"))
    assert code == 2 and "neither a dataset directory nor a folder of images" in err


def test_dihedral_variants_are_the_hashes_of_the_flipped_and_rotated_images():
    img = photo(4)
    h = phash(png_bytes(img))
    assert h.variants[0] == h.phash and h.quality > LOW_QUALITY and h.thumbnail is None
    turned = [phash(png_bytes(img.transpose(t))) for t in Image.Transpose]
    assert {t.phash for t in turned} | {h.phash} == set(h.variants)  # one DCT gives all 8, bit for bit
    # every flip and rotation indexes the same canonical key besides its hash as it is
    canonical = set(h.keys[1:]) or {h.phash}
    assert all(canonical & set(t.keys) for t in turned)
    flat = phash(png_bytes(graphic(1)))
    assert flat.quality < LOW_QUALITY and len(flat.thumbnail) == 16 * 16 * 3


def test_thumbnails_tell_colour_pairs_apart_and_match_turned_copies():
    a, b = colour_pair(0)
    ta, tb = (phash(png_bytes(x)).thumbnail for x in (a, b))
    turned = phash(jpeg_bytes(a.transpose(Image.Transpose.ROTATE_90), quality=40)).thumbnail
    diffs = thumbnail_differences([ta, ta], [tb, turned])
    assert diffs[0] > 5 * MAX_THUMBNAIL_DIFFERENCE and diffs[1] < MAX_THUMBNAIL_DIFFERENCE / 2
    assert np.array_equal(thumbnail_differences([], []), np.zeros(0))


def test_signatures_left_by_the_previous_algorithm_are_made_again(tmp_path):
    """A job killed before its search, then resumed by an upgraded lenscap: its v1 signatures (one hash,
    no keys) would miss the turned copy; they are recognised and made again."""
    src = write_image_dataset(tmp_path / "in", 3, image=lambda i: world([0, 60, 25][i])).path
    run("dedup", str(src), str(tmp_path / "out"))
    out = Dataset(tmp_path / "out")
    for shard in out.completed_ids():  # as if killed before its search: no output shard, no decisions
        out.parquet_path(shard).unlink()
        (tmp_path / "out" / f"{shard:05d}_stats.json").unlink()
    (out.work_dir / "dedup" / "decisions.json").unlink()
    signatures = out.work_dir / "dedup" / "signatures"
    path = Dataset(signatures).parquet_path(0)
    table = pq.read_table(path).drop_columns(["phash_keys", "phash_quality", "thumbnail"])
    pq.write_table(
        table.set_column(table.schema.get_field_index("phash_algorithm"), "phash_algorithm", pa.array(["lenscap-phash-v1"] * 3)),
        path,
    )
    assert signature_algorithm(signatures) == "lenscap-phash-v1" and signature_algorithm(tmp_path / "none") is None
    code, out_text, err = run_cli_here("dedup", str(src), str(tmp_path / "out"), "--json", "--processes", "1")
    assert code == 0, err
    assert f"were made with lenscap-phash-v1; hashing again with {ALGORITHM}" in err
    assert signature_algorithm(signatures) == ALGORITHM
    assert rows(tmp_path / "out")[key(1)]["dup_of"] == key(0)  # the flipped copy, found on the new keys


def test_pigeonhole_at_distance_0_pairs_equal_hashes_of_different_rows():
    # an image's canonical key may equal another's exactly: --max-distance 0 still searches
    con = duckdb.connect()
    h = np.array([5, 5, 2**63 + 7, 2**63 + 7, 9], dtype=np.uint64)
    con.register("t", pa.table({"uid": np.arange(5, dtype=np.int64), "h": h}))
    near_pairs(con, "t", PigeonholePlan.for_size(5, 0), bucket_cap=100)
    assert con.execute("SELECT * FROM near ORDER BY a").fetchall() == [(0, 1, 0), (2, 3, 0)]
