"""The per-host limits a download is told (``--per-host-rps``, ``--per-host-concurrency``) and its
backoff settings: what ``lenscap.download.host_limits`` enforces, kept apart from it so that the options
(read at every start of the CLI) import nothing heavy.

The defaults, for a host on the public internet: 5 requests a second and 8 open connections. Scrapy,
the crawler framework most scrapers start from, opens at most 8 connections to a domain by default
(``CONCURRENT_REQUESTS_PER_DOMAIN``), and its AutoThrottle caps its backoff at 60 s, as
``MAX_BACKOFF_S`` does here; crawlers of HTML pages (Nutch, Heritrix) wait seconds between requests
to a host, but an image host is mostly a CDN that serves far more than a page's server. 5 a second
is under what any CDN notices, and still 430,000 images a day from each host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import os
from dataclasses import dataclass
from typing import Any

from lenscap.download.netguard import refusal

__all__ = [
    "HostPolicy",
    "is_private_host",
    "reset_state",
    "BACKOFF",
    "GIVEN_UP",
    "STATE_FILES",
    "DEFAULT_RPS",
    "DEFAULT_CONCURRENCY",
    "MAX_CONCURRENCY",
]

DEFAULT_RPS = 5.0
DEFAULT_CONCURRENCY = 8
MAX_CONCURRENCY = 1024
BACKOFF_S = 0.5  # the pause after a host's first failure; doubled after each failure in a row
MAX_BACKOFF_S = 60.0  # Scrapy's AutoThrottle caps its delay at 60 s too
GIVE_UP_AFTER = 8  # failures in a row: 0.5 + 1 + ... + 32 = 63.5 s of pauses before the 8th
MAX_RETRY_AFTER_S = 300.0  # a longer Retry-After gives the host up for this run rather than holding threads
# The backoff settings a run is given (tests shorten them).
BACKOFF = {
    "backoff_s": BACKOFF_S,
    "max_backoff_s": MAX_BACKOFF_S,
    "give_up_after": GIVE_UP_AFTER,
    "max_retry_after_s": MAX_RETRY_AFTER_S,
}
GIVEN_UP = "host given up"  # how each given-up sample's message starts (outcome.reason_of counts them as one)
STATE_FILES = ("hosts.table", "hosts.busy")


@dataclass(frozen=True)
class HostPolicy:
    """What the limiter is told (it travels to img2dataset's workers as a dict: ``to_dict``)."""

    directory: str
    rps: float | None = None  # None: DEFAULT_RPS for a public host, no limit for a private address
    concurrency: int | None = None
    backoff_s: float = BACKOFF_S
    max_backoff_s: float = MAX_BACKOFF_S
    give_up_after: int = GIVE_UP_AFTER
    max_retry_after_s: float = MAX_RETRY_AFTER_S
    share: int = 1  # the machines that share the hosts, each with its own table and this share of the limits

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HostPolicy:
        return cls(**d)

    def limits(self, host: str) -> tuple[float, int]:
        """(rps, connections) for ``host``; 0 is no limit. Unset, a public host gets the defaults, and
        a private address (your own network, fetched only with --allow-private-network) none."""
        private = is_private_host(host)
        rps = self.rps if self.rps is not None else (0.0 if private else DEFAULT_RPS)
        concurrency = self.concurrency if self.concurrency is not None else (0 if private else DEFAULT_CONCURRENCY)
        return rps / self.share, (max(1, concurrency // self.share) if concurrency else 0)

    def divided(self, parts: int) -> HostPolicy:
        """This policy for one of ``parts`` machines that share the hosts, each with its own table: the
        rate divided among them, and the connections too (at least one each)."""
        return dataclasses.replace(self, share=max(1, parts))


@functools.lru_cache(maxsize=65_536)
def is_private_host(host: str) -> bool:
    """Whether ``host`` (as ``host_of`` gives it) is a loopback, private or other non-public address."""
    if host == "localhost":
        return True
    try:
        return refusal(ipaddress.ip_address(host.strip("[]"))) is not None
    except ValueError:
        return False


def reset_state(directory: str | os.PathLike[str]) -> None:
    """A new run's limiter state in ``directory``: nothing remembered of an earlier run's hosts (no
    process of it is left: the output's lock says so), so a host given up then is tried again."""
    for name in STATE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
