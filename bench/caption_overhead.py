"""How many requests/s the caption client sustains on this machine: zero-latency server, 512-px images.

    .venv/bin/python bench/caption_overhead.py [--images 3000] [--concurrency 64]

Baseline, in the same run: the official ``openai`` AsyncOpenAI client alone, sending the same
images already encoded as data URLs (no image preparation, journal, cache lookup or shard writing).
The ratio says what lenscap's per-sample work costs. Target: lenscap >= 150 requests/s on 2 cores
(a 10,000 RPM account is 167/s), the server sharing the machine. Throughput is measured by the
server, first to last success.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lenscap.caption.image_prep import prepare_image
from lenscap.caption.prompts import PRESETS
from lenscap.core.dataset import Dataset
from lenscap.demo.datasets import write_image_dataset
from lenscap.testing.fake_openai import FakeOpenAIProcess


def rate(stats: dict) -> float:
    ok = stats["responses"].get("200", 0)
    return (ok - 1) / stats["success_span_s"] if ok > 1 else 0.0


def run_lenscap(src: Path, out: Path, base_url: str, concurrency: int, processes: int) -> None:
    env = {**os.environ, "OPENAI_API_KEY": "sk-bench"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lenscap.cli",
            "caption",
            str(src),
            str(out),
            "--base-url",
            base_url,
            "--no-cache",
            "--concurrency",
            str(concurrency),
            "--processes",
            str(processes),
            "--quiet",
        ],
        env=env,
        check=True,
    )


async def run_baseline(urls: list[str], base_url: str, concurrency: int) -> None:
    import openai

    prompt = PRESETS["lens"]
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
    it = iter(urls)

    async def worker() -> None:
        for url in it:
            messages = [
                {"role": "system", "content": prompt.system},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": prompt.template},
                        {"type": "image_url", "image_url": {"url": url, "detail": "low"}},
                    ],
                },
            ]
            await client.chat.completions.create(model="gpt-4.1-mini", messages=messages, max_tokens=300)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=64)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAIProcess("--no-decode") as server:
        src = write_image_dataset(Path(tmp) / "in", a.images, per_shard=500, size=(512, 384)).path
        ds = Dataset(src)
        urls = [prepare_image(s.image, 512).data_url() for i in ds.completed_ids() for s in ds.iter_samples(i) if s.image]
        print(f"{a.images} images of 512x384, zero-latency server, concurrency {a.concurrency}, {os.cpu_count()} CPUs")
        results = {}
        for label, action in [
            ("baseline (openai client alone)", lambda: asyncio.run(run_baseline(urls, server.base_url, a.concurrency))),
            ("lenscap --processes 1", lambda: run_lenscap(src, Path(tmp) / "o1", server.base_url, a.concurrency, 1)),
            ("lenscap --processes 2", lambda: run_lenscap(src, Path(tmp) / "o2", server.base_url, a.concurrency, 2)),
        ]:
            server.reset()
            action()
            results[label] = rate(server.stats())
            print(f"{label:>32}: {results[label]:.0f} requests/s")
    base = results["baseline (openai client alone)"]
    best = max(results["lenscap --processes 1"], results["lenscap --processes 2"])
    print(
        f"ratio lenscap / baseline: {results['lenscap --processes 1'] / base:.2f} (1 process), "
        f"{results['lenscap --processes 2'] / base:.2f} (2 processes)"
    )
    print(f"best lenscap: {best:.0f} requests/s = {best * 60:.0f} RPM (target >= 150/s)")


if __name__ == "__main__":
    main()
