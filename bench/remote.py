"""Remote storage: what staging shards through local disk costs, against a local object store.

    .venv/bin/python bench/remote.py [--shards 20] [--per-shard 250] [--rounds 2]

Runs the same filter stage (cheap rules only, so the I/O dominates) three ways over the same input:
local directory to local directory (the baseline), local to ``s3://`` and ``s3://`` to ``s3://``,
where the bucket is moto's S3 server on loopback (the one the tests use). Prints samples/s and MB/s
of each, and the ratio to the baseline. Loopback has no network latency or bandwidth limit, so the
ratio measures lenscap's own overhead (download to a temporary copy, upload, listing): the real
store's throughput per node adds to it and is measured on a pilot, not here.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from extras import missing

from lenscap.core.job import run_stage
from lenscap.core.progress import LogProgress
from lenscap.demo.datasets import write_image_dataset
from lenscap.filter.options import FilterOptions
from lenscap.filter.stage import FilterStage


def timed(src: str, dst: str) -> float:
    t = time.perf_counter()
    run_stage(FilterStage(FilterOptions(min_side=10)), src, dst, progress=LogProgress("filter", quiet=True))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--per-shard", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    if missing("this benchmark (moto's S3 on loopback)", "test", "moto", "s3fs"):
        return
    from moto.server import ThreadedMotoServer  # optional (the test extra), as is s3fs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
    )
    import s3fs

    s3fs.S3FileSystem().mkdir("bench")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            os.environ["LENSCAP_WORK_DIR"] = str(root / "mirrors")
            n = a.shards * a.per_shard
            src = write_image_dataset(root / "in", n, per_shard=a.per_shard, size=(512, 384)).path
            mb = sum(p.stat().st_size for p in src.iterdir() if p.is_file()) / 1e6
            best = {"local -> local": float("inf"), "local -> s3": float("inf"), "s3 -> s3": float("inf")}
            for r in range(a.rounds):  # alternated, best of each: the machine is shared
                best["local -> local"] = min(best["local -> local"], timed(str(src), str(root / f"out{r}")))
                best["local -> s3"] = min(best["local -> s3"], timed(str(src), f"s3://bench/out{r}"))
                best["s3 -> s3"] = min(best["s3 -> s3"], timed(f"s3://bench/out{r}", f"s3://bench/again{r}"))
    finally:
        server.stop()
    base = best["local -> local"]
    print(f"filter (cheap rules), {n} samples of 512x384 in {a.shards} shards, {mb:.0f} MB, 1 process, best of {a.rounds}")
    for name, seconds in best.items():
        print(f"  {name:15s} {n / seconds:8.0f} samples/s  {mb / seconds:7.1f} MB/s  ratio to local {base / seconds:.2f}")


if __name__ == "__main__":
    main()
