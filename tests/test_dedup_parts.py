"""The parts of dedup on their own: the perceptual hash, the pigeonhole search against brute force,
union-find against a plain implementation."""

from __future__ import annotations

import io
import random

import duckdb
import imagehash
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from lenscap.dedup.phash import ALGORITHM, phash
from lenscap.dedup.pigeonhole import PigeonholePlan, near_pairs
from lenscap.dedup.signatures import caption_digest
from lenscap.dedup.unionfind import UnionFind
from lenscap.demo.pictures import jpeg_bytes, photo, png_bytes


def test_phash_matches_imagehash_closely_and_separates_unrelated_photos():
    images = [jpeg_bytes(photo(seed)) for seed in range(40)]
    ours = [phash(b).phash for b in images]
    theirs = [int(str(imagehash.phash(Image.open(io.BytesIO(b)))), 16) for b in images]
    # the same algorithm from a reduced-size decode: within a few bits of imagehash
    assert max((a ^ b).bit_count() for a, b in zip(ours, theirs)) <= 4
    assert min((ours[i] ^ ours[j]).bit_count() for i in range(40) for j in range(i + 1, 40)) > 8


def test_phash_of_copies_and_blanks():
    img = photo(3)
    h = phash(jpeg_bytes(img))
    assert (h.width, h.height, h.degenerate) == (640, 480, False)
    for copy in (jpeg_bytes(img.resize((200, 150))), jpeg_bytes(img, quality=30), png_bytes(img)):
        assert (phash(copy).phash ^ h.phash).bit_count() <= 4
    assert phash(jpeg_bytes(Image.new("RGB", (300, 200), (10, 200, 30)))).degenerate
    with pytest.raises(OSError):
        phash(b"<html>not an image</html>")


def test_caption_digest_normalises():
    assert caption_digest("A red BUS, parked!") == caption_digest("a red bus parked")
    assert caption_digest("a red bus") != caption_digest("a blue bus")
    assert caption_digest("") is None and caption_digest(" ... ") is None and caption_digest(None) is None


def brute_force(h: np.ndarray, r: int) -> set[tuple[int, int]]:
    x = np.bitwise_xor(h[:, None], h[None, :])
    counts = np.unpackbits(x.view(np.uint8), axis=-1).reshape(*x.shape, 64).sum(axis=-1)
    a, b = np.nonzero(np.triu(counts <= r, k=1))
    return set(zip(a.tolist(), b.tolist()))


