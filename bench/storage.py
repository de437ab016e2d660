"""Bytes on disk per pipeline directory: images written once, against every stage writing its own copy.

    .venv/bin/python bench/storage.py [--images 500] [--size 1024x768]

Runs download -> filter -> caption (describe) -> dedup -> shard on generated photos served on
loopback, twice from the same download: as lenscap runs by default (filter, caption and dedup write
rows that refer to the download's images), and with --copy-images on each of them (every stage a
self-contained copy, as before images were written once; the baseline). Prints each directory's
bytes, the stage directories' share of the download (target < 5%), parquet bytes per row, and the
export's equality between the two runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from lenscap import api
from lenscap.demo.pictures import jpeg_bytes, photo, scene_caption
from lenscap.demo.server import ImageServer, Route

STAGES = ("filter", "caption", "dedup")


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def parquet_bytes_per_row(path: Path) -> float:
    files = sorted(path.glob("*.parquet"))
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    return sum(f.stat().st_size for f in files) / max(rows, 1)


def pipeline(download: Path, work: Path, copy_images: bool) -> None:
    api.filter(download, work / "filter", min_side=256, annotate="blur", max_uniformity=0.95, copy_images=copy_images)
    api.caption(work / "filter", work / "caption", backend="describe", no_cache=True, copy_images=copy_images)
    api.dedup(work / "caption", work / "dedup", copy_images=copy_images)
    api.shard(work / "dedup", work / "shard", format="webdataset")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--size", default="1024x768")
    a = ap.parse_args()
    width, height = (int(x) for x in a.size.split("x"))
    routes = {f"/img/{i}.jpg": Route(jpeg_bytes(photo(i, (width, height)), quality=90)) for i in range(a.images)}
    with tempfile.TemporaryDirectory() as tmp, ImageServer(routes) as server:
        work = Path(tmp)
        urls = work / "urls.jsonl"
        urls.write_text(
            "".join(json.dumps({"url": server.url(p), "caption": scene_caption(i)}) + "\n" for i, p in enumerate(routes))
        )
        download = work / "download"
        api.download(
            urls,
            download,
            api.DownloadOptions(samples_per_shard=max(1, a.images // 4), processes=2, threads=8, allow_private_network=True),
        )
        runs = {"rows only": work / "rows", "--copy-images (baseline)": work / "copy"}
        for label, out in runs.items():
            pipeline(download, out, copy_images=label != "rows only")
        base = tree_bytes(download)
        print(f"{a.images} images of {a.size}; download: {base:,} B ({parquet_bytes_per_row(download):.0f} B/row of parquet)")
        for label, out in runs.items():
            stages = sum(tree_bytes(out / s) for s in STAGES)
            parts = ", ".join(f"{s} {tree_bytes(out / s):,} B ({parquet_bytes_per_row(out / s):.0f} B/row)" for s in STAGES)
            print(f"{label}: {parts}; the three together {stages / base:.1%} of the download (target < 5% rows only)")
        rows, copy = runs.values()
        rows_total = sum(tree_bytes(rows / s) for s in STAGES)
        copy_total = sum(tree_bytes(copy / s) for s in STAGES)
        same = all((rows / "shard" / p.name).read_bytes() == p.read_bytes() for p in (copy / "shard").glob("*.tar"))
        print(f"intermediate bytes, copies / rows only: {copy_total / rows_total:.0f}x; exports byte-identical: {same}")


if __name__ == "__main__":
    main()
