"""robots.txt, as lenscap's downloads obey it (RFC 9309).

Rules are per origin (scheme, host and port, as robots.txt is defined; politeness's host,
``lenscap.download.hosts``, is for rates) and matched, by protego, for the user-agent token
(``--user-agent-token``, ``lenscap`` by default; an empty token reads the ``*`` group). How a fetch
of ``/robots.txt`` is read, as crawlers read it:

- 2xx: its first ``MAX_BYTES`` (500 KiB, RFC 9309 2.5) are the rules;
- 4xx (no robots.txt, or more than ``MAX_REDIRECTS`` redirects, RFC 9309 2.3.1.2-3): everything allowed;
- 429, 5xx, no answer, a connection that fails: everything disallowed (RFC 9309 2.3.1.4: "the crawler
  MUST assume complete disallow"; a 429 is the server asking for less, as Google reads it, not "no
  rules"). The row's message says so, and ``--retry-failed`` asks those samples again later.
- an address the network rule refuses: that refusal, as the image's own fetch would have said it.

Each origin's robots.txt is fetched once per job: a file per origin in ``DIRECTORY``
(``OUT/.lenscap/robots/``), written atomically, shared by the job's processes (one fetches while the
others wait on its lock file) and by reruns until it expires (``EXPIRY_S``, 24 hours, the longest
RFC 9309 2.4 lets a crawler keep one; an unreachable robots.txt is asked again after
``UNREACHABLE_EXPIRY_S``). In front of the files, a memo: a process reads each at most once (while it
holds fewer than ``MEMO_ORIGINS`` others). With no directory (img2dataset's tasks on a Ray cluster,
which share no disk with the job's machine) the memo alone holds it: once per process.

``crawl_delay(url)`` is the ``Crawl-delay`` the origin asks of our token, for the rate limiter: a lower
bound of the interval between two requests to that host.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from protego import Protego

from lenscap.download.netguard import REFUSED

try:
    import fcntl
except ImportError:  # Windows: the processes of a job may each fetch a robots.txt once
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "RobotsRules",
    "Robots",
    "configure",
    "refusal",
    "crawl_delay",
    "known_crawl_delay",
    "MAX_CRAWL_DELAY",
    "DISALLOWED",
    "UNREADABLE",
    "MAX_BYTES",
    "MAX_REDIRECTS",
    "EXPIRY_S",
    "UNREACHABLE_EXPIRY_S",
]

DISALLOWED = "disallowed by robots.txt"  # how a refusal's message starts: the row says it, --retry-failed reads it
UNREADABLE = "robots.txt could not be read"  # a transient failure: every path of the origin waits for a retry
MAX_BYTES = 500 * 1024
MAX_REDIRECTS = 5
EXPIRY_S = 24 * 3600
UNREACHABLE_EXPIRY_S = 600
MEMO_ORIGINS = 50_000  # origins a process keeps parsed; the oldest is dropped (and read again from its file)


@dataclass(frozen=True)
class RobotsRules:
    """One origin's robots.txt as read: its text (rules), or that everything is allowed or disallowed, and why."""

    robots_url: str
    text: str | None = None
    allow_all: bool = False
    why: str = ""  # for a disallow-all or a refusal: the row's message
    expires_at: float = 0.0

    def parsed(self) -> Protego | None:
        return None if self.text is None else Protego.parse(self.text)


