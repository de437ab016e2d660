"""lenscap download vs img2dataset called directly: same loopback images, same settings, alternating.

    .venv/bin/python bench/download.py [--images 5000] [--rounds 5]

Prints each run's throughput and the ratio of medians (lenscap / img2dataset). Target: >= 0.95,
i.e. the wrapper (input splitting, byte checks, adoption into the dataset directory) costs nothing
that matters. Both runs pay img2dataset's start-up; the loopback server runs in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lenscap.demo.pictures import jpeg_bytes, scene
from lenscap.demo.server import ImageServer, Route
from lenscap.download.options import DownloadOptions

SETTINGS = dict(samples_per_shard=500, processes=2, threads=32)


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_lenscap(url_list: Path, out: Path) -> float:
    cmd = [
        sys.executable,
        "-m",
        "lenscap.cli",
        "download",
        str(url_list),
        str(out),
        "--quiet",
        "--samples-per-shard",
        str(SETTINGS["samples_per_shard"]),
        "--processes",
        str(SETTINGS["processes"]),
        "--threads",
        str(SETTINGS["threads"]),
        "--allow-private-network",
    ]  # the image server is on loopback
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def run_img2dataset(url_list: Path, out: Path) -> float:
    options = DownloadOptions(**SETTINGS)
    kwargs = options.img2dataset_kwargs(str(url_list), str(out), options.workers, ray=False)
    kwargs.update(input_format="csv", save_additional_columns=None)
    config = out.with_suffix(".json")
    config.write_text(json.dumps(kwargs))
    code = f"import json, img2dataset; img2dataset.download(**json.load(open({str(config)!r})))"
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
    )
    return time.perf_counter() - t


def _serve(n_images: int, url_list: Path, ready, stop) -> None:
    """The image server, in a process of its own so that it shares no interpreter lock with the timing."""
    routes = {f"/b/{i}.jpg": Route(jpeg_bytes(scene(i, (320, 240)))) for i in range(n_images)}
    with ImageServer(routes) as server:
        # URL and alt-text, the usual input: both tools then write KEY.txt captions.
        url_list.write_text("url,caption\n" + "".join(f"{server.url(p)},caption {i}\n" for i, p in enumerate(routes)))
        ready.set()
        stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lenscap-bench-"))
    url_list = work / "urls.csv"
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    server = ctx.Process(target=_serve, args=(args.images, url_list, ready, stop), daemon=True)
    server.start()
    try:
        ready.wait()
        times: dict[str, list[float]] = {"lenscap": [], "img2dataset": []}
        cpus: dict[str, list[float]] = {"lenscap": [], "img2dataset": []}
        for r in range(args.rounds):
            # Alternate which goes first, so drift on a shared machine hits both alike.
            order = [("lenscap", run_lenscap), ("img2dataset", run_img2dataset)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                out = work / f"{name}-{r}"
                cpu = _children_cpu()
                seconds = fn(url_list, out)
                cpu = _children_cpu() - cpu
                times[name].append(seconds)
                cpus[name].append(cpu)
                print(f"round {r}: {name:12s} {seconds:6.2f} s  {args.images / seconds:7.1f} img/s  {cpu:6.2f} CPU s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["img2dataset"] / med["lenscap"]
        print(
            f"median throughput: lenscap {args.images / med['lenscap']:.1f} img/s, "
            f"img2dataset {args.images / med['img2dataset']:.1f} img/s"
        )
        print(f"ratio lenscap/img2dataset = {ratio:.3f}  (target >= 0.95)")
        cpu_med = {k: statistics.median(v) for k, v in cpus.items()}
        print(
            f"CPU seconds of the downloader's process tree (median; the server not included): "
            f"lenscap {cpu_med['lenscap']:.2f}, img2dataset {cpu_med['img2dataset']:.2f}"
        )
    finally:
        stop.set()
        server.join(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
