"""The fixed start-up of a tiny download: `lenscap download` of 5 loopback URLs vs img2dataset called
directly on the same 5 URLs with the same settings, alternating, wall seconds from process start to exit.

    .venv/bin/python bench/download_startup.py [--rounds 5]

With 5 images the download itself is milliseconds: what is measured is what every run pays (interpreter
and imports, img2dataset's process, its worker pool, the shard's adoption). Prints each run, the medians
and the ratio lenscap / img2dataset (target: <= 1.0, the wrapper adds no start-up of its own; and the
lenscap median under 5 s on a quiet machine). A bare interpreter's start is printed as the floor.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
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

IMAGES = 5
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}


def _timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    return time.perf_counter() - t


def run_lenscap(url_list: Path, out: Path) -> float:
    # --processes at its default (all cores), as a user's first run has it; the server is on loopback.
    return _timed(
        [sys.executable, "-m", "lenscap.cli", "download", str(url_list), str(out), "--quiet", "--allow-private-network"]
    )


def run_img2dataset(url_list: Path, out: Path) -> float:
    options = DownloadOptions()
    kwargs = options.img2dataset_kwargs(str(url_list), str(out), options.workers, ray=False)
    kwargs.update(input_format="txt", save_additional_columns=None, caption_col=None)
    config = out.with_suffix(".json")
    config.write_text(json.dumps(kwargs))
    return _timed([sys.executable, "-c", f"import json, img2dataset; img2dataset.download(**json.load(open({str(config)!r})))"])


def run_interpreter(url_list: Path, out: Path) -> float:
    return _timed([sys.executable, "-c", "pass"])


def _serve(url_list: Path, ready, stop) -> None:
    """The image server, in a process of its own so that it shares no interpreter lock with the timing."""
    routes = {f"/s/{i}.jpg": Route(jpeg_bytes(scene(i, (320, 240)))) for i in range(IMAGES)}
    with ImageServer(routes) as server:
        url_list.write_text("".join(f"{server.url(p)}\n" for p in routes))
        ready.set()
        stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lenscap-bench-"))
    url_list = work / "urls.txt"
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    server = ctx.Process(target=_serve, args=(url_list, ready, stop), daemon=True)
    server.start()
    try:
        ready.wait()
        runs = [("lenscap", run_lenscap), ("img2dataset", run_img2dataset), ("interpreter", run_interpreter)]
        times: dict[str, list[float]] = {name: [] for name, _ in runs}
        for r in range(args.rounds):
            for name, fn in runs if r % 2 == 0 else runs[::-1]:  # alternate: drift hits both alike
                out = work / f"{name}-{r}"
                times[name].append(fn(url_list, out))
                print(f"round {r}: {name:12s} {times[name][-1]:6.2f} s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"median wall time of a {IMAGES}-URL download: lenscap {med['lenscap']:.2f} s, "
            f"img2dataset {med['img2dataset']:.2f} s (a bare interpreter: {med['interpreter']:.2f} s)"
        )
        print(f"ratio lenscap/img2dataset = {med['lenscap'] / med['img2dataset']:.3f}  (target <= 1.0; lenscap < 5 s)")
    finally:
        stop.set()
        server.join(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
