"""Client-side rate limiting: a requests bucket and a tokens bucket per endpoint (and an output-tokens
bucket where the provider limits output tokens apart, as Anthropic does; not shared on Ray).

Why these numbers. Servers may enforce a per-minute limit over shorter windows (OpenAI: "60,000 RPM
may be enforced as 1,000 requests per second"), so a client that bursts a minute's worth gets 429s
even under the limit. Each bucket therefore refills continuously at 99% of the limit and holds
at most half a second's worth: a server that allows a second's burst always has slack left for
timing jitter. A request is admitted once the bucket holds its cost, or is full for a cost larger
than the bucket (it then runs into debt), so no request is too big to ever pass.

Limits come from flags, or from the server's ``x-ratelimit-limit-*`` headers (the lower of the two
wins); ``x-ratelimit-remaining-*`` lowers the level when others share the account, and a 429 pauses
every request to the endpoint until the server's ``retry-after`` has passed. Without flags, one
probe request goes first and the rest wait for its headers, so a fresh run never bursts
``--concurrency`` requests into an unknown limit.

On a Ray cluster the limiter is shared (``use_account``): the buckets live in one actor for the whole
account (``lenscap.caption.cluster_limits``), and this process only asks it for turns.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["TokenBucket", "EndpointLimiter", "parse_duration"]

BURST_S = 0.5
MARGIN = 0.99
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str | None) -> float | None:
    """OpenAI's reset headers: "1s", "6m0s", "20ms", "1h2m3.5s", or a bare number of seconds."""
    if not text:
        return None
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    total, matched = 0.0, False
    for value, unit in _DURATION_RE.findall(text):
        matched = True
        total += float(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total if matched else None


def _header_float(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number >= 0 else None  # Azure sends -1 for "not reported"


class TokenBucket:
    """``per_minute`` units, refilled continuously; ``None`` means unlimited."""

    def __init__(self, per_minute: float | None, share: float = 1.0) -> None:
        self.share = share
        self.per_minute: float | None = None
        self.level = 0.0
        self.updated = time.monotonic()
        self.set_limit(per_minute)
        self.level = self.capacity

    def set_limit(self, per_minute: float | None) -> None:
        self._refill(time.monotonic())
        self.per_minute = per_minute
        self.level = min(self.level, self.capacity)

    @property
    def rate(self) -> float:
        """Units per second this client may use."""
        return 0.0 if self.per_minute is None else self.per_minute * self.share * MARGIN / 60.0

    @property
    def capacity(self) -> float:
        return 0.0 if self.per_minute is None else max(1.0, self.rate * BURST_S)

    def _refill(self, now: float) -> None:
        if self.per_minute is not None:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_time(self, cost: float, now: float) -> float:
        if self.per_minute is None:
            return 0.0
        self._refill(now)
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, cost: float, now: float) -> None:
        if self.per_minute is not None:
            self._refill(now)
            self.level -= cost

    def lower_to(self, level: float) -> None:
        self._refill(time.monotonic())
        self.level = min(self.level, level)


class EndpointLimiter:
    """The limits of one endpoint (one deployment, one API key); shared by its concurrent requests.

    ``share`` is this process's part of the account when several processes use it.

    Shared mode (``use_account``): every request takes its turn from the cluster's account actor instead
    of these buckets; this process still learns limits here (to pick among endpoints) and passes
    on what the server says, so all workers obey one account.
    """

    def __init__(
        self, rpm: float | None = None, tpm: float | None = None, share: float = 1.0, output_tpm: float | None = None
    ) -> None:
        self.requests = TokenBucket(rpm, share)
        self.tokens = TokenBucket(tpm, share)
        # Output tokens, where the provider limits them apart from input tokens (Anthropic): ``tokens`` then
        # counts input tokens alone. Learned from ``x-ratelimit-*-output-tokens`` (a provider's own
        # headers translated to these names by its backend).
        self.output = TokenBucket(output_tpm, share)
        self.flag_rpm, self.flag_tpm, self.flag_output = rpm, tpm, output_tpm
        self.paused_until = 0.0
        self.waiting = 0
        self.known = rpm is not None or tpm is not None  # limits known: no probe needed
        self._probing = False
        self._lock: asyncio.Lock | None = None
        self._known_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.account: Any = None  # shared mode: the cluster's AccountLimits actor
        self.key = ""
        self._seen: tuple[dict[str, str], float, float] | None = None  # headers, age, when: for the actor

    def use_account(self, account: Any, key: str) -> None:
        """Take turns from ``account`` (a Ray actor handle) for endpoint ``key``; None: local again."""
        self.account, self.key = account, key

    def __getstate__(self) -> dict[str, Any]:
        # Travels to Ray workers inside the backend: nothing bound to this process's event loop.
        return {**self.__dict__, "_lock": None, "_known_event": None, "_loop": None, "_probing": False, "_seen": None}

    def _get_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._loop is not loop:  # a new event loop per shard
            self._lock, self._loop = asyncio.Lock(), loop
            self._known_event = asyncio.Event()
            self._probing = False
            if self.known:
                self._known_event.set()
        return self._lock

    def learned(self) -> None:
        """A response (any) arrived: whatever limits it carried are known now."""
        self.known = True
        if self._known_event is not None:
            self._known_event.set()

    def buckets(self) -> tuple[TokenBucket, TokenBucket, TokenBucket]:
        return self.requests, self.tokens, self.output

    def _wait(self, tokens: float, output: float, now: float) -> float:
        return max(
            self.paused_until - now,
            self.requests.wait_time(1, now),
            self.tokens.wait_time(tokens, now),
            self.output.wait_time(output, now),
        )

    def _take(self, tokens: float, output: float, now: float) -> None:
        self.requests.take(1, now)
        self.tokens.take(tokens, now)
        self.output.take(output, now)

    def expected_wait(self, tokens: float, output: float = 0.0) -> float:
        now = time.monotonic()
        wait = self._wait(tokens, output, now)
        return wait + self.waiting / max(self.requests.rate, 1e-9) if self.requests.per_minute else wait

    async def acquire(self, tokens: float, output: float = 0.0) -> None:
        """Wait until one request of ``tokens`` (and ``output`` output tokens, where they are limited
        apart) may be sent; first come, first served."""
        self.waiting += 1
        try:
            lock = self._get_lock()
            assert self._known_event is not None
            if not self.known:
                if not self._probing:
                    self._probing = True  # this request is the probe
                else:
                    await self._known_event.wait()
            if self.account is not None:
                await self._take_turn(tokens)
                return
            async with lock:
                while True:
                    now = time.monotonic()
                    wait = self._wait(tokens, output, now)
                    if wait <= 0:
                        self._take(tokens, output, now)
                        return
                    await asyncio.sleep(wait)
        finally:
            self.waiting -= 1

    async def _take_turn(self, tokens: float) -> None:
        """Shared mode: one actor call per request, then wait here for the turn it gave."""
        while True:
            seen, self._seen = self._seen, None
            forward = None if seen is None else (seen[0], seen[1] + time.monotonic() - seen[2])
            wait, paused_s = await self.account.reserve.remote(self.key, tokens, forward)
            self.paused_until = max(self.paused_until, time.monotonic() + paused_s)
            if wait > 0:
                await asyncio.sleep(wait)
            if time.monotonic() >= self.paused_until:
                return
            # A pause began while this request waited (its own worker's 429, or news of another's):
            # the turn it holds was given before the pause, so it queues again behind the pause.

    def reserve(self, tokens: float) -> float:
        """Admission by reservation (the account actor's): take one request of ``tokens`` now, the
        levels going negative, and return the seconds until it may be sent. Callers are served in
        the order they asked, with one call each, and wait on their own side."""
        now = time.monotonic()
        wait = max(0.0, self.paused_until - now, self.requests.wait_time(1, now), self.tokens.wait_time(tokens, now))
        self.requests.take(1, now)
        self.tokens.take(tokens, now)
        return wait

    def pause(self, seconds: float) -> None:
        """Stop every request to this endpoint for ``seconds``; afterwards restart smoothly, not in a burst."""
        until = time.monotonic() + seconds
        if until > self.paused_until:
            self.paused_until = until
            if self.account is not None:
                self.account.pause.remote(self.key, seconds)  # every worker's next turn comes after it
                return
            for bucket in self.buckets():
                bucket.lower_to(0.0)

    def observe(self, headers: Mapping[str, str], age_s: float = 0.0) -> None:
        """Learn from a response's rate-limit headers. ``age_s``: seconds since the request was sent;
        the server counted ``remaining`` then, and has refilled since."""
        self.learned()
        if self.account is not None:
            limits = {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-ratelimit-")}
            if limits:  # the newest goes to the actor with this process's next reservation: no extra call
                self._seen = (limits, age_s, time.monotonic())
        for bucket, flag, kind in (
            (self.requests, self.flag_rpm, "requests"),
            (self.tokens, self.flag_tpm, "tokens"),
            (self.output, self.flag_output, "output-tokens"),
        ):
            limit = _header_float(headers, f"x-ratelimit-limit-{kind}")
            if limit and (flag is None or limit < flag) and limit != bucket.per_minute:
                bucket.set_limit(limit)
            remaining = _header_float(headers, f"x-ratelimit-remaining-{kind}")
            if remaining is None:
                continue
            if bucket.per_minute is not None:
                # An emptied bucket refills at the known rate: no pause needed. ("reset" is the time
                # until the server's window is full again, far longer than until the next request.)
                bucket.lower_to(remaining * bucket.share + age_s * bucket.rate)
            elif remaining < 1:
                reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}"))
                if reset:
                    self.pause(reset)

    def on_rate_limited(self, headers: Mapping[str, str], fallback_s: float, age_s: float = 0.0) -> float:
        """A 429: pause the endpoint for the server's retry-after (or ``fallback_s``); returns the pause."""
        self.observe(headers, age_s)
        delay = None
        ms = _header_float(headers, "retry-after-ms")
        if ms is not None:
            delay = ms / 1000.0
        if delay is None:
            delay = parse_duration(headers.get("retry-after"))
        if delay is None:
            resets = [parse_duration(headers.get(f"x-ratelimit-reset-{k}")) for k in ("requests", "tokens", "output-tokens")]
            delay = max((r for r in resets if r), default=None)
        delay = fallback_s if delay is None else min(delay, 600.0)
        self.pause(delay)
        return delay
