"""Politeness per host, shared by every process of a download on one machine: a rate, a number of open
connections, and backoff when the host says it is busy or stops answering.

A host is ``lenscap.download.hosts.host_of``: a URL's registrable domain, else its address.

**The shared state** is one file, ``hosts.table`` in the run's directory: fixed-size records, one per
host, found by the host's hash (linear probing over a short window; a record of a host with nothing to
remember is taken over). A record is read and written under a POSIX record lock on its window of the
file (``lockf``), which the kernel releases when its process dies, even by SIGKILL: a killed worker
never leaves a host locked. Within a process, threads take turns on a lock of their own (POSIX locks
belong to a process, not a thread). The file is sparse: a host's state is a few dozen bytes, whatever
the number of hosts a list holds. Each run starts with a new directory (``reset``): a host given up is
tried again by the next run.

**The rate** is a reservation: a request takes the host's next turn, ``next = max(now, next) + 1/rps``,
and sleeps until its turn, so turns are first come, first served across processes without polling;
a turn also waits ``1/rps`` after the request that went last (one taken late, on a busy CPU, does not
go together with the next). The turn is taken once the connection is made, just before the request is
sent (``netguard.on_connected``), so that a connection's set-up does not move it.
A lower bound of a host's interval, such as its robots.txt's ``Crawl-delay``, comes from the function
given to ``set_min_interval`` (the URL in, seconds out), asked before each turn.

**Connections** are N one-byte locks per host in ``hosts.busy`` (locks beyond a file's end need no
bytes): a request holds one from before it connects until its response is closed.

**Backoff.** A 429 or 503 with ``Retry-After`` (seconds or an HTTP date) pauses the host for that long,
for every process: the host's next turn moves past the pause, and a request already waiting for a turn
inside it waits again. Other failures (a 5xx, a 429 without ``Retry-After``, a timeout, a refused or
reset connection, a name that does not resolve) pause it for ``BACKOFF_S * 2**(n-1)`` seconds after the
n-th failure in a row, at most ``MAX_BACKOFF_S``; failures of requests that were already in flight when
the pause began count as one. The ``GIVE_UP_AFTER``-th failure in a row (over a minute of pauses, with
the defaults), or a ``Retry-After`` over ``MAX_RETRY_AFTER_S``, gives the host up for this run: each of
its remaining URLs fails at once with ``host given up: ...``, which ``--retry-failed`` fetches again.
An answer (any status below 500, 429 apart) ends the run of failures.
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import functools
import hashlib
import os
import struct
import threading
import time
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lenscap.download import netguard
from lenscap.download.host_policy import GIVEN_UP, MAX_CONCURRENCY, STATE_FILES, HostPolicy
from lenscap.download.hosts import UNKNOWN_HOST, host_of
from lenscap.download.netguard import REFUSED

__all__ = [
    "HostLimiter",
    "HostGivenUp",
    "NotSent",
    "install",
    "set_min_interval",
    "installed",
    "hop",
    "Turn",
    "retry_after_seconds",
]

# key, next_turn, last_sent, paused_until, last_counted, first_failure, pause_s, failures, given_up: 64 bytes
_RECORD = struct.Struct("<Q6d2I")
_SLOTS = 1 << 20  # records in the table (64 MiB of sparse file at most)
_PROBE = 16  # records a host may be found in, from its hash
_KEYS = struct.Struct("<" + f"Q{_RECORD.size - 8}x" * _PROBE)  # the keys of a window's records
_GIVEN_UP_FAILING, _GIVEN_UP_WAIT = 1, 2


class HostGivenUp(OSError):
    """A request to a host given up for this run: its sample fails with this message, and
    ``--retry-failed`` asks it again."""


class NotSent(OSError):
    """A request lenscap would not send, or a response it would not read (robots.txt, an opt-out): the
    sample's outcome, no failure of the host's."""


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header in seconds from now (it is seconds, or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# What an error says about the host: it answered, it failed, it asked for a pause, or nothing (our refusal).
_ANSWERED, _FAILED, _NOTHING = "answered", "failed", "nothing"


def _verdict(error: BaseException | None) -> tuple[str, float | None]:
    if error is None:
        return _ANSWERED, None
    if isinstance(error, urllib.error.HTTPError):
        if error.code in (429, 503):
            wait = retry_after_seconds(error.headers.get("Retry-After") if error.headers else None)
            if wait is not None:
                return _FAILED, wait
        return (_FAILED if error.code == 429 or error.code >= 500 else _ANSWERED), None
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, (HostGivenUp, NotSent)) or REFUSED in str(error):
        return _NOTHING, None
    if isinstance(reason, str) and "timed out" in reason:
        return _FAILED, None
    return (_FAILED if isinstance(reason, OSError) else _NOTHING), None


@dataclass(slots=True)
class _Record:
    key: int
    next_turn: float = 0.0  # the turn the next request to reserve one gets
    last_sent: float = 0.0  # when the last request went
    paused_until: float = 0.0
    last_counted: float = 0.0  # when the last failure that counted paused the host
    first_failure: float = 0.0
    pause_s: float = 0.0  # the last pause (its Retry-After when given up for one)
    failures: int = 0
    given_up: int = 0

    def fields(self) -> tuple[Any, ...]:
        return (
            self.key,
            self.next_turn,
            self.last_sent,
            self.paused_until,
            self.last_counted,
            self.first_failure,
            self.pause_s,
            self.failures,
            self.given_up,
        )

    def idle(self, now: float) -> bool:
        return self.given_up == 0 and self.failures == 0 and self.next_turn < now and self.paused_until < now


def _unpack(window: bytes, index: int) -> _Record:
    return _Record(*_RECORD.unpack_from(window, index * _RECORD.size))


@functools.lru_cache(maxsize=65_536)
def _key(host: str) -> int:
    return int.from_bytes(hashlib.blake2b(host.encode(), digest_size=8).digest(), "little") or 1


class HostLimiter:
    """The shared table of one run on one machine (see the module's docstring)."""

    def __init__(self, policy: HostPolicy) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._pid = -1
        self._table = self._busy = -1
        self._held: set[int] = set()  # connection locks this process holds (POSIX locks are per process)

    # -- the files ------------------------------------------------------------------------------

    def _files(self) -> tuple[int, int]:
        if self._pid != os.getpid():  # first use, or a forked child: its own descriptors (never closed:
            # closing any descriptor of a file drops every POSIX lock the process holds on it)
            directory = Path(self.policy.directory)
            directory.mkdir(parents=True, exist_ok=True)
            self._table, self._busy = (os.open(directory / name, os.O_RDWR | os.O_CREAT, 0o644) for name in STATE_FILES)
            self._pid, self._held = os.getpid(), set()
        return self._table, self._busy

    @contextlib.contextmanager
    def _record(self, host: str):
        """``host``'s record, locked, read, and written back when the block ends."""
        key = _key(host)
        start = key % (_SLOTS - _PROBE)
        size = _RECORD.size
        with self._lock:
            fd, _ = self._files()
            fcntl.lockf(fd, fcntl.LOCK_EX, _PROBE * size, start * size)
            try:
                window = os.pread(fd, _PROBE * size, start * size).ljust(_PROBE * size, b"\0")
                keys = _KEYS.unpack(window)
                now = time.monotonic()
                if key in keys:
                    index = keys.index(key)
                    record = _Record(*_RECORD.unpack_from(window, index * size))
                else:  # a new host: an empty record, else one with nothing to remember
                    index = next((i for i, k in enumerate(keys) if k == 0 or _unpack(window, i).idle(now)), 0)
                    record = _unpack(window, index)
                    if record.key == 0 or record.idle(now):
                        record = _Record(key)
                    # else every record of the window is busy: the host shares the first (the politer error)
                before = record.fields()
                yield record
                if record.fields() != before:
                    os.pwrite(fd, _RECORD.pack(*record.fields()), (start + index) * size)
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN, _PROBE * size, start * size)

    # -- a request's turn -----------------------------------------------------------------------

    def wait_turn(self, host: str, url: str | None = None) -> float:
        """Sleep until ``host``'s next turn (outside any pause); returns when it was taken. Raises
        ``HostGivenUp`` for a host given up for this run."""
        return self.take_turn(host, url)[0]

    def take_turn(self, host: str, url: str | None = None) -> tuple[float, bool]:
        """``wait_turn``, and whether the host had no failure to its name then (an answer need not say so)."""
        rps, _ = self.policy.limits(host)
        floor = _min_interval(url) if _min_interval is not None and url else 0.0
        interval = max(1.0 / rps if rps > 0 else 0.0, floor or 0.0)
        mine: float | None = None
        while True:
            with self._record(host) as record:
                if record.given_up:
                    raise HostGivenUp(self._given_up_message(host, record))
                now = time.monotonic()
                if mine is None or record.paused_until > now:  # a turn; again if a pause began meanwhile
                    mine = max(now, record.next_turn, record.paused_until)
                    if interval or mine > now:
                        record.next_turn = max(record.next_turn, mine + interval)
                # Also an interval after the last request that went: a turn taken late (a busy CPU) does
                # not go together with the next one.
                go_at = max(mine, record.last_sent + interval)
                if go_at <= now:
                    if interval:
                        record.last_sent = now
                    return now, record.failures == 0
            time.sleep(go_at - now)

    def connection(self, host: str) -> int | None:
        """Wait for one of ``host``'s connections; returns it (for ``release``), or None without a limit."""
        _, limit = self.policy.limits(host)
        if limit <= 0:
            return None
        base = (_key(host) % _SLOTS) * MAX_CONCURRENCY
        pause = 0.002
        while True:
            with self._lock:
                _, fd = self._files()
                for offset in range(base, base + min(limit, MAX_CONCURRENCY)):
                    if offset in self._held:
                        continue
                    try:
                        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
                    except OSError:
                        continue
                    self._held.add(offset)
                    return offset
            time.sleep(pause)  # every connection busy: look again soon (a response is tens of milliseconds)
            pause = min(pause * 2, 0.05)

    def release(self, offset: int | None) -> None:
        if offset is None:
            return
        with self._lock:
            if offset in self._held and self._pid == os.getpid():
                fcntl.lockf(self._busy, fcntl.LOCK_UN, 1, offset)
                self._held.discard(offset)

    # -- what came back -------------------------------------------------------------------------

    def observe(self, host: str, sent_at: float, error: BaseException | None) -> None:
        """What a request to ``host`` sent at ``sent_at`` got (``error``: None for an answer)."""
        verdict, wait = _verdict(error)
        if verdict == _NOTHING:
            return
        p = self.policy
        with self._record(host) as record:
            if verdict == _ANSWERED:
                record.failures = 0
                return
            now = time.monotonic()
            if wait is not None and wait > p.max_retry_after_s:
                record.given_up, record.pause_s = _GIVEN_UP_WAIT, wait
                return
            if wait is not None:  # the host said how long: exactly that, and every process waits it
                record.paused_until = max(record.paused_until, now + wait)
            if sent_at < record.last_counted:
                return  # in flight when the last failure paused the host: the same outage
            record.failures += 1
            if record.failures == 1:
                record.first_failure = now
            record.last_counted = now
            if wait is None:
                record.pause_s = min(p.backoff_s * 2 ** (record.failures - 1), p.max_backoff_s)
                record.paused_until = max(record.paused_until, now + record.pause_s)
            if record.failures >= p.give_up_after:
                record.given_up = _GIVEN_UP_FAILING

    def _given_up_message(self, host: str, record: _Record) -> str:
        if record.given_up == _GIVEN_UP_WAIT:
            why = f"it asked for a pause of {record.pause_s:.0f} s (Retry-After), over {self.policy.max_retry_after_s:g} s"
        else:
            why = f"it failed {record.failures} times in a row over {record.last_counted - record.first_failure:.0f} s"
        return f"{GIVEN_UP}: {host} for this run ({why}); --retry-failed fetches it again"


