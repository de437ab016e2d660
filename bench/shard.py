"""lenscap shard: export throughput against a plain copy of the same bytes, in one run.

    .venv/bin/python bench/shard.py [--images 3000] [--rounds 3]

Baseline: ``shutil.copyfile`` of every input tar to a fresh directory, the least any export must do
(read and write each image once). lenscap's export, per format, does its three passes (index from
the tar headers, plan in DuckDB, write shards with images read at their offsets) and writes the
card. MB/s counts the input tars' bytes; ratio = copy time / export time (target >= 0.5). Both run
with a cold output directory each round, alternating; medians are printed.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from lenscap.demo.datasets import write_image_dataset
from lenscap.demo.images import jpeg_bytes, photo
from lenscap.export.job import ExportOptions, run_export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = write_image_dataset(work / "in", args.images, per_shard=500, image=lambda i: jpeg_bytes(photo(i, (768, 576)))).path
        tars = sorted(src.glob("*.tar"))
        megabytes = sum(t.stat().st_size for t in tars) / 1e6
        print(f"{args.images} images, {len(tars)} input shards, {megabytes:.0f} MB of tars; {args.processes} process(es)")
        times: dict[str, list[float]] = {"copy": [], "webdataset": [], "parquet": []}
        for round_ in range(args.rounds):
            start = time.perf_counter()
            copy_dir = work / f"copy{round_}"
            copy_dir.mkdir()
            for t in tars:
                shutil.copyfile(t, copy_dir / t.name)
            times["copy"].append(time.perf_counter() - start)
            for fmt in ("webdataset", "parquet"):
                start = time.perf_counter()
                run_export(ExportOptions(format=fmt, target_bytes=50 * 10**6), src, work / f"{fmt}{round_}", args.processes, quiet=True)
                times[fmt].append(time.perf_counter() - start)
            for d in work.glob(f"*{round_}"):
                shutil.rmtree(d)
        copy = statistics.median(times["copy"])
        print(f"plain copy (baseline): {megabytes / copy:.0f} MB/s")
        for fmt in ("webdataset", "parquet"):
            t = statistics.median(times[fmt])
            print(f"lenscap shard --format {fmt}: {megabytes / t:.0f} MB/s, ratio {copy / t:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
