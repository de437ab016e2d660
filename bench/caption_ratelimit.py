"""lenscap caption against a rate-limited server vs a naive client, in one run.

    .venv/bin/python bench/caption_ratelimit.py [--rpm 600] [--latency 0.3] [--images 400]

The fake OpenAI-compatible server (its own process) enforces --rpm over 1-second windows, as OpenAI
may, with --latency seconds per reply. Both clients send the same images with the same concurrency:
  * lenscap: ``lenscap caption`` with no limit flags (it learns the limit from the headers);
  * naive baseline: the official ``openai`` AsyncOpenAI client, SDK retries on (they honour
    retry-after), a semaphore of the same concurrency, nothing else.
Prints, for each, the achieved RPM / limit (target >= 0.97) and the share of requests answered 429
(target <= 1%). Throughput is measured by the server, first to last success, so start-up costs of
either client do not count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lenscap.caption.image_prep import prepare_image
from lenscap.caption.prompts import PRESETS
from lenscap.core.dataset import Dataset
from lenscap.demo.datasets import write_image_dataset
from lenscap.testing.fake_openai import FakeOpenAIProcess


def summarize(name: str, stats: dict, rpm: float) -> tuple[float, float]:
    ok = stats["responses"].get("200", 0)
    total = sum(stats["responses"].values())
    achieved = (ok - 1) / stats["success_span_s"] * 60 if ok > 1 and stats["success_span_s"] else 0.0
    share_429 = stats["responses"].get("429", 0) / max(total, 1)
    print(
        f"{name:>8}: {ok} captions ({stats['lost']} lost), {total} requests, achieved {achieved:.0f} RPM = {achieved / rpm:.3f} of the limit, "
        f"429s {share_429:.1%} of requests"
    )
    return achieved / rpm, share_429


def run_lenscap(src: Path, out: Path, base_url: str, concurrency: int) -> None:
    env = {**os.environ, "OPENAI_API_KEY": "sk-bench", "LENSCAP_CACHE_DIR": str(out) + "-cache"}
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
            "--quiet",
        ],
        env=env,
        check=True,
    )


async def run_naive(src: Path, base_url: str, concurrency: int) -> None:
    import openai

    ds = Dataset(src)
    prompt = PRESETS["lens"]
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench")  # SDK defaults: 2 retries
    sem = asyncio.Semaphore(concurrency)

    async def one(image: bytes) -> None:
        async with sem:
            url = prepare_image(image, 512).data_url()
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
            try:
                await client.chat.completions.create(model="gpt-4.1-mini", messages=messages, max_tokens=300)
            except openai.APIError:
                pass  # counted by the server

    images = [s.image for i in ds.completed_ids() for s in ds.iter_samples(i) if s.image]
    await asyncio.gather(*(one(im) for im in images))
    await client.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rpm", type=float, default=600)
    ap.add_argument("--latency", type=float, default=0.3)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=32)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAIProcess("--rpm", str(a.rpm), "--latency", str(a.latency)) as server:
        src = write_image_dataset(Path(tmp) / "in", a.images, per_shard=max(1, a.images // 4), size=(512, 384)).path
        print(f"{a.images} images, limit {a.rpm:.0f} RPM, {a.latency}s latency, concurrency {a.concurrency}")
        t = time.monotonic()
        run_lenscap(src, Path(tmp) / "out", server.base_url, a.concurrency)
        print(f"lenscap took {time.monotonic() - t:.1f}s")
        ours = summarize("lenscap", {**server.stats(), "lost": a.images - server.stats()["responses"].get("200", 0)}, a.rpm)
        time.sleep(1.5)  # let the server's window refill
        server.reset(rpm=a.rpm)
        t = time.monotonic()
        asyncio.run(run_naive(src, server.base_url, a.concurrency))
        print(f"naive took {time.monotonic() - t:.1f}s")
        naive = summarize("naive", {**server.stats(), "lost": a.images - server.stats()["responses"].get("200", 0)}, a.rpm)
    print(f"ratio achieved/limit: lenscap {ours[0]:.3f} (target >= 0.97), naive {naive[0]:.3f}")
    print(f"429 share: lenscap {ours[1]:.2%} (target <= 1%), naive {naive[1]:.2%}")


if __name__ == "__main__":
    main()
