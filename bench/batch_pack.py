"""lenscap caption with a batch backend: packing on N processes against one process, in one run.

    .venv/bin/python bench/batch_pack.py [--images 10000] [--processes 2] [--rounds 1] [--side 640]

Packing is what a batch job costs on the client: every request line is built (the image decoded,
resized to --max-side 512, encoded, base64) and cut into batch files. Each measurement is the whole
command, ``lenscap caption IN OUT --backend batch-files --no-cache``, in a fresh process, start-up and
worker spawning included: it packs every request into files for ``vllm run-batch`` and exits. The
baseline is the same command with ``--processes 1``; ratio = baseline time / time with N processes
(the issue's target: >= 1.7 with 2). The runs alternate, each into a fresh output directory, and the
batch files of every run are compared byte for byte (they must not depend on the process count).

Images: ``--distinct`` photo-like scenes (demo.images.photo) at --side x 3/4 --side, cycled over
--images samples in shards of --per-shard; the packer does the same work whether or not they repeat
(the response cache is off).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lenscap.demo.datasets import write_image_dataset
from lenscap.demo.pictures import jpeg_bytes, photo


def pack(src: Path, out: Path, processes: int, env: dict[str, str]) -> float:
    cmd = [
        sys.executable,
        "-m",
        "lenscap.cli",
        "caption",
        str(src),
        str(out),
        "--backend",
        "batch-files",
        "--model",
        "gpt-4.1",
        "--no-cache",
        "--quiet",
        "--json",
        "--processes",
        str(processes),
    ]
    start = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"lenscap failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return elapsed


def digest(out: Path) -> tuple[int, int, str]:
    """(files, requests, sha256 over the files in name order) of a run's batch files."""
    files = sorted((out / ".lenscap" / "batch" / "files" / "input").glob("*.jsonl"))
    h = hashlib.sha256()
    requests = 0
    for path in files:
        data = path.read_bytes()
        requests += data.count(b"\n")
        h.update(path.name.encode() + b"\0" + data)
    return len(files), requests, h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--side", type=int, default=640)
    parser.add_argument("--distinct", type=int, default=200)
    parser.add_argument("--per-shard", type=int, default=500)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lenscap-bench-") as tmp:
        root = Path(tmp)
        pool = [jpeg_bytes(photo(i, (args.side, args.side * 3 // 4))) for i in range(args.distinct)]
        write_image_dataset(root / "in", args.images, per_shard=args.per_shard, image=lambda i: pool[i % len(pool)])
        env = {**os.environ, "LENSCAP_CACHE_DIR": str(root / "cache")}
        env.pop("OPENAI_API_KEY", None)
        times: dict[int, list[float]] = {1: [], args.processes: []}
        digests = set()
        run = 0
        for _ in range(args.rounds):
            for processes in (1, args.processes):
                out = root / f"out{run}"
                times[processes].append(pack(root / "in", out, processes, env))
                digests.add(digest(out))
                run += 1
        base, par = statistics.median(times[1]), statistics.median(times[args.processes])
        files, requests, _ = next(iter(digests))
        print(
            json.dumps(
                {
                    "images": args.images,
                    "requests": requests,
                    "batch_files": files,
                    "image_side": args.side,
                    "cpus": os.cpu_count(),
                    "seconds": {"1 process (baseline)": round(base, 2), f"{args.processes} processes": round(par, 2)},
                    "ms_per_request": {
                        "1 process": round(1000 * base / requests, 3),
                        f"{args.processes} processes": round(1000 * par / requests, 3),
                    },
                    "ratio": round(base / par, 2),
                    "identical_batch_files": len(digests) == 1,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
