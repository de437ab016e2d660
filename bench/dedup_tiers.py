"""lenscap dedup's tiers on a planted set, beside ``imagehash.phash`` on the same images, same run.

    .venv/bin/python bench/dedup_tiers.py [--originals 30] [--graphics 60] [--pairs 30] [--hashes 200000]

1. Recall and false merges. A dataset of photo-like originals with one copy of each kind per original
   (exact, resized, recompressed, flipped left-right and top-bottom, rotated 90/180/270, and 2% and
   5% crops, reported apart), flat graphics (a resized and recompressed copy of every other one) and
   same-layout colour pairs, deduplicated by ``lenscap dedup`` with default settings (``--mark-only``).
   A copy is found when it lands in its original's cluster; the tier that merged it is its
   ``dup_tier``. An image of the distinct set is falsely merged when its cluster holds an image of
   another group. The baseline: ``imagehash.phash`` of every image, every pair within the same
   distance (4) merged (brute force: no search misses), clusters by union-find.
2. Hashing speed: lenscap's hash (its orientations, quality, thumbnails of flat images) against the
   single pHash of the previous release (lenscap-phash-v1, reproduced here), and ``pdqhash``'s
   ``compute_dihedral`` (PDQ, 8 orientations of 256 bits) on the same reduced decode, one process, on
   1024x768 photo JPEGs and on flat-graphic PNGs; ratio = v1 time / v2 time.
3. Search speed: the pigeonhole search of random hashes as pass 2 runs it, one hash per image (v1)
   against the hash and the canonical orientations' keys (v2, as many keys per image as the photos
   of 2 had); ratio = v2 / v1 time.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from extras import missing
from PIL import Image

from lenscap.api import dedup
from lenscap.core.dataset import Dataset
from lenscap.dedup.phash import _DCT, _SIDE, phash
from lenscap.dedup.pigeonhole import PigeonholePlan, near_pairs
from lenscap.demo.datasets import write_image_dataset
from lenscap.demo.pictures import colour_pair, graphic, jpeg_bytes, photo, png_bytes

T = Image.Transpose
COPIES: dict[str, Callable[[Image.Image], bytes]] = {
    "exact": lambda img: jpeg_bytes(img),
    "resized": lambda img: jpeg_bytes(img.resize((320, 240), Image.Resampling.LANCZOS)),
    "recompressed": lambda img: jpeg_bytes(img, quality=35),
    "flipped left-right": lambda img: jpeg_bytes(img.transpose(T.FLIP_LEFT_RIGHT)),
    "flipped top-bottom": lambda img: jpeg_bytes(img.transpose(T.FLIP_TOP_BOTTOM)),
    "rotated 90": lambda img: jpeg_bytes(img.transpose(T.ROTATE_90)),
    "rotated 180": lambda img: jpeg_bytes(img.transpose(T.ROTATE_180)),
    "rotated 270": lambda img: jpeg_bytes(img.transpose(T.ROTATE_270)),
    "crop 2%": lambda img: jpeg_bytes(img.crop((6, 5, img.width - 7, img.height - 5))),
    "crop 5%": lambda img: jpeg_bytes(img.crop((16, 12, img.width - 16, img.height - 12))),
}


def planted(originals: int, graphics: int, pairs: int) -> list[tuple[str, int, bytes]]:
    """(kind, group, bytes): a copy's group is its original's; every distinct image has its own."""
    out = []
    for seed in range(originals):
        out.append(("photo", seed, jpeg_bytes(photo(seed))))
    for seed in range(originals):
        img = photo(seed)
        out += [(kind, seed, make(img)) for kind, make in COPIES.items()]
    for seed in range(graphics):
        img = graphic(seed)
        out.append(("flat graphic", 1000 + seed, png_bytes(img)))
        if seed % 2 == 0:
            out.append(("graphic copy", 1000 + seed, jpeg_bytes(img.resize((300, 225)), quality=50)))
    for seed in range(pairs):
        for side, img in enumerate(colour_pair(seed)):
            out.append(("colour pair", 2000 + 2 * seed + side, png_bytes(img)))
    return out


def clusters_from_pairs(n: int, pairs: list[tuple[int, int]]) -> list[int]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[max(find(a), find(b))] = min(find(a), find(b))
    return [find(i) for i in range(n)]


def imagehash_clusters(images: list[bytes], distance: int) -> list[int]:
    import imagehash

    hashes = []
    for data in images:
        try:
            hashes.append(int(str(imagehash.phash(Image.open(io.BytesIO(data)))), 16))
        except OSError:
            hashes.append(None)
    pairs = [
        (i, j)
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if hashes[i] is not None and hashes[j] is not None and (hashes[i] ^ hashes[j]).bit_count() <= distance
    ]
    return clusters_from_pairs(len(images), pairs)


def lenscap_clusters(images: list[bytes], work: Path) -> tuple[list[int], list[str | None]]:
    src = write_image_dataset(work / "in", len(images), per_shard=100, image=lambda i: images[i]).path
    result = dedup(src, work / "out", mark_only=True, processes=2)
    assert result.exit_code == 0, result.summary()
    out = Dataset(work / "out")
    rows = {r["key"]: r for i in out.completed_ids() for r in out.read_table(i).to_pylist()}
    clusters, tiers = [], []
    for i in range(len(images)):
        r = rows[f"{i:09d}"]
        clusters.append(r["dup_cluster"] if r["dup_cluster"] is not None else -1 - i)
        tiers.append(r["dup_tier"])
    return clusters, tiers


def bench_tiers(originals: int, graphics: int, pairs: int) -> None:
    images = planted(originals, graphics, pairs)
    data = [b for _, _, b in images]
    with tempfile.TemporaryDirectory() as tmp:
        ours, tiers = lenscap_clusters(data, Path(tmp))
    theirs = imagehash_clusters(data, 4)
    first = {}
    for i, (kind, group, _) in enumerate(images):
        if kind in ("photo", "flat graphic"):
            first[group] = i
    print(f"planted set: {len(images)} images; lenscap dedup (defaults) / imagehash.phash within 4 bits, brute force")
    print(f"  {'copies':<22}{'n':>4}  {'lenscap recall':>15}  {'tier that merged them':<24}{'imagehash recall':>17}")
    for kind in [*COPIES, "graphic copy"]:
        members = [i for i, (k, _, _) in enumerate(images) if k == kind]
        found = [i for i in members if ours[i] == ours[first[images[i][1]]]]
        their = sum(theirs[i] == theirs[first[images[i][1]]] for i in members)
        by_tier = {t: sum(tiers[i] == t for i in found) for t in dict.fromkeys(tiers[i] for i in found)}
        tier_text = ", ".join(f"{t} {n}" for t, n in by_tier.items()) or "-"
        print(f"  {kind:<22}{len(members):>4}  {len(found) / len(members):>15.2f}  {tier_text:<24}{their / len(members):>17.2f}")
    print(f"  {'distinct images':<22}{'n':>4}  {'lenscap false merges':>21}  {'imagehash false merges':>23}")
    for kind in ("photo", "flat graphic", "colour pair"):
        members = [i for i, (k, _, _) in enumerate(images) if k == kind]

        def falsely_merged(clusters: list[int], i: int) -> bool:
            return any(clusters[j] == clusters[i] and images[j][1] != images[i][1] for j in range(len(images)))

        a = sum(falsely_merged(ours, i) for i in members)
        b = sum(falsely_merged(theirs, i) for i in members)
        print(f"  {kind:<22}{len(members):>4}  {a:>6} ({a / len(members):.2f}){'':<8}  {b:>8} ({b / len(members):.2f})")


_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def phash_v1(data: bytes) -> int:
    """The previous release's hash (lenscap-phash-v1): the image as it is, nothing else."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("L", (2 * _SIDE, 2 * _SIDE))
        grey = image.convert("L").resize((_SIDE, _SIDE), Image.Resampling.LANCZOS)
    low = _DCT @ np.asarray(grey, dtype=np.float64) @ _DCT.T
    return int(np.bitwise_or.reduce(_WEIGHTS[(low > np.median(low)).ravel()]))


