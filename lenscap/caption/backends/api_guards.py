"""What every call lenscap makes to an API server is held to, whatever the endpoint (chat completions,
models, files, batches): a bound on its total time, no redirect off the host it was sent to (the
request carries the key and the images), and an answer that is the API's before it is believed."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

from lenscap.core.errors import BackendError

__all__ = [
    "OffHostRedirect",
    "check_redirect",
    "check_redirect_sync",
    "redirect_message",
    "bounded_call",
    "check_models",
    "public_url",
]

T = TypeVar("T")


class OffHostRedirect(Exception):
    """A redirect from --base-url to another host: never followed (it would replay the request, key and
    images included, to wherever the redirect points)."""


def public_url(url: str) -> str:
    """The URL without credentials or query (some gateways put keys there): safe for manifests."""
    p = urlparse(url)
    netloc = p.hostname or ""
    if p.port:
        netloc += f":{p.port}"
    return p._replace(netloc=netloc, query="", fragment="").geturl()


def _redirect_target(status: int, request_url: Any, location: str | None) -> str | None:
    """Where a redirect to another host points (None: not a redirect, or one on the same host)."""
    if status not in (301, 302, 303, 307, 308) or not location:
        return None
    target = request_url.join(location)
    return None if target.host == request_url.host else public_url(str(target))


def check_redirect_sync(response: Any) -> None:
    """An HTTP client's response hook (the SDK's httpx client): raises ``OffHostRedirect`` before a
    redirect to another host is followed."""
    target = _redirect_target(response.status_code, response.request.url, response.headers.get("location"))
    if target is not None:
        raise OffHostRedirect(target)


async def check_redirect(response: Any) -> None:
    """``check_redirect_sync`` for the asynchronous client."""
    check_redirect_sync(response)


def redirect_message(url: str, redirect: OffHostRedirect) -> str:
    return (
        f"{public_url(url)} redirected to another host ({redirect}); lenscap does not follow it (the request "
        "carries the key and the images): give the address it should reach as --base-url"
    )


def bounded_call(call: Callable[[], T], seconds: float, message: str) -> T:
    """``call()`` in a thread of its own, given up after ``seconds`` (``BackendError(message)``): the
    synchronous client's timeout bounds each read, and a server sending a byte at a time would hold a
    call for ever. Its exception, if any, is raised here."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as e:  # noqa: BLE001 - handed back to the caller's thread as it is
            outcome["error"] = e

    worker = threading.Thread(target=run, name="lenscap-bounded-call", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise BackendError(message)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def check_models(client: Any, url: str, timeout: float) -> None:
    """``GET /models`` answered as the API answers, within ``timeout`` in all. Its other errors (a key
    refused, no such endpoint) are the SDK's exceptions, for ``check`` to say."""
    raw = bounded_call(
        client.models.with_raw_response.list, timeout + 1.0, f"{url} did not answer GET /models within {timeout:g}s"
    )
    response = raw.http_response
    try:
        body = json.loads(response.text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        kind = response.headers.get("content-type", "no content type").split(";")[0]
        raise BackendError(
            f"{url} answered GET /models with something that is not an OpenAI-compatible API (HTTP "
            f"{response.status_code}, {kind}): is --base-url right, or is a proxy's login page in the way?"
        )
