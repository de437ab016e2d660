"""--executor ray: every worker of the cluster shares the account's rate limits (one limiter actor)."""

from __future__ import annotations

import asyncio
import json
import pickle
import re
import time

import pytest

from lenscap.caption.backends.openai_chat import OpenAIChatBackend
from lenscap.caption.cluster_limits import AccountLimits
from lenscap.caption.prompts import load_prompt
from lenscap.caption.ratelimit import BURST_S
from lenscap.caption.stage import CaptionStage
from lenscap.core.dataset import Dataset
from lenscap.core.executors import RayExecutor
from lenscap.core.job import run_stage
from lenscap.core.progress import make_progress
from lenscap.demo.datasets import write_image_dataset
from lenscap.testing.fake_openai import FakeOpenAI

RPM = 600  # 10 requests/s: slower than the workers could go, a few seconds per run


class RecordingFake(FakeOpenAI):
    """The fake server, noting when each chat request arrives and from which shard (its alt-text
    says, through the alt-aware prompt); it can answer one shard's requests with a 429 storm."""

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self.arrivals: list[tuple[float, int]] = []
        self.storm_shard: int | None = None
        self.storm_s = 0.0
        self.storm_at: float | None = None
        self.storm_429s = 0

    async def _chat(self, body: bytes):
        now = time.monotonic()
        m = re.search(rb"shard(\d+)-", body)
        shard = int(m.group(1)) if m else -1
        self.arrivals.append((now, shard))
        if shard == self.storm_shard:
            # The storm starts once both shards are under way, so the other worker is sending.
            if self.storm_at is None and len({s for _, s in self.arrivals}) > 1 and len(self.arrivals) >= 8:
                self.storm_at = now
            left = self.storm_at + self.storm_s - now if self.storm_at is not None else 0.0
            if left > 0:
                self.storm_429s += 1
                with self._lock:
                    self.requests += 1
                headers = {"retry-after-ms": str(int(left * 1000)), "retry-after": str(max(1, round(left)))}
                payload = json.dumps(
                    {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}
                )
                return self._count((429, headers, payload.encode()))
        return await super()._chat(body)


def caption_on_ray(tmp_path, fake: RecordingFake, images: int, per_shard: int, **options) -> list[dict]:
    src = write_image_dataset(
        tmp_path / "in", images, per_shard=per_shard, size=(96, 64), caption=lambda i: f"shard{i // per_shard}-item{i}"
    ).path
    backend = OpenAIChatBackend.from_options({"base_url": [fake.base_url], **options})
    stage = CaptionStage(backend, load_prompt("alt-aware"), cache_dir=None)
    result = run_stage(stage, src, tmp_path / "out", progress=make_progress("caption", quiet=True), executor=RayExecutor())
    assert result.exit_code == 0, result.failed_shards
    out = Dataset(tmp_path / "out")
    return [r for i in out.completed_ids() for r in out.read_table(i).to_pylist()]


def most_in_any_window(times: list[float], window: float) -> int:
    times, most, first = sorted(times), 0, 0
    for last, t in enumerate(times):
        while t - times[first] >= window:
            first += 1
        most = max(most, last - first + 1)
    return most


@pytest.mark.parametrize("limit_from", ["flag", "headers"])
def test_workers_together_stay_within_the_account_limit(tmp_path, ray_cluster, limit_from):
    fake = RecordingFake(rpm=RPM)  # enforces it too: a worker over its part would get 429s
    with fake:
        rows = caption_on_ray(tmp_path, fake, 40, 10, concurrency=4, **({"rpm": RPM} if limit_from == "flag" else {}))
    assert [r["caption_status"] for r in rows] == ["ok"] * 40
    assert "429" not in fake.stats()["responses"], fake.stats()["responses"]
    spans = {}
    for t, shard in fake.arrivals:
        first, last = spans.get(shard, (t, t))
        spans[shard] = (min(first, t), max(last, t))
    assert any(a[0] < b[1] and b[0] < a[1] for a in spans.values() for b in spans.values() if a is not b), (
        "two workers must have been sending at the same time"
    )
    # The buckets admit their half second's burst, then the limit's rate; 0.3 s and two requests more
    # for timing jitter on a busy machine (and for the probe per worker that goes first when the limit
    # is learned from the headers). Two workers each at the full limit would send twice this.
    times = [t for t, _ in fake.arrivals]
    for window in (1.0, 2.0):
        assert most_in_any_window(times, window) <= RPM / 60 * (BURST_S + window + 0.3) + 2, window


def test_a_429_storm_seen_by_one_worker_pauses_the_others(tmp_path, ray_cluster):
    fake = RecordingFake()
    fake.storm_shard, fake.storm_s = 0, 2.0  # shard 0's worker alone gets 429s, for 2 s
    with fake:
        rows = caption_on_ray(tmp_path, fake, 60, 30, concurrency=2, rpm=2 * RPM)
    assert [r["caption_status"] for r in rows] == ["ok"] * 60
    assert fake.storm_at is not None and fake.storm_429s >= 1
    assert fake.stats()["responses"].get("429", 0) == fake.storm_429s, "only the storm's 429s"
    during = [t for t, shard in fake.arrivals if shard == 1 and fake.storm_at <= t < fake.storm_at + fake.storm_s]
    # Unpaused, shard 1's worker would send about 2 * RPM/60 * 2 s = 40 requests in the storm; paused,
    # only the turns it held before it heard of the pause (at most its concurrency, and some slack).
    assert len(during) <= 8, len(during)


def test_reservations_are_first_come_first_served_and_queue_behind_a_pause():
    account = AccountLimits({"u": (600, None)})  # 9.9 requests/s; the bucket holds 4.95
    waits = [account.reserve("u", 100)[0] for _ in range(8)]
    step = 60 / (600 * 0.99)
    assert waits[:4] == [0.0] * 4
    assert all(b - a == pytest.approx(step, abs=0.005) for a, b in zip(waits[4:], waits[5:]))
    account.pause("u", 3.0)
    (w1, paused), (w2, _) = account.reserve("u", 100), account.reserve("u", 100)
    assert paused == pytest.approx(3.0, abs=0.05) and w1 >= 3.0
    assert w2 - w1 == pytest.approx(step, abs=0.005), "after a pause, one by one at the rate: no burst"
    assert account.stats()["reservations"] == 10


def test_the_backend_pickles_without_its_clients_or_event_loop():
    import openai

    backend = OpenAIChatBackend.from_options({"base_url": ["http://127.0.0.1:9/v1"], "rpm": 60})
    ep = backend.endpoints[0]
    asyncio.run(ep.limiter.acquire(10))  # binds a lock and an event to that loop
    ep.client = openai.AsyncOpenAI(base_url=ep.url, api_key="no-key")
    copy = pickle.loads(pickle.dumps(backend))
    assert copy.endpoints[0].client is None and copy.endpoints[0].limiter._loop is None
    assert copy.endpoints[0].limiter.requests.per_minute == 60