def pdq_dihedral(data: bytes) -> None:
    import pdqhash

    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (128, 128))  # PDQ works on a 64x64 downsample: decode no more than it needs
        pdqhash.compute_dihedral(np.asarray(image.convert("RGB")))


def timed(fn: Callable[[bytes], object], files: list[bytes], repeats: int = 3) -> float:
    """The best of ``repeats`` passes over ``files``: a busy machine slows some passes, never speeds one."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for data in files:
            fn(data)
        best = min(best, time.perf_counter() - start)
    return best


def bench_hashing(n: int) -> float:
    """Print the hashing speeds; return the mean number of keys per photo."""
    sets = {
        "1024x768 photo JPEGs": [jpeg_bytes(photo(seed, (1024, 768))) for seed in range(n)],
        "400x300 flat-graphic PNGs": [png_bytes(graphic(seed)) for seed in range(n)],
    }
    pdq = not missing("the PDQ timing", "test", "pdqhash")
    for name, files in sets.items():
        v1, v2 = timed(phash_v1, files), timed(phash, files)
        line = f"hashing {n} {name}: v1 {n / v1:.0f} img/s, v2 {n / v2:.0f} img/s, ratio v1/v2 {v1 / v2:.2f}"
        if pdq:
            line += f"; pdqhash.compute_dihedral {n / timed(pdq_dihedral, files):.0f} img/s"
        print(line)
    keys = [len(phash(data).keys) for data in sets["1024x768 photo JPEGs"]]
    print(f"keys per photo: {np.mean(keys):.2f} (its hash as it is and its canonical orientations)")
    return float(np.mean(keys))


def bench_search(n: int, keys_per_image: float, distance: int = 4) -> None:
    """v1 indexes one hash per image; v2 its keys (the hash as it is and its canonical orientations),
    ``keys_per_image`` of them on average, as measured on the photos."""
    rng = np.random.default_rng(0)
    extra = rng.random(n) < keys_per_image - 1  # images with a canonical key besides their hash
    more = rng.random(n) < max(0.0, keys_per_image - 2)  # and a second one, where the choice is close
    h = rng.integers(0, 2**63, (n, 3), dtype=np.int64).astype(np.uint64)
    h[n // 2 : n // 2 + n // 20, 1] = h[: n // 20, 1] ^ np.uint64(0b1011)  # planted turned copies
    extra[: n // 20] = extra[n // 2 : n // 2 + n // 20] = True
    uid = np.arange(n, dtype=np.int64)
    # v2's rows are numbered image * 16 + key, and a pair of one image's rows is never compared, as pass 2 does
    rows = {
        "v1": (uid, h[:, 0], None),
        "v2": (
            np.concatenate([uid * 16, uid[extra] * 16 + 1, uid[more] * 16 + 2]),
            np.concatenate([h[:, 0], h[extra, 1], h[more, 2]]),
            "a.uid // 16 <> b.uid // 16",
        ),
    }
    times = {}
    for name, (ids, hashes, restrict) in rows.items():
        con = duckdb.connect()
        con.execute("SET threads = 2")
        con.register("t", pa.table({"uid": ids, "h": hashes, "has_new": np.ones(len(ids), dtype=bool)}))
        plan = PigeonholePlan.for_size(len(ids), distance)
        start = time.perf_counter()
        near_pairs(con, "t", plan, bucket_cap=2000, restrict=restrict)
        times[name] = time.perf_counter() - start
        found = (
            con.execute("SELECT count(DISTINCT (a // 16, b // 16)) FROM near").fetchall()[0][0]
            if restrict
            else con.execute("SELECT count(*) FROM near").fetchall()[0][0]
        )
        print(
            f"search {n} images ({len(ids)} keys), distance {distance}, {name}: {len(plan.tables)} tables, {found} pairs, {times[name]:.1f} s"
        )
        con.close()
    print(f"search ratio v2/v1: {times['v2'] / times['v1']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--originals", type=int, default=30)
    parser.add_argument("--graphics", type=int, default=60)
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--hash-images", type=int, default=200)
    parser.add_argument("--hashes", type=int, default=200_000)
    args = parser.parse_args()
    if not missing("the tier comparison", "test", "imagehash"):
        bench_tiers(args.originals, args.graphics, args.pairs)
    keys_per_image = bench_hashing(args.hash_images)
    bench_search(args.hashes, keys_per_image)


if __name__ == "__main__":
    main()
