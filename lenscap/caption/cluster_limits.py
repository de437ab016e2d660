"""The account's rate limits for every worker of a Ray run: one actor holds the buckets.

Why one actor rather than a split. Giving each of N workers 1/N of the limits wastes the part of
any worker that idles (its shards ran out first, it is loading a model, it waits for a retry), and
it cannot stop the others when one of them gets a 429. The actor holds one pair of buckets per
endpoint for the whole account; the limits from the flags and from any worker's
``x-ratelimit-*`` headers, and every 429's pause, apply to all workers at once.

Why reservations. A worker makes one call per request; the actor takes the cost at once, letting
the level go negative, and answers how long to wait before sending. So turns are first come, first
served across the cluster, without polling, and the waiting happens in the workers: the actor does
a few microseconds of arithmetic per request (bench/cluster_ratelimit.py measures its throughput).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from lenscap.caption.ratelimit import EndpointLimiter

__all__ = ["AccountLimits", "start_account_limits"]


class AccountLimits:
    """The actor's state: an ``EndpointLimiter`` per endpoint, admitting by reservation.

    A sync actor runs one call at a time, in the order each caller sent them, so a worker's pause
    or learned limit is in force before its next reservation.
    """

    def __init__(self, limits: dict[str, tuple[float | None, float | None]]) -> None:
        self.endpoints = {key: EndpointLimiter(rpm, tpm) for key, (rpm, tpm) in limits.items()}
        self.reservations = 0

    def reserve(self, key: str, tokens: float, seen: tuple[dict[str, str], float] | None = None) -> tuple[float, float]:
        """One request of ``tokens`` to endpoint ``key``: (seconds to wait before sending it, seconds of
        pause left). ``seen``: the caller's latest rate-limit headers and their age."""
        limiter = self.endpoints[key]
        if seen is not None:
            limiter.observe(*seen)
        self.reservations += 1
        wait = limiter.reserve(tokens)
        return wait, max(0.0, limiter.paused_until - time.monotonic())

    def pause(self, key: str, seconds: float) -> None:
        limiter = self.endpoints[key]
        limiter.pause(seconds)
        # The buckets stay empty until the pause ends, so the turns taken during it follow one
        # another at the limit's rate after it, instead of all falling due at its end.
        for bucket in (limiter.requests, limiter.tokens):
            bucket.lower_to(-seconds * bucket.rate)

    def stats(self) -> dict[str, Any]:
        return {"reservations": self.reservations}


def start_account_limits(ray: Any, limits: dict[str, tuple[float | None, float | None]]) -> Any:
    """A new account actor for one run (its handle). It lives as long as the run holds handles to it,
    or its driver lives; Ray restarts it on another node if its node dies (the buckets start full
    again and relearn from the next headers)."""
    actor = ray.remote(AccountLimits).options(
        name=f"lenscap-limits-{uuid.uuid4().hex[:12]}", num_cpus=0, max_restarts=-1, max_task_retries=-1
    )
    return actor.remote(limits)
