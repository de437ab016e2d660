"""The account's rate limit on a Ray cluster: one shared limiter actor vs an explicit split.

    .venv/bin/python bench/cluster_ratelimit.py [--workers 2] [--rpm 1200] [--big 160] [--small 40]

A local Ray cluster of --workers CPUs captions one big shard and --workers - 1 small ones, so all
but one worker run out of work early, against the fake OpenAI-compatible server (in this process),
which enforces --rpm over 1-second windows and records when each request arrives. Two runs:
  * shared: lenscap as it is (``--executor ray``): every worker takes its turns from one actor;
  * split: each worker limits itself to 1/N of --rpm, as ``--processes N`` does on one machine.
For each: captions, 429s, the rate achieved over the run (server-side, first to last success) as
a share of the limit, and the most requests in any 1-s and 5-s window as a share of the limit's
allowance for that window (the client's buckets allow at most (0.5 + W) * 0.99 / W: their half
second's initial burst, then 99% of the limit). Then the shared/split throughput ratio, and the
actor's own capacity: reservations/s with every worker hammering it, and one call's round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from extras import missing

from lenscap.caption.backends.openai_chat import OpenAIChatBackend
from lenscap.caption.cluster_limits import start_account_limits
from lenscap.caption.prompts import load_prompt
from lenscap.caption.ratelimit import BURST_S, MARGIN
from lenscap.caption.stage import CaptionStage
from lenscap.core.dataset import Dataset
from lenscap.core.executors import RayExecutor, start_local_ray
from lenscap.core.job import run_stage
from lenscap.core.progress import make_progress
from lenscap.core.record import SUCCESS, Sample
from lenscap.demo.datasets import DOWNLOAD_SCHEMA
from lenscap.demo.pictures import jpeg_bytes, scene
from lenscap.testing.fake_openai import FakeOpenAI


class RecordingFake(FakeOpenAI):
    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self.arrivals: list[float] = []

    async def _chat(self, body: bytes):
        self.arrivals.append(time.monotonic())
        return await super()._chat(body)


class SplitBackend(OpenAIChatBackend):
    """The explicit split: each worker gets 1/N of the limits and shares nothing."""

    split = 1

    def share_limits(self, executor) -> None:  # noqa: ANN001
        self.set_processes(self.split)


def write_shards(path: Path, sizes: list[int]) -> Path:
    ds = Dataset.create(path)
    i = 0
    for shard_id, size in enumerate(sizes):
        writer = ds.writer(shard_id, DOWNLOAD_SCHEMA)
        for _ in range(size):
            writer.write(
                Sample(
                    f"{i:09d}",
                    {
                        "url": f"http://example.invalid/{i}.jpg",
                        "caption": f"image {i}",
                        "status": SUCCESS,
                        "error_message": None,
                        "width": 96,
                        "height": 64,
                    },
                    jpeg_bytes(scene(i, (96, 64))),
                )
            )
            i += 1
        writer.commit({"stage": "download"})
    ds.write_manifest("download", {"generated": True}, None, expected_shards=len(sizes))
    return ds.path


def most_in_window(times: list[float], window: float) -> int:
    times, most, first = sorted(times), 0, 0
    for last, t in enumerate(times):
        while t - times[first] >= window:
            first += 1
        most = max(most, last - first + 1)
    return most


def run(
    name: str, backend_cls: type[OpenAIChatBackend], src: Path, out: Path, fake: RecordingFake, a: argparse.Namespace
) -> float:
    fake.reset_counters()
    fake.configure(rpm=a.rpm)  # a full bucket again
    fake.arrivals.clear()
    backend = backend_cls.from_options({"base_url": [fake.base_url], "rpm": a.rpm, "concurrency": a.concurrency})
    stage = CaptionStage(backend, load_prompt("short"), cache_dir=None)
    started = time.monotonic()
    result = run_stage(stage, src, out, progress=make_progress("caption", quiet=True), executor=RayExecutor())
    took = time.monotonic() - started
    stats = fake.stats()
    ok, n429 = stats["responses"].get("200", 0), stats["responses"].get("429", 0)
    per_s = a.rpm / 60
    achieved = (ok - 1) / stats["success_span_s"] * 60 if ok > 1 and stats["success_span_s"] else 0.0
    peaks = ", ".join(
        f"{w:g}-s {most_in_window(fake.arrivals, w) / (per_s * w):.2f} (bound {(BURST_S + w) * MARGIN / w:.2f})"
        for w in (1.0, 5.0)
    )
    print(
        f"{name:>6}: {ok} captions {result.counts.get('caption_status')}, {n429} 429s, {took:.1f}s; achieved {achieved:.0f} RPM = "
        f"{achieved / a.rpm:.2f} of the limit; peak window / limit: {peaks}"
    )
    return achieved


async def hammer(account, seconds: float, concurrency: int) -> int:  # noqa: ANN001
    stop = time.monotonic() + seconds
    count = 0

    async def loop() -> None:
        nonlocal count
        while time.monotonic() < stop:
            await account.reserve.remote("x", 1.0)
            count += 1

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return count


def hammer_task(account, seconds: float, concurrency: int) -> int:  # noqa: ANN001
    return asyncio.run(hammer(account, seconds, concurrency))


def actor_capacity(ray: Any, workers: int, seconds: float = 4.0, concurrency: int = 64) -> tuple[float, float]:
    """Reservations/s with ``workers`` callers of ``concurrency`` each, in steady state; one call's round trip (s)."""
    task = ray.remote(num_cpus=1)(hammer_task)
    account = start_account_limits(ray, {"x": (None, None)})  # unlimited: measures the actor, not a limit
    ray.get(account.stats.remote())
    t = time.monotonic()
    for _ in range(300):
        ray.get(account.reserve.remote("x", 1.0))
    round_trip = (time.monotonic() - t) / 300
    tasks = [task.remote(account, seconds + 2.0, concurrency) for _ in range(workers)]
    time.sleep(1.0)  # the tasks' workers are up and calling
    before, t0 = ray.get(account.stats.remote())["reservations"], time.monotonic()
    time.sleep(seconds)
    after, t1 = ray.get(account.stats.remote())["reservations"], time.monotonic()
    ray.get(tasks)
    return (after - before) / (t1 - t0), round_trip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rpm", type=float, default=1200)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--big", type=int, default=160, help="images in the one big shard")
    ap.add_argument("--small", type=int, default=40, help="images in each other shard")
    ap.add_argument("--concurrency", type=int, default=16)
    a = ap.parse_args()
    if missing("this benchmark (a local Ray cluster)", "ray", "ray"):
        return
    import ray  # optional (the ray extra)

    SplitBackend.split = a.workers
    sizes = [a.big] + [a.small] * (a.workers - 1)
    start_local_ray(num_cpus=a.workers, include_dashboard=False, log_to_driver=False, logging_level="WARNING")  # on loopback only
    ray.cloudpickle.register_pickle_by_value(__import__(__name__))  # SplitBackend travels by value
    with tempfile.TemporaryDirectory() as tmp, RecordingFake(rpm=a.rpm, latency_s=a.latency) as fake:
        src = write_shards(Path(tmp) / "in", sizes)
        print(
            f"{a.workers} Ray workers, shards of {sizes} images, limit {a.rpm:.0f} RPM, {a.latency}s latency, "
            f"concurrency {a.concurrency} per worker"
        )
        shared = run("shared", OpenAIChatBackend, src, Path(tmp) / "shared", fake, a)
        time.sleep(1.5)  # the server's window refills
        split = run("split", SplitBackend, src, Path(tmp) / "split", fake, a)
    print(f"throughput shared/split: {shared / split:.2f}")
    rate, round_trip = actor_capacity(ray, a.workers)
    print(
        f"limiter actor: {rate:.0f} reservations/s ({a.workers} workers x 64 concurrent callers), "
        f"one reservation's round trip {round_trip * 1000:.2f} ms"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
