"""lenscap dedup: perceptual hashing against imagehash, and the near-duplicate search at 1M and 10M.

    .venv/bin/python bench/dedup.py [--images 300] [--small 1000000] [--large 10000000] [--distance 4] [--ray-cpus 2]

1. Hashing: lenscap's pHash (reduced-size JPEG decode) against ``imagehash.phash`` on the same
   1024x768 JPEG bytes, one process, same run; ratio = imagehash time / lenscap time. Recall on a
   planted set (exact, resized, recompressed copies): pairs within the distance, for both hashes.
2. Search: synthetic 64-bit hashes with planted pairs at every distance 0..r, searched by
   ``pigeonhole.near_pairs`` in DuckDB (2 GB memory limit) as pass 2 runs it. Recall against brute
   force (numpy popcount over every hash) for a sample of query hashes; time at both sizes; the
   ratio large/small with the plan chosen for each size, and with the large size's plan at both.
3. The search split into one executor task per table (``tables.split_near_pairs``), in the same run
   and on the same hashes as 2, pairs checked equal: at the small size with the local executor
   (one process; why local dedup keeps the in-process search), at the large size on a local Ray
   cluster of ``--ray-cpus`` CPUs (started before the clock starts; 0 skips it). Its time includes
   writing the sorted hashes for the tasks and reading their pairs back.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from extras import missing
from PIL import Image

from lenscap.core.executors import Executor, LocalExecutor, RayExecutor, start_local_ray
from lenscap.core.job import Job
from lenscap.dedup.phash import phash
from lenscap.dedup.pigeonhole import PigeonholePlan, near_pairs
from lenscap.dedup.tables import split_near_pairs
from lenscap.demo.pictures import jpeg_bytes, photo


def bench_hashing(n: int, r: int) -> None:
    import imagehash

    originals = [photo(seed, (1024, 768)) for seed in range(n)]
    files = [jpeg_bytes(img) for img in originals]
    start = time.perf_counter()
    for data in files:
        phash(data)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    for data in files:
        imagehash.phash(Image.open(io.BytesIO(data)))
    theirs = time.perf_counter() - start
    print(
        f"hashing {n} JPEGs 1024x768: lenscap {n / ours:.0f} img/s, imagehash.phash {n / theirs:.0f} img/s, "
        f"ratio {theirs / ours:.2f}x (target >= 3)"
    )

    copies = []
    for seed, img in enumerate(originals[: n // 2]):
        kind = seed % 3
        copy = img if kind == 0 else img.resize((512, 384)) if kind == 1 else img
        copies.append(jpeg_bytes(copy, quality=90 if kind < 2 else 35))

    def recall(hash_of) -> tuple[float, int]:
        hashes = [hash_of(b) for b in files]
        found = sum((hashes[i] ^ hash_of(c)).bit_count() <= r for i, c in enumerate(copies))
        copy_hashes = [hash_of(c) for c in copies]
        false = sum(
            (a ^ b).bit_count() <= r
            for i, a in enumerate(hashes)
            for j, b in enumerate(hashes + copy_hashes)
            if j != i and j != i + n
        )
        return found / len(copies), false

    ours_recall, ours_false = recall(lambda b: phash(b).phash)
    their_recall, their_false = recall(lambda b: int(str(imagehash.phash(Image.open(io.BytesIO(b)))), 16))
    print(
        f"planted set ({len(copies)} exact/resized/recompressed copies, distance <= {r}): recall lenscap {ours_recall:.3f}, "
        f"imagehash {their_recall:.3f}; unrelated pairs within the distance: lenscap {ours_false}, imagehash {their_false}"
    )


def synthetic(n: int, r: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct hashes: random, plus 10,000 planted copies at distances 0..r. Returns the
    hashes and the indexes of the planted originals."""
    h = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(np.uint64)
    planted = rng.choice(n, 20_000, replace=False)
    originals, copies = planted[:10_000], planted[10_000:]
    for o, c in zip(originals, copies, strict=True):
        v = h[o]
        for bit in rng.choice(64, rng.integers(1, r + 1), replace=False):
            v ^= np.uint64(1) << np.uint64(int(bit))
        h[c] = v
    return h, originals


