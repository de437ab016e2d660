"""A lopsided list on loopback hosts: lenscap --per-host-rps R against its floor, and the worst second at the big host.

    .venv/bin/python bench/polite.py [--big 400] [--small-hosts 7] [--small 40] [--rps 20] [--rounds 1]

The list has ``--big`` URLs on one host (127.0.0.2) and ``--small`` on each of ``--small-hosts`` others
(127.0.0.3, ...), grouped by host as a list sorted by URL is. Every 127.0.0.X is a host of its own; one
server in a process of its own answers them all and logs the address and time of each request.

Printed side by side, measured in the same run: img2dataset called directly on the list (the
baseline: as fast as its threads allow), lenscap with its plan alone, and lenscap with ``--per-host-rps
R``. For each: the wall time, the worst one-second count of requests at the big host, and how long
the big host was being asked. The floor is ``big / R`` seconds: no polite job can be shorter, and the
target is lenscap --per-host-rps within 1.5x of it (plus img2dataset's start-up, ~8 s here) with no
one-second window above R + 15%. An installed lenscap without --per-host-rps says so in one line and
the rest runs.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
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

BIG_HOST = "127.0.0.2"
SETTINGS = dict(samples_per_shard=100, processes=2, threads=32)


def _serve(args: argparse.Namespace, url_list: Path, conn) -> None:
    """The server, in a process of its own; ``conn`` asks for the requests since the last ask, or stops it."""
    hosts = [BIG_HOST] * args.big + [f"127.0.0.{3 + h}" for h in range(args.small_hosts) for _ in range(args.small)]
    routes = {f"/h{h.rsplit('.', 1)[1]}/{i}.jpg": Route(jpeg_bytes(scene(i, (64, 48)))) for i, h in enumerate(hosts)}
    with ImageServer(routes, hosts=True) as server:
        url_list.write_text("url\n" + "".join(server.url(p, host=h) + "\n" for p, h in zip(routes, hosts)))
        conn.send("ready")
        seen = 0
        while conn.recv() == "requests":
            requests = server.requests
            conn.send([(r.host, r.at) for r in requests[seen:]])
            seen = len(requests)


def supports_per_host_rps() -> bool:
    return any(f.name == "per_host_rps" for f in dataclasses.fields(DownloadOptions))


def run_lenscap(url_list: Path, out: Path, rps: float | None) -> float:
    cmd = [sys.executable, "-m", "lenscap.cli", "download", str(url_list), str(out), "--quiet", "--allow-private-network"]
    cmd += ["--samples-per-shard", str(SETTINGS["samples_per_shard"]), "--processes", str(SETTINGS["processes"])]
    cmd += ["--threads", str(SETTINGS["threads"])] + ([] if rps is None else ["--per-host-rps", str(rps)])
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def run_img2dataset(url_list: Path, out: Path) -> float:
    options = DownloadOptions(**SETTINGS)
    kwargs = options.img2dataset_kwargs(str(url_list), str(out), options.workers, ray=False)
    kwargs.update(input_format="csv", caption_col=None, save_additional_columns=None)
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


def worst_second(times: list[float]) -> int:
    """The most requests in any one-second window (windows start at a request)."""
    times = sorted(times)
    return max((bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times)), default=0)


@dataclasses.dataclass
class Run:
    seconds: float
    worst: int  # requests at the big host in its worst second
    big_span: float  # first to last request at the big host
    big_requests: int


def measure(name: str, fn, conn, work: Path, r: int) -> Run:
    out = work / f"{name.split()[0]}-{r}"
    conn.send("requests")
    conn.recv()  # the requests of earlier runs
    seconds = fn(out)
    conn.send("requests")
    big = [at for host, at in conn.recv() if host == BIG_HOST]
    shutil.rmtree(out, ignore_errors=True)
    run = Run(seconds, worst_second(big), (max(big) - min(big)) if big else 0.0, len(big))
    print(
        f"round {r}: {name:26s} {seconds:6.2f} s  big host: {run.big_requests} requests over {run.big_span:5.2f} s, "
        f"worst second {run.worst:4d}",
        flush=True,
    )
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", type=int, default=400)
    ap.add_argument("--small-hosts", type=int, default=7)
    ap.add_argument("--small", type=int, default=40)
    ap.add_argument("--rps", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    polite = supports_per_host_rps()
    if not polite:
        print("skipped lenscap --per-host-rps: the installed lenscap has no such option (lenscap's plan and img2dataset run)")
    work = Path(tempfile.mkdtemp(prefix="lenscap-polite-"))
    url_list = work / "urls.csv"
    ctx = multiprocessing.get_context("spawn")
    conn, server_end = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(args, url_list, server_end), daemon=True)
    server.start()
    runs: dict[str, list[Run]] = {}
    try:
        conn.recv()
        contenders = {
            "img2dataset": lambda out: run_img2dataset(url_list, out),
            "lenscap (plan only)": lambda out: run_lenscap(url_list, out, None),
        }
        if polite:
            contenders[f"lenscap --per-host-rps {args.rps:g}"] = lambda out: run_lenscap(url_list, out, args.rps)
        for r in range(args.rounds):
            for name, fn in contenders.items() if r % 2 == 0 else reversed(contenders.items()):
                runs.setdefault(name, []).append(measure(name, fn, conn, work, r))
        _summary(args, runs)
    finally:
        conn.send("stop")
        server.join(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


def _summary(args: argparse.Namespace, runs: dict[str, list[Run]]) -> None:
    floor = args.big / args.rps
    print(
        f"list: {args.big} URLs on {BIG_HOST}, {args.small} on each of {args.small_hosts} others; floor {args.big}/{args.rps:g} = {floor:.1f} s"
    )
    base = statistics.median(r.worst for r in runs["img2dataset"])
    for name, rs in runs.items():
        seconds, worst = statistics.median(r.seconds for r in rs), statistics.median(r.worst for r in rs)
        print(
            f"{name:26s} median {seconds:6.2f} s = {seconds / floor:4.2f}x the floor; worst second at the big host "
            f"{worst:5.0f} requests = {worst / base:4.2f}x img2dataset's"
        )


if __name__ == "__main__":
    main()