# -- the limiter of this process (img2dataset's workers) ----------------------------------------

_limiter: HostLimiter | None = None
_min_interval: Callable[[str], float | None] | None = None


def set_min_interval(seconds_for: Callable[[str], float | None] | None) -> None:
    """Make ``seconds_for(url)`` (such as the host's robots.txt ``Crawl-delay``; None or 0: none) a
    lower bound of the interval between requests to ``url``'s host, in this process."""
    global _min_interval
    _min_interval = seconds_for


def install(policy: dict[str, Any] | None) -> None:
    """Limit this process's requests by ``policy`` (``HostPolicy.to_dict``); None: no limiter."""
    global _limiter
    if policy is None:
        _limiter = None
    elif _limiter is None or _limiter.policy != HostPolicy.from_dict(policy):
        _limiter = HostLimiter(HostPolicy.from_dict(policy))
    netguard.on_connected(None if _limiter is None else connected)


def installed() -> HostLimiter | None:
    return _limiter


class Turn:
    """One request's hold on its host: a connection (if limited) before it connects, its turn once
    connected, just before the request is sent (``connected``), the connection given back when the
    response is closed."""

    def __init__(self, limiter: HostLimiter | None, url: Any, first_hop: bool) -> None:
        self.limiter, self.host, self.connection = limiter, UNKNOWN_HOST, None
        self.sent_at, self.clean, self.taken, self.waited = time.monotonic(), False, False, 0.0
        self.url = url if isinstance(url, str) else getattr(url, "full_url", None)
        if limiter is None:
            return
        self.host = host_of(self.url)
        if self.host == UNKNOWN_HOST:
            return
        # A redirect's hop takes its host's turn; the connection count stays with the first host (the
        # hop's connection is opened after the first one's answer is read, and waiting for another
        # host's connection while holding one could wait for ever).
        if first_hop:
            self.connection = limiter.connection(self.host)
        _hops.pending = self

    def take(self) -> None:
        """Wait for the host's turn (once); ``HostGivenUp`` for a host given up."""
        if self.taken or self.limiter is None or self.host == UNKNOWN_HOST:
            return
        self.taken = True
        started = time.monotonic()
        self.sent_at, self.clean = self.limiter.take_turn(self.host, self.url)
        self.waited = self.sent_at - started

    def settled(self) -> None:
        """The request's ``open`` is over: a turn not taken at a connection (none was made) is not owed."""
        if getattr(_hops, "pending", None) is self:
            _hops.pending = None

    def observe(self, error: BaseException | None) -> None:
        if self.limiter is None or self.host == UNKNOWN_HOST:
            return
        if error is None and self.clean:
            return  # an answer from a host with no failure to reset: nothing to write
        self.clean = False
        if error is not None:
            if getattr(error, "_lenscap_host_observed", False):
                return  # a redirect hop's failure, counted against its own host
            with contextlib.suppress(AttributeError):
                error._lenscap_host_observed = True  # type: ignore[attr-defined]
        self.limiter.observe(self.host, self.sent_at, error)

    def release(self) -> None:
        if self.limiter is not None and self.connection is not None:
            self.limiter.release(self.connection)
            self.connection = None


_hops = threading.local()


def connected() -> None:
    """A connection is made, its request about to be sent: the pending request's turn is waited for."""
    turn = getattr(_hops, "pending", None)
    if turn is not None:
        _hops.pending = None
        turn.take()


@contextlib.contextmanager
def hop():
    """Around one ``open`` of a URL: yields whether it is a request's first hop (a redirect's hop is
    an ``open`` inside another, on the same thread)."""
    depth = getattr(_hops, "depth", 0)
    _hops.depth = depth + 1
    try:
        yield depth == 0
    finally:
        _hops.depth = depth
