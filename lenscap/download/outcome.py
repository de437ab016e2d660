"""What a download's failed samples add up to, in one line a person can act on.

- ``error_share``: the failures against ``--max-error-share`` (the outcome policy, docs/exit-codes.md),
  with the commonest reason counted (``20 of 20 refused: loopback address``) and what to do about it.
  A reason is a message without what differs from URL to URL (``reason_of``): two hundred hosts
  refused for one rule are one reason, not two hundred.
- ``retryable``: which failures ``--retry-failed`` asks again.
- ``rerun_hint``: a rerun whose fetch options differ from the last run's finds its shards done and
  fetches nothing; when its options would change failed samples, it says to add ``--retry-failed``.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Any

from lenscap.core.dataset import Dataset
from lenscap.core.result import ErrorShare, JobResult
from lenscap.download import optout, robots
from lenscap.download.host_policy import GIVEN_UP
from lenscap.download.netguard import REFUSED
from lenscap.download.options import DownloadOptions

__all__ = ["error_share", "reason_of", "retryable", "rerun_hint", "PERMANENT_ERRORS"]

# Failures that a second attempt cannot fix: the server said no, or the URL is not fetchable. A path
# robots.txt disallows is asked again only by a retry with --ignore-robots.
PERMANENT_ERRORS = (optout.DISALLOWED, robots.DISALLOWED, "unsupported URL scheme", "empty URL", "not valid UTF-8")

_REFUSAL = re.compile(re.escape(REFUSED) + r" .*?: an? (.+?) address")
_HTTP = re.compile(r"HTTP Error (\d{3})(?::\s*([^>;]+))?")
_SLOW = "the servers are slow or unreachable: raise --timeout, or check this machine's network"
_NO_DNS = "the host names do not resolve: check this machine's DNS and network"
# The commonest reason, by a part of it, and what to do about it.
_FIXES = (
    ("refused: ", "pass --allow-private-network if that is meant"),
    (robots.DISALLOWED, "the hosts' robots.txt disallow these paths; --ignore-robots only for a list you have the rights to"),
    (robots.UNREADABLE, "the hosts' robots.txt did not answer, so their paths were not fetched"),
    (GIVEN_UP, "their hosts kept failing or asked for a long pause (the rows' error_message says which)"),
    ("timed out", _SLOW),
    ("timeout", _SLOW),
    ("Name or service not known", _NO_DNS),
    ("Temporary failure in name resolution", _NO_DNS),
    ("Connection refused", "nothing listens at those addresses: check the URL list"),
    ("404", "the URL list is stale (the images are gone)"),
    ("403", "the servers refuse this client: check --user-agent-token, lower --threads"),
    ("429", "the servers rate-limit this client: lower --per-host-rps and --per-host-concurrency"),
)
# The fetch options a rerun may change that decide whether a failed URL would succeed now.
_TELLING = ("allow_private_network", "ignore_robots", "timeout", "max_retries")


def reason_of(message: str | None, status: str) -> str:
    """Why a sample failed, without the host or address that differs from URL to URL."""
    if not message:
        return status.replace("_", " ")
    if message.startswith(GIVEN_UP):
        return GIVEN_UP  # its host and why differ from host to host
    if refusal := _REFUSAL.search(message):
        return f"refused: {refusal.group(1)} address"
    if "timed out" in message or "took more than --timeout" in message:
        return "timed out"
    for said in (robots.DISALLOWED, robots.UNREADABLE, optout.DISALLOWED):  # without the host, or the directive
        if message.startswith(said):
            return said
    if http := _HTTP.search(message):
        return f"HTTP Error {http.group(1)}" + (f": {http.group(2).strip()}" if http.group(2) else "")
    return message.removeprefix("<urlopen error ").removesuffix(">").strip()[:200]


def retryable(row: dict[str, Any], allow_private_network: bool, ignore_robots: bool = False) -> bool:
    """A failed download worth asking again: not one the server or the URL rules out, nor an address the
    network rule refused, nor a path robots.txt disallows (unless this run allows it, or ignores robots.txt)."""
    if row.get("status") != "failed_to_download":
        return False
    message = row.get("error_message") or ""
    if REFUSED in message and not allow_private_network:
        return False
    if message.startswith(robots.DISALLOWED):
        return ignore_robots
    return not any(p in message for p in PERMANENT_ERRORS)


def _failed_rows(out: Dataset) -> list[dict[str, Any]]:
    """Every failed row of the completed shards: its status and message."""
    rows = []
    for shard_id in out.completed_ids():
        for row in out.read_table(shard_id, columns=["status", "error_message"]).to_pylist():
            if row["status"] not in ("success", "duplicate"):
                rows.append(row)
    return rows


def error_share(out: Dataset, result: JobResult, options: DownloadOptions) -> ErrorShare:
    """The URLs that failed against ``--max-error-share``, with the commonest reason, counted, and its fix."""
    duplicates = result.status.get("duplicate", 0)  # fetched once, as the row they repeat: not a failure
    tried = result.samples - duplicates
    share = ErrorShare(tried - result.status.get("success", 0), tried, options.max_error_share)
    if not share.exceeded:
        return share
    reasons = Counter(reason_of(r["error_message"], r["status"]) for r in _failed_rows(out))
    if not reasons:
        return share
    commonest, count = reasons.most_common(1)[0]
    fix = next((f for part, f in _FIXES if part in commonest), "see the rows' error_message (lenscap inspect)")
    if commonest.startswith("refused: ") and options.allow_private_network:
        fix = "an earlier run refused them; add --retry-failed to fetch them with --allow-private-network"
    elif not commonest.startswith("refused: ") and not any(p in commonest for p in PERMANENT_ERRORS):
        fix += "; --retry-failed fetches them again"
    return dataclasses.replace(share, commonest=commonest, commonest_count=count, fix=fix)


def _shown(name: str, value: Any) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"{flag} {value}"


def rerun_hint(out: Dataset, previous: dict[str, Any] | None, options: DownloadOptions, earlier: list[int]) -> str | None:
    """One line for a rerun (no --retry-failed) whose fetch options differ from the last run's, where
    failed samples of the shards done ``earlier`` would be asked again with them: this run fetched none."""
    if not previous or options.retry_failed:
        return None
    changed = [
        f"{_shown(n, getattr(options, n))}, not {_shown(n, previous[n])}"
        for n in _TELLING
        if n in previous and previous[n] != getattr(options, n)
    ]
    if not changed:
        return None
    again = 0
    for shard_id in earlier:
        table = out.read_table(shard_id, columns=["status", "error_message"])
        again += sum(retryable(row, options.allow_private_network, options.ignore_robots) for row in table.to_pylist())
    if not again:
        return None
    return (
        f"{again} failed downloads were tried with other options than this run's ({'; '.join(changed)}); "
        "a rerun fetches only unfinished shards: add --retry-failed to fetch them again with these"
    )