def planted_hashes(n: int, r: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(np.uint64)
    for i in range(0, n // 2, 3):  # every third hash gets a copy within r bits, some of them chained
        v = h[i]
        for bit in rng.choice(64, rng.integers(0, r + 1), replace=False):
            v ^= np.uint64(1) << np.uint64(int(bit))
        h[n // 2 + i] = v
    return np.unique(h)


@pytest.mark.parametrize(
    "r, blocks, partition_rows",
    [(1, None, 10**6), (2, 4, 10**6), (3, None, 100), (4, 8, 10**6), (4, 7, 150), (5, None, 10**6), (6, 7, 10**6)],
)
def test_pigeonhole_finds_exactly_the_pairs_brute_force_finds(r, blocks, partition_rows):
    h = planted_hashes(600, r, seed=r)
    con = duckdb.connect()
    con.register("t", pa.table({"uid": np.arange(len(h), dtype=np.int64), "h": h}))
    plan = (
        PigeonholePlan.for_size(len(h), r, partition_rows)
        if blocks is None
        else PigeonholePlan.with_blocks(len(h), r, blocks, partition_rows)
    )
    near_pairs(con, "t", plan, bucket_cap=10**6)
    found = con.execute("SELECT a, b, d FROM near").fetchall()
    assert len(found) == len({(a, b) for a, b, _ in found})  # each pair once, however many tables it shares
    assert {(a, b) for a, b, _ in found} == brute_force(h, r)
    assert all(d == (int(h[a]) ^ int(h[b])).bit_count() for a, b, d in found)


def test_pigeonhole_caps_and_reports_huge_buckets():
    h = np.array([0xFFFF0000_00000000 | i for i in range(50)] + [0x12345678_9ABCDEF0], dtype=np.uint64)
    con = duckdb.connect()
    con.register("t", pa.table({"uid": np.arange(len(h), dtype=np.int64), "h": h}))
    near_pairs(con, "t", PigeonholePlan.with_blocks(len(h), 2, 4), bucket_cap=10)
    capped = con.execute("SELECT count(*), max(n) FROM capped").fetchone()
    assert capped[0] >= 1 and capped[1] == 50


def test_plan_grows_its_keys_with_the_data():
    small, large = PigeonholePlan.for_size(10_000, 4), PigeonholePlan.for_size(1_000_000_000, 4)
    assert len(small.tables) < len(large.tables)
    assert min(large.key_bits(t) for t in large.tables) >= 32
    assert PigeonholePlan.for_size(10**8, 4, 10**6).partition_bits > 0


def test_union_find_matches_a_plain_implementation():
    rng = random.Random(7)
    for _ in range(100):
        ids = np.array(sorted(rng.sample(range(10_000), rng.randint(1, 80))), dtype=np.int64)
        edges = [(rng.choice(ids), rng.choice(ids)) for _ in range(rng.randint(0, 120))]
        uf = UnionFind(ids)
        for start in range(0, len(edges), 9):
            chunk = edges[start : start + 9]
            uf.union(np.array([a for a, _ in chunk], dtype=np.int64), np.array([b for _, b in chunk], dtype=np.int64))
        parent = {int(i): int(i) for i in ids}

        def find(x: int, parent: dict[int, int] = parent) -> int:
            while parent[x] != x:
                x = parent[x]
            return x

        for a, b in edges:
            ra, rb = find(int(a)), find(int(b))
            parent[max(ra, rb)] = min(ra, rb)
        assert uf.components().tolist() == [find(int(i)) for i in ids]


def synthetic_signatures(path, n: int, algorithm: str = ALGORITHM):
    """A signatures directory of ``n`` samples; every tenth hash has a copy 2 bits away, further on."""
    from lenscap.core.dataset import Dataset
    from lenscap.core.record import Sample
    from lenscap.dedup.signatures import SIGNATURE_SCHEMA

    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    h[n // 2 : n // 2 + n // 10] = h[: n // 10] ^ np.uint64(0b101)
    sig = Dataset.create(path)
    per = 25_000
    for shard, start in enumerate(range(0, n, per)):
        writer = sig.writer(shard, SIGNATURE_SCHEMA)
        for row, i in enumerate(range(start, min(n, start + per))):
            writer.write(
                Sample(
                    f"{i:09d}",
                    {
                        "shard": shard,
                        "row": row,
                        "sha256": i.to_bytes(32, "big"),
                        "phash": int(h[i]),
                        "phash_algorithm": algorithm,
                        "phash_degenerate": False,
                        "caption_hash": None,
                        "pixels": 100,
                        "image_bytes": 10,
                        "error": None,
                    },
                )
            )
        writer.commit()
    return sig


def test_global_pass_under_a_small_memory_limit_decides_the_same(tmp_path):
    from lenscap.dedup.options import DedupOptions
    from lenscap.dedup.search import Source, find_duplicates

    sig = synthetic_signatures(tmp_path / "sig", 200_000)
    decisions = {}
    for limit in ("1GB", "24MB"):
        report = find_duplicates(
            [Source(0, "in", sig)],
            DedupOptions(memory_limit=limit, processes=1).resolved(),
            tmp_path / f"work-{limit}",
            tmp_path / f"report-{limit}",
        )
        assert report["duplicates"] == 20_000 and report["duplicates_by_reason"] == {"phash": 20_000}
        decisions[limit] = duckdb.sql(
            f"SELECT * FROM '{tmp_path / f'work-{limit}' / 'decisions.parquet'}' ORDER BY shard, key"
        ).fetchall()
        assert not (tmp_path / f"work-{limit}" / "spill").exists()
    assert decisions["1GB"] == decisions["24MB"]


def test_hashes_of_another_algorithm_are_refused(tmp_path):
    from lenscap.core.errors import UsageError
    from lenscap.dedup.options import DedupOptions
    from lenscap.dedup.search import Source, find_duplicates

    sig = synthetic_signatures(tmp_path / "sig", 100, algorithm="imagehash-phash-4.3")
    with pytest.raises(UsageError, match=f"made with imagehash-phash-4.3, not {ALGORITHM}"):
        find_duplicates([Source(0, "in", sig)], DedupOptions().resolved(), tmp_path / "work", tmp_path / "report")