def search(h: np.ndarray, plan: PigeonholePlan) -> tuple[float, duckdb.DuckDBPyConnection]:
    con = duckdb.connect()
    con.execute("SET memory_limit = '2GB'")
    con.register("t", pa.table({"uid": np.arange(len(h), dtype=np.int64), "h": h}))
    con.execute("CREATE TABLE uh AS SELECT uid, h FROM t")
    con.unregister("t")
    start = time.perf_counter()
    near_pairs(con, "uh", plan, bucket_cap=2000)
    return time.perf_counter() - start, con


def pair_digest(con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    return con.execute("SELECT count(*), sum(hash(a, b, d)) FROM near").fetchall()[0]


def split(con: duckdb.DuckDBPyConnection, plan: PigeonholePlan, executor: Executor, in_process: float, label: str) -> None:
    """The search again on ``con``'s hashes, one ``executor`` task per table; same pairs, and the time."""
    expected = pair_digest(con)
    with tempfile.TemporaryDirectory(prefix="lenscap-bench-") as work:
        start = time.perf_counter()
        split_near_pairs(con, "uh", plan, 2000, Job("dedup", executor), Path(work), "2GB")
        seconds = time.perf_counter() - start
    same = "same pairs" if pair_digest(con) == expected else "DIFFERENT PAIRS"
    print(f"  one task per table, {label}: {seconds:.1f} s, {same}; ratio to one process {seconds / in_process:.2f}")


def bench_search(small: int, large: int, r: int, ray_cpus: int) -> None:
    rng = np.random.default_rng(0)
    times = {}
    for n in (small, large):
        h, originals = synthetic(n, r, rng)
        plan = PigeonholePlan.for_size(n, r)
        seconds, con = search(h, plan)
        times[n] = seconds
        pairs = con.execute("SELECT count(*) FROM near").fetchall()[0][0]
        print(
            f"search {n:,} hashes, distance <= {r}: {seconds:.1f} s ({len(plan.blocks)} blocks, {len(plan.tables)} tables, "
            f"{1 << plan.partition_bits} partitions), {pairs:,} pairs"
        )
        queries = np.concatenate([originals[:100], rng.choice(n, 100, replace=False)])
        truth = set()
        for q in queries:
            close = np.nonzero(np.bitwise_count(h ^ h[q]) <= r)[0]
            truth.update((min(int(q), int(o)), max(int(q), int(o))) for o in close if o != q)
        con.register("q", pa.table({"uid": queries.astype(np.int64)}))
        found = set(con.execute("SELECT a, b FROM near WHERE a IN (SELECT uid FROM q) OR b IN (SELECT uid FROM q)").fetchall())
        print(
            f"  brute force over {len(queries)} query hashes: {len(truth)} pairs, recall {len(truth & found) / max(1, len(truth)):.3f}, "
            f"{len(found - truth)} found beyond"
        )
        if n == small:
            split(con, plan, LocalExecutor(1), seconds, "local executor, 1 process")
        elif ray_cpus:
            import ray

            start_local_ray(
                num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING"
            )  # on loopback only
            split(con, plan, RayExecutor(), seconds, f"Ray, local cluster of {ray_cpus} CPUs")
            ray.shutdown()
        if n == large:
            same_plan = PigeonholePlan.with_blocks(small, r, len(plan.blocks))
            h_small, _ = synthetic(small, r, rng)
            seconds_small, _ = search(h_small, same_plan)
            print(
                f"ratio {large:,} / {small:,}: {times[large] / times[small]:.1f} with each size's own plan; "
                f"{times[large] / seconds_small:.1f} with the {len(plan.tables)}-table plan at both "
                f"(small: {seconds_small:.1f} s); near-linear target <= {large / small * 1.2:.0f}"
            )
        con.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--small", type=int, default=1_000_000)
    parser.add_argument("--large", type=int, default=10_000_000)
    parser.add_argument("--distance", type=int, default=4)
    parser.add_argument("--ray-cpus", type=int, default=2)
    args = parser.parse_args()
    # Said before the first part, not after minutes of the second.
    no_imagehash = missing("1. hashing against imagehash", "test", "imagehash")
    if args.ray_cpus and missing(f"3. the split search on Ray at {args.large:,}", "ray", "ray"):
        args.ray_cpus = 0
    if not no_imagehash:
        bench_hashing(args.images, args.distance)
    bench_search(args.small, args.large, args.distance, args.ray_cpus)


if __name__ == "__main__":
    main()
