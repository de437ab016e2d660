"""lenscap shard: export throughput against a plain copy of the same bytes, in one run.

    .venv/bin/python bench/shard.py [--images 5000] [--rounds 3] [--processes 1]

Baseline: ``shutil.copyfile`` of every input tar to a fresh directory, the least any export must do
(read and write each image once); on Linux that is ``copy_file_range``, a copy inside the kernel
from the page cache. lenscap's export, per format, does its three passes (index from the tar
headers, plan, write shards with images copied from their offsets) and writes the card.
A second reference: the re-shard a user would write with ``tarfile`` (read every member of every
input tar, write it to a new tar). A third: the WebDataset export of the same input without its
``image_offset``/``image_size`` columns, where the index scans every tar's headers instead (how the
export found its images before offsets were recorded at download); reading through the offset
column should be no slower. MB/s counts the input tars' bytes; ratio = baseline time /
export time (target >= 0.5 against the plain copy). Each round writes to fresh directories, the
tools alternate, and medians are printed.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from lenscap.demo.datasets import write_image_dataset
from lenscap.demo.pictures import jpeg_bytes, photo
from lenscap.shard.command import run_shard
from lenscap.shard.options import ShardOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        distinct = [jpeg_bytes(photo(seed, (1024, 768)), quality=95) for seed in range(100)]  # ~1024 px, as exported
        src = write_image_dataset(work / "in", args.images, per_shard=1000, image=lambda i: distinct[i % len(distinct)]).path
        tars = sorted(src.glob("*.tar"))
        legacy = work / "no-offsets"  # the same shards, the offset columns dropped from their parquet
        shutil.copytree(src, legacy)
        for parquet in legacy.glob("*.parquet"):
            pq.write_table(pq.read_table(parquet).drop_columns(["image_offset", "image_size"]), parquet)
        megabytes = sum(t.stat().st_size for t in tars) / 1e6
        print(f"{args.images} images, {len(tars)} input shards, {megabytes:.0f} MB of tars; {args.processes} process(es)")
        times: dict[str, list[float]] = {"copy": [], "tarfile": [], "webdataset": [], "parquet": [], "scan": []}
        for round_ in range(args.rounds):
            start = time.perf_counter()
            copy_dir = work / f"copy{round_}"
            copy_dir.mkdir()
            for t in tars:
                shutil.copyfile(t, copy_dir / t.name)
            times["copy"].append(time.perf_counter() - start)
            start = time.perf_counter()
            naive_dir = work / f"naive{round_}"
            naive_dir.mkdir()
            for t in tars:
                with tarfile.open(t) as tar_in, tarfile.open(naive_dir / t.name, "w") as tar_out:
                    for member in tar_in:
                        tar_out.addfile(member, tar_in.extractfile(member))
            times["tarfile"].append(time.perf_counter() - start)
            runs = [("webdataset", src), ("scan", legacy), ("parquet", src)]
            for name, source in runs if round_ % 2 == 0 else runs[::-1]:  # alternated: neither always goes first
                fmt = "parquet" if name == "parquet" else "webdataset"
                start = time.perf_counter()
                run_shard(
                    source,
                    work / f"{name}{round_}",
                    ShardOptions(format=fmt, target_size="50MB", processes=args.processes),
                    quiet=True,
                )
                times[name].append(time.perf_counter() - start)
            for d in work.glob(f"*{round_}"):
                shutil.rmtree(d)
        copy = statistics.median(times["copy"])
        naive = statistics.median(times["tarfile"])
        print(f"plain copy (baseline): {megabytes / copy:.0f} MB/s; tarfile re-shard: {megabytes / naive:.0f} MB/s")
        for fmt in ("webdataset", "parquet"):
            t = statistics.median(times[fmt])
            print(
                f"lenscap shard --format {fmt}: {megabytes / t:.0f} MB/s, ratio {copy / t:.2f} against the plain copy "
                f"(target >= 0.5), {naive / t:.2f} against the tarfile re-shard"
            )
        scan = statistics.median(times["scan"])
        print(
            f"webdataset through the offset column: {scan / statistics.median(times['webdataset']):.2f} the speed of the "
            f"same export scanning tar headers ({megabytes / scan:.0f} MB/s) (target >= 1.0)"
        )


if __name__ == "__main__":
    main()
