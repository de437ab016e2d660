"""Where data lives: a local path, or a URL on any fsspec filesystem (``s3://``, ``gs://``, ``memory://``).

A location with a protocol other than ``file`` is *remote*. A dataset reads and writes both through
fsspec (``lenscap.core.dataset``, with its commits, is the one place that tells them apart).

Credentials never leave the location they were given in: what lenscap shows or records is
``redact_url(location)``, without user info (``s3://key:secret@bucket``) or query string.
"""

from __future__ import annotations

import os
import re
from typing import Any

import fsspec.core

from lenscap.core.errors import MissingDependency, UsageError

__all__ = ["is_remote", "redact_url", "local_path", "url_to_fs", "require_local", "REMOTE_SUPPORT"]

_PROTOCOL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_LOCAL_PROTOCOLS = frozenset({"file", "local"})
# What works on remote storage, for the error of the commands that do not.
REMOTE_SUPPORT = (
    "remote storage (fsspec URLs such as s3://, gs://) works for the input and output of filter, caption, "
    "dedup and shard, the input of inspect, and download's URL list and output"
)


def is_remote(location: str | os.PathLike[str] | None) -> bool:
    """Whether ``location`` is a URL on a filesystem other than the local one."""
    if location is None or isinstance(location, os.PathLike):
        return False
    text = str(location)
    if "::" in text and "://" in text:  # a chained URL: simplecache::s3://...
        return True
    m = _PROTOCOL_RE.match(text)
    return m is not None and m.group(1).lower() not in _LOCAL_PROTOCOLS


def local_path(location: str | os.PathLike[str]) -> str:
    """A local location as a path (``file:///x`` -> ``/x``)."""
    text = os.fspath(location)
    m = _PROTOCOL_RE.match(text)
    return text[m.end() :] if m is not None and m.group(1).lower() in _LOCAL_PROTOCOLS else text


def redact_url(location: str | os.PathLike[str]) -> str:
    """``location`` as it may be shown and recorded: a URL loses its user info and query string."""
    text = os.fspath(location)
    if not is_remote(text):
        return text
    parts = []
    for part in text.split("::"):
        m = _PROTOCOL_RE.match(part)
        if m is not None:
            rest = part[m.end() :]
            head, slash, tail = rest.partition("/")
            head = head.rpartition("@")[2]
            part = f"{m.group(0)}{head}{slash}{tail}"
        parts.append(part.split("?", 1)[0].split("#", 1)[0])
    return "::".join(parts)


def url_to_fs(location: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem of a remote ``location`` and the path on it; a missing filesystem
    package or an unknown protocol is a one-line error."""
    try:
        fs, root = fsspec.core.url_to_fs(location, **(storage_options or {}))
    except ImportError as e:
        raise MissingDependency(f"{redact_url(location)}: {e}") from None
    except ValueError as e:
        raise UsageError(f"{redact_url(location)}: {str(e).splitlines()[0] if str(e) else 'not a usable URL'}") from None
    return fs, root.rstrip("/") or root


def require_local(location: str | os.PathLike[str] | None, what: str) -> None:
    """Refuse a remote ``location`` for ``what`` (a command's part that writes local files) with a
    one-line usage error naming what is supported."""
    if is_remote(location):
        assert location is not None
        raise UsageError(f"{what} must be a local path, not {redact_url(location)}: {REMOTE_SUPPORT}")
