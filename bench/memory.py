"""Memory does not grow with the dataset: peak RSS of each stage at a small and a large dataset.

    .venv/bin/python bench/memory.py [--small 1000] [--large 50000]

Each stage runs as its own ``lenscap`` command with ``--processes 1``, so the process measured is
the one doing the per-shard work; its peak RSS is read from ``wait4``, for that process alone.
Shards hold 1,000 samples at both sizes (memory may grow with the shard, never with the number of
shards). The baseline is the same stage on the small dataset, measured in the same run; the ratio
large / small should stay within 1.2. ``caption`` runs against lenscap's fake OpenAI-compatible
server in a process of its own; ``dedup``'s global pass is in the measured process too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lenscap.demo.datasets import write_image_dataset
from lenscap.demo.pictures import jpeg_bytes, photo
from lenscap.testing.fake_openai import FakeOpenAIProcess

PER_SHARD = 1000


def peak_rss_mb(argv: list[str]) -> tuple[float, float]:
    """Run ``lenscap ARGV``; the peak RSS in MB of that one process (``wait4``'s usage) and seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lenscap.cli", *argv, "--quiet"], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"lenscap {' '.join(argv)} exited with {proc.returncode}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAIProcess("--no-decode") as api:
        work = Path(tmp)
        results: dict[str, dict[int, tuple[float, float]]] = {}
        for n in (args.small, args.large):
            # distinct photos, so that dedup keeps them all and shard and report see the whole dataset
            src = write_image_dataset(
                work / f"in{n}",
                n,
                per_shard=PER_SHARD,
                image=lambda i: jpeg_bytes(photo(i, (96, 72))),
                caption=lambda i: f"alt text number {i} of a small photo",
            ).path
            stages = {
                "filter": ["filter", str(src), str(work / f"filter{n}"), "--min-side", "32", "--annotate", "blur,uniform"],
                "caption": [
                    "caption",
                    str(work / f"filter{n}"),
                    str(work / f"caption{n}"),
                    "--backend",
                    "openai",
                    "--base-url",
                    api.base_url,
                    "--model",
                    "gpt-4.1-mini",
                    "--no-cache",
                ],
                "dedup": ["dedup", str(work / f"caption{n}"), str(work / f"dedup{n}")],
                "shard": ["shard", str(work / f"dedup{n}"), str(work / f"shard{n}"), "--target-size", "5MB"],
                "report": ["report", str(work / f"dedup{n}"), "--out", str(work / f"report{n}.html")],
            }
            for name, argv in stages.items():
                results.setdefault(name, {})[n] = peak_rss_mb([*argv, "--processes", "1"] if name != "report" else argv)
                print(
                    f"{name:8s} {n:>7,} samples: peak RSS {results[name][n][0]:.0f} MB, {results[name][n][1]:.1f} s", flush=True
                )
        print()
        for name, by_size in results.items():
            small, large = by_size[args.small][0], by_size[args.large][0]
            print(
                f"{name:8s} peak RSS {args.small:,} -> {args.large:,} samples: {small:.0f} -> {large:.0f} MB, "
                f"ratio {large / small:.2f} (target <= 1.2)"
            )


if __name__ == "__main__":
    main()
