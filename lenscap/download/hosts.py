"""Which host a URL is on, as politeness counts hosts.

A host is the URL's registrable domain where one exists (``a.b.example.co.uk`` and ``cdn.example.co.uk``
are both ``example.co.uk``: one operator, one set of servers to be polite to), else its address
(``127.0.0.5``, ``[::1]``) or bare name (``localhost``). The Public Suffix List is the snapshot that
tldextract ships: never fetched at run time (a download must not depend on, or leak to, a third
party), so the answer is the same on every machine of a job. Only the list's ICANN section is used:
``bucket.s3.amazonaws.com`` is ``amazonaws.com``, the one operator whose servers every bucket shares.
"""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import urlsplit

import tldextract

__all__ = ["host_of", "UNKNOWN_HOST"]

UNKNOWN_HOST = ""  # a URL with no host (empty, another scheme, not parseable): politeness has no one to spare


@functools.cache
def _extract() -> Any:
    # suffix_list_urls=(): the bundled snapshot only; cache_dir=None: nothing written to the user's home.
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, include_psl_private_domains=False)


@functools.lru_cache(maxsize=65_536)
def _host_of_name(hostname: str) -> str:
    parts = _extract()(hostname)
    if parts.domain and parts.suffix:
        return f"{parts.domain}.{parts.suffix}"
    return hostname


def host_of(url: str | None) -> str:
    """The host ``url`` is on (its registrable domain, else its address or name), lower case;
    ``UNKNOWN_HOST`` for a URL without one."""
    if not url:
        return UNKNOWN_HOST
    try:
        hostname = urlsplit(url.strip()).hostname
    except ValueError:
        return UNKNOWN_HOST
    if not hostname:
        return UNKNOWN_HOST
    if ":" in hostname:  # an IPv6 address: its own host
        return f"[{hostname}]"
    return _host_of_name(hostname.rstrip(".").lower())
