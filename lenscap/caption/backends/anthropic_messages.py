"""``--backend anthropic``: Claude through Anthropic's Messages API and the official ``anthropic`` SDK.

Everything but the provider's own words is every API backend's (``api_chat.ApiChatBackend``): the
pool, retries, the outage breaker, the journal, the cache and ``--max-cost``. Anthropic's own: the image
goes as a base64 ``image`` content block before the prompt; usage is ``usage.input_tokens`` and
``output_tokens``; ``stop_reason`` ``max_tokens`` is a truncated caption and ``refusal`` a refused one;
errors are ``{"type": "error", "error": {"type", "message"}}`` (529: overloaded, retried as a 5xx); and
the rate limits are ``anthropic-ratelimit-{requests,input-tokens,output-tokens}-{limit,remaining,reset}``
(reset as an RFC 3339 time) with ``retry-after`` in seconds: input and output tokens are limited
apart, so the limiter holds a bucket for each.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from functools import partial
from typing import Any

from lenscap.caption.backends.api_chat import REFUSAL_RE, ApiChatBackend, ApiError, Reply, check_endpoint, sdk_error
from lenscap.caption.backends.api_guards import (
    bounded_call,
    check_redirect,
    check_redirect_sync,
)
from lenscap.caption.backends.base import API_PANEL, ERROR, REFUSED, TRUNCATED, CaptionRequest, CaptionResult, Option
from lenscap.caption.backends.openai_chat import COMMON_OPTIONS, ONLINE_OPTIONS
from lenscap.caption.image_prep import prepare_image
from lenscap.core.errors import MissingDependency
from lenscap.core.install import install_hint

__all__ = ["AnthropicBackend", "ANTHROPIC_OPTIONS", "DEFAULT_MODEL", "anthropic_sdk", "limit_headers"]

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_MODEL = "claude-haiku-4-5"  # the cheapest current Claude with vision


def _anthropic_specs(specs: tuple[Option, ...]) -> tuple[Option, ...]:
    """The OpenAI backend's options as Anthropic takes them: its model, key variable and base URL; no
    --detail (Claude has no image detail setting); --tpm counts input tokens, --output-tpm output ones."""
    own = {
        "model": {"default": DEFAULT_MODEL},
        "base_url": {"default_text": "$ANTHROPIC_BASE_URL or Anthropic"},
        "api_key_env": {"default": "ANTHROPIC_API_KEY"},
        "temperature": {"help": "Sampling temperature (Anthropic: 0 to 1)."},
        "tpm": {"help": "Input tokens per minute per endpoint (Anthropic limits output tokens apart: --output-tpm)."},
    }
    return tuple(replace(o, **own.get(o.name, {})) for o in specs if o.name != "detail")


ANTHROPIC_OPTIONS = _anthropic_specs(COMMON_OPTIONS)
ONLINE_ANTHROPIC_OPTIONS = _anthropic_specs(ONLINE_OPTIONS) + (
    Option(
        "output_tpm",
        float,
        None,
        "Output tokens per minute per endpoint, where the provider limits them apart from input tokens (Anthropic).",
        panel=API_PANEL,
        default_text="from the server's rate-limit headers",
    ),
)


def anthropic_sdk() -> Any:
    """The ``anthropic`` package, or a one-line ``MissingDependency`` naming the extra that installs it."""
    try:
        import anthropic  # the SDK takes most of a second to import: only where a request is made
    except ImportError:
        raise MissingDependency(f"the anthropic backends need the anthropic SDK: {install_hint('anthropic')}") from None
    return anthropic


def limit_headers(headers: Mapping[str, str], now: float | None = None) -> dict[str, str]:
    """Anthropic's rate-limit headers in the names the limiter reads: requests, input tokens (its
    ``tokens``) and output tokens, each limit and remaining as they are and reset as seconds from now;
    ``retry-after`` (seconds) unchanged."""
    now = time.time() if now is None else now
    out: dict[str, str] = {}
    for theirs, ours in (("requests", "requests"), ("input-tokens", "tokens"), ("output-tokens", "output-tokens")):
        for field in ("limit", "remaining"):
            value = headers.get(f"anthropic-ratelimit-{theirs}-{field}")
            if value is not None:
                out[f"x-ratelimit-{field}-{ours}"] = value
        reset = _seconds_until(headers.get(f"anthropic-ratelimit-{theirs}-reset"), now)
        if reset is not None:
            out[f"x-ratelimit-reset-{ours}"] = f"{reset:.3f}"
    if headers.get("retry-after") is not None:
        out["retry-after"] = headers["retry-after"]
    return out


def _list_models(client: Any, url: str, timeout: float) -> Any:
    return bounded_call(lambda: client.models.list(limit=1), timeout + 1.0, f"{url} did not answer within {timeout:g}s")


def _seconds_until(stamp: str | None, now: float) -> float | None:
    if not stamp:
        return None
    try:
        return max(0.0, datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() - now)
    except ValueError:
        return None


class AnthropicBackend(ApiChatBackend):
    """Anthropic's Messages API (Claude models), request by request, through the official anthropic SDK."""

    name = "anthropic"
    options = ANTHROPIC_OPTIONS + ONLINE_ANTHROPIC_OPTIONS
    default_base_url = DEFAULT_BASE_URL
    base_url_variable = "ANTHROPIC_BASE_URL"
    max_temperature = 1.0
    output_limited = True

    def parameters(self) -> dict[str, Any]:
        return {**super().parameters(), "output_tpm": self.options.output_tpm}

    def limit_headers(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        return limit_headers(headers)

    def sync_client(self, url: str, timeout: float, retries: int) -> Any:
        sdk = anthropic_sdk()
        return sdk.Anthropic(
            base_url=url,
            api_key=self._api_key,
            max_retries=retries,
            timeout=timeout,
            http_client=sdk.DefaultHttpxClient(event_hooks={"response": [check_redirect_sync]}),
        )

    def check(self) -> None:
        """Reach every endpoint once (``GET /v1/models``): a wrong URL or key fails here, not per sample."""
        sdk = anthropic_sdk()
        timeout = min(self.options.timeout, 20.0)
        for url in self.base_urls:
            client = self.sync_client(url, timeout, 1)
            try:
                check_endpoint(sdk, url, partial(_list_models, client, url, timeout), self, "/v1/models")
            finally:
                client.close()

    # -- one request ----------------------------------------------------------------------------

    def open_client(self, url: str) -> Any:
        sdk = anthropic_sdk()
        return sdk.AsyncAnthropic(
            base_url=url,
            api_key=self._api_key,
            max_retries=0,
            timeout=self.options.timeout,
            http_client=sdk.DefaultAsyncHttpxClient(event_hooks={"response": [check_redirect]}),
        )

    async def send(self, client: Any, body: dict[str, Any]) -> Reply:
        sdk = anthropic_sdk()
        try:
            raw = await client.messages.with_raw_response.create(**body)
            message = await raw.parse()  # this SDK's raw response parses asynchronously
        except (sdk.APIError, ValueError) as e:
            raise sdk_error(sdk, e, str(client.base_url).rstrip("/")) from None
        if not isinstance(getattr(message, "content", None), list) or getattr(message, "usage", None) is None:
            raise ApiError("malformed reply: no content or usage", headers=raw.headers, kind="malformed")
        return Reply(raw.headers, message)

    def probe_body(self) -> dict[str, Any]:
        return {"model": self.model, "max_tokens": 1, "messages": [{"role": "user", "content": "Reply with OK."}]}

    def build_body(self, request: CaptionRequest) -> tuple[dict[str, Any], int]:
        """The Messages request for one image (the image first, as Anthropic advises), and its estimated
        input tokens. Raises ``UnreadableImage``. Shared with ``anthropic-batch``, which writes it to a file."""
        image = prepare_image(request.image, self.options.max_side)
        source = {"type": "base64", "media_type": image.mime, "data": base64.b64encode(image.data).decode("ascii")}
        content = [{"type": "image", "source": source}, {"type": "text", "text": request.instruction}]
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.options.max_tokens,
            "messages": [{"role": "user", "content": content}],
        }
        if request.system:
            body["system"] = request.system
        if self.options.temperature is not None:
            body["temperature"] = self.options.temperature
        return body, self._input_estimate(image.width, image.height, request)

    def interpret(self, key: str, message: Any, estimate: int) -> CaptionResult:
        """A Message (the SDK's object) as a caption outcome, priced from its usage."""
        text = "".join(getattr(b, "text", "") for b in message.content if getattr(b, "type", None) == "text").strip()
        usage = message.usage
        result = self.usage_result(
            key, getattr(usage, "input_tokens", None), getattr(usage, "output_tokens", None), estimate, text
        )
        if result.status == ERROR:
            return result
        if message.stop_reason == "refusal":
            result.status, result.error = (
                REFUSED,
                "refused: the model declined (stop_reason refusal)" + (f": {text}" if text else ""),
            )
        elif message.stop_reason == "max_tokens":
            result.status, result.error = TRUNCATED, f"reply cut at --max-tokens {self.options.max_tokens}: {text}"
        elif not text:
            result.status, result.error = ERROR, "empty reply"
        elif REFUSAL_RE.match(text) and len(text.split()) < 40:
            result.status, result.error = REFUSED, f"refused: {text}"
        else:
            result.caption = " ".join(text.split())
        return result

    def batch_result(self, key: str, result: Any) -> tuple[dict[str, Any] | None, str | None]:
        """One line of a Message Batch's results (its ``result``) as a journal entry, or (None, why) for a
        request to ask again in the next round: errored on the server's side, canceled, expired, torn."""
        kind = result.get("type") if isinstance(result, dict) else None
        if kind == "succeeded":
            sdk = anthropic_sdk()
            try:
                message = sdk.types.Message.model_validate(result["message"])
            except Exception as e:  # noqa: BLE001 - any malformed body
                return None, f"malformed reply in the batch results: {type(e).__name__}"
            return {**self.interpret(key, message, 0).to_dict(), "cached": False}, None
        if kind == "errored":
            error = (result.get("error") or {}).get("error") or {}
            status = _FINAL_ERRORS.get(error.get("type"))
            if status is not None:  # worded as the online backend words it
                message = f"HTTP {status}: {error.get('message', error.get('type'))}"
                return {**CaptionResult(key, ERROR, error=message).to_dict(), "cached": False}, None
            return None, f"{error.get('type', 'error')}: {error.get('message', 'no message')}"
        return None, f"request {kind or 'without a result'}"


# The request itself is wrong: asking again in another batch will not help.
# (Batch results carry the error's type, not its HTTP status: these are the statuses Anthropic gives them.)
_FINAL_ERRORS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
}