class Robots:
    """The robots.txt rules of every origin a process fetches from, for one token.

    ``opener``: how robots.txt is fetched (the downloads' own guarded opener, with lenscap's User-Agent
    and at most ``MAX_REDIRECTS`` redirects); ``directory``: where the job keeps them (None: this process only).
    """

    def __init__(self, opener: Any, token: str, directory: str | None, timeout: float) -> None:
        self._opener, self._token, self._timeout = opener, token or "*", timeout
        self._directory = directory
        self._memo: dict[str, tuple[RobotsRules, Protego | None]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def refusal(self, url: str) -> str | None:
        """Why ``url`` may not be fetched under its origin's robots.txt (the row's message), or None."""
        rules, parser = self._rules(url)
        if parser is None:
            return None if rules.allow_all else rules.why
        if parser.can_fetch(url, self._token):
            return None
        return f"{DISALLOWED} ({rules.robots_url}, user-agent {self._token})"

    def crawl_delay(self, url: str, fetch: bool = True) -> float | None:
        """The seconds ``url``'s origin asks between two requests from our token (``Crawl-delay``), or None.
        ``fetch=False``: only from robots.txt already read by this process (never waits or fetches: the
        per-host limiter asks it for robots.txt's own request, made while its origin is being read)."""
        if fetch:
            _, parser = self._rules(url)
        else:
            with self._lock:
                held = self._memo.get(_origin(url))
            parser = None if held is None else held[1]
        delay = None if parser is None else parser.crawl_delay(self._token)
        return None if delay is None else float(delay)

    def _rules(self, url: str) -> tuple[RobotsRules, Protego | None]:
        origin = _origin(url)
        with self._lock:
            held = self._memo.get(origin)
            if held is not None and held[0].expires_at > time.time():
                return held
            lock = self._locks.setdefault(origin, threading.Lock())
        with lock:  # one thread of this process reads or fetches an origin's; the others wait for it
            with self._lock:
                held = self._memo.get(origin)
            if held is None or held[0].expires_at <= time.time():
                rules = self._shared(origin)
                held = (rules, rules.parsed())
                with self._lock:
                    self._memo[origin] = held
                    if len(self._memo) > MEMO_ORIGINS:
                        oldest = next(iter(self._memo))
                        del self._memo[oldest]
                        self._locks.pop(oldest, None)
            return held

    def _shared(self, origin: str) -> RobotsRules:
        """The origin's rules from the job's file, else fetched and written there (under its lock file)."""
        if self._directory is None:
            return self._fetch(origin)
        try:
            os.makedirs(self._directory, exist_ok=True)
        except OSError:
            return self._fetch(origin)
        path = os.path.join(self._directory, _file_name(origin))
        with _file_lock(path + ".lock"):
            rules = _read(path)
            if rules is None or rules.expires_at <= time.time():
                rules = self._fetch(origin)
                if not rules.why.startswith(REFUSED):  # the network rule is this run's, not the site's
                    _write(path, rules)
            return rules

    def _fetch(self, origin: str) -> RobotsRules:
        robots_url = origin + "/robots.txt"
        now = time.time()
        request = urllib.request.Request(robots_url)
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                body = response.read(MAX_BYTES)
        except urllib.error.HTTPError as e:
            if 300 <= e.code < 400 or (400 <= e.code < 500 and e.code != 429):  # unavailable: no rules
                return RobotsRules(robots_url, allow_all=True, expires_at=now + EXPIRY_S)
            why = f"{UNREADABLE} ({robots_url}: HTTP Error {e.code}): the host is skipped until it can be (RFC 9309)"
            return RobotsRules(robots_url, why=why, expires_at=now + UNREACHABLE_EXPIRY_S)
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            if REFUSED in str(reason):
                return RobotsRules(robots_url, why=str(reason), expires_at=now + UNREACHABLE_EXPIRY_S)
            why = f"{UNREADABLE} ({robots_url}: {reason}): the host is skipped until it can be (RFC 9309)"
            return RobotsRules(robots_url, why=why, expires_at=now + UNREACHABLE_EXPIRY_S)
        return RobotsRules(robots_url, text=body.decode("utf-8", "replace"), expires_at=now + EXPIRY_S)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    default = {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{host}" + ("" if port in (None, default) else f":{port}")


def _file_name(origin: str) -> str:
    readable = "".join(c if c.isalnum() or c in ".-" else "_" for c in origin)[:80]
    return f"{readable}-{hashlib.sha256(origin.encode()).hexdigest()[:12]}.json"


@contextlib.contextmanager
def _file_lock(path: str):
    if fcntl is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read(path: str) -> RobotsRules | None:
    try:
        with open(path, encoding="utf-8") as f:
            return RobotsRules(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None  # absent, or torn by a crash before the rename: fetched again


def _write(path: str, rules: RobotsRules) -> None:
    """Atomically: a process never reads half a file."""
    with contextlib.suppress(OSError):
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(rules.__dict__, f)
        os.replace(tmp, path)


# -- this process's rules: what the download's opener asks, and the rate limiter ----------------------

_current: Robots | None = None


# A Crawl-delay above this is taken as this: a day between two requests would hold the job's threads
# on one host (img2dataset's threads wait for its turns); a minute is already one request an hour per
# 60 URLs of that host.
MAX_CRAWL_DELAY = 60.0


def configure(robots: Robots | None) -> None:
    """The rules this process obeys (None: robots.txt is not read, ``--ignore-robots``)."""
    global _current
    _current = robots


def refusal(url: str) -> str | None:
    """Why this process may not fetch ``url`` under robots.txt, or None (also when robots.txt is ignored)."""
    return None if _current is None else _current.refusal(url)


def crawl_delay(url: str) -> float | None:
    """The ``Crawl-delay`` (seconds) that ``url``'s origin asks of this process's token, or None: none
    asked, or robots.txt ignored. Fetches the origin's robots.txt if this process has not read it yet."""
    return None if _current is None else _current.crawl_delay(url)


def known_crawl_delay(url: str) -> float | None:
    """``crawl_delay`` from robots.txt this process has already read, capped at ``MAX_CRAWL_DELAY``: what
    the per-host limiter takes as the least interval between two requests to a host. Never fetches."""
    delay = None if _current is None else _current.crawl_delay(url, fetch=False)
    return None if delay is None else min(delay, MAX_CRAWL_DELAY)
