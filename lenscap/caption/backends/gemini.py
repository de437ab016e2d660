"""``--backend gemini``: Google's Gemini API (``generateContent``) through the official ``google-genai`` SDK.

Everything but the wire is ``--backend openai``'s (``OpenAIChatBackend``): the asyncio pool, the rate
limiter, retries with backoff, the outage breaker, the journal, the cache, ``--max-cost``. What differs
is here: the request (the prompt and the image as an ``inlineData`` part, ``maxOutputTokens``), the
answer (``candidates``, ``usageMetadata``, ``finishReason``, ``promptFeedback``), and the errors
(``{"error": {"code", "message", "status"}}``). Gemini sends no rate-limit headers, so the limits are
``--rpm``/``--tpm`` or, without them, the model's published tier-1 limits (``pricing.tier_limits``);
a 429 ``RESOURCE_EXHAUSTED`` pauses the endpoint for the ``retryDelay`` of its ``RetryInfo`` detail.
"""

from __future__ import annotations

import base64
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from lenscap.caption.backends.api_chat import (
    ApiChatBackend,
    ApiError,
    ApiOptions,
    Reply,
    _describe,
    impossible_usage,
    resolve_api_key,
)
from lenscap.caption.backends.api_guards import (
    OffHostRedirect,
    bounded_call,
    check_redirect,
    check_redirect_sync,
    redirect_message,
)
from lenscap.caption.backends.base import ERROR, OK, REFUSED, TRUNCATED, CaptionRequest, CaptionResult, Option
from lenscap.caption.backends.openai_chat import COMMON_OPTIONS, ONLINE_OPTIONS
from lenscap.caption.image_prep import prepare_image
from lenscap.caption.pricing import text_tokens, tier_limits
from lenscap.core.errors import BackendError, MissingDependency, UsageError
from lenscap.core.install import install_hint

__all__ = ["GeminiBackend", "GEMINI_OPTIONS", "DEFAULT_GEMINI_MODEL", "gemini_sdk", "answer_of", "api_name", "error_message"]

DEFAULT_GEMINI_MODEL = "gemini-2.5-flash"
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
KEY_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY")  # the SDK's own names, in its order
# finishReason values that mean the model (or Google's filters) would not caption the image.
REFUSALS = ("SAFETY", "RECITATION", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "IMAGE_SAFETY", "LANGUAGE")
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"


def _gemini(option_name: str, **changes: Any) -> Any:
    """One of ``--backend openai``'s options, with Gemini's default."""
    spec = next(o for o in COMMON_OPTIONS + ONLINE_OPTIONS if o.name == option_name)
    return dataclasses.replace(spec, **changes)


_TIER_TEXT = "the model's tier-1 limit (Gemini sends no rate-limit headers)"
GEMINI_COMMON_OPTIONS = (
    _gemini("model", default=DEFAULT_GEMINI_MODEL),
    _gemini("base_url", default_text="$GOOGLE_GEMINI_BASE_URL or Google"),
    _gemini(
        "api_key_env",
        default="GEMINI_API_KEY",
        help="Name of the environment variable holding the API key (not the key); NAME_FILE may name a file "
        "holding it. Gemini: GOOGLE_API_KEY is tried after GEMINI_API_KEY.",
    ),
    *(o for o in COMMON_OPTIONS if o.name in ("max_tokens", "temperature", "max_side", "timeout", "prices")),
)
# 2.5 Flash and Flash-Lite may answer without thinking (Pro may not): a caption needs none, and thinking
# tokens are billed as output and spent from maxOutputTokens, so a dense caption would come back cut.
NO_THINKING_BY_DEFAULT = ("gemini-2.5-flash",)
GEMINI_COMMON_OPTIONS += (
    Option(
        "thinking_budget",
        int,
        None,
        "Tokens a Gemini 2.5 model may think before it captions (thinkingBudget; billed as output, spent from "
        "--max-tokens); -1: the model decides.",
        default_text="0 for 2.5 Flash and Flash-Lite, the model's own for others",
    ),
)
GEMINI_OPTIONS = GEMINI_COMMON_OPTIONS + (
    _gemini("rpm", default_text=_TIER_TEXT),
    _gemini("tpm", default_text=_TIER_TEXT),
    *(o for o in ONLINE_OPTIONS if o.name not in ("rpm", "tpm")),
)


def gemini_sdk() -> tuple[Any, Any, Any]:
    """``(genai, types, errors)`` of the ``google-genai`` SDK, or ``MissingDependency`` with its install hint."""
    try:
        from google import genai  # the SDK takes a second to import: only where a request is made
        from google.genai import errors, types
    except ImportError:
        raise MissingDependency(f"--backend gemini needs the google-genai SDK: {install_hint('gemini')}") from None
    return genai, types, errors


class GeminiBackend(ApiChatBackend):
    """Google's Gemini API (generateContent) through the google-genai SDK, request by request."""

    name = "gemini"
    options = GEMINI_OPTIONS
    default_base_url = DEFAULT_BASE_URL
    base_url_variable = "GOOGLE_GEMINI_BASE_URL"

    def __init__(self, options: ApiOptions, thinking_budget: int | None = None) -> None:
        limits = tier_limits(options.model)
        if limits is not None:  # each limit not given is the model's tier-1 one: Gemini's answers carry none
            rpm = limits.rpm if options.rpm is None else options.rpm
            options = dataclasses.replace(options, rpm=rpm, tpm=limits.tpm if options.tpm is None else options.tpm)
        super().__init__(options)
        self.set_thinking_budget(thinking_budget)

    @classmethod
    def from_options(cls, values: dict[str, Any]) -> ApiChatBackend:
        backend = super().from_options(values)
        assert isinstance(backend, GeminiBackend)
        backend.set_thinking_budget(cls.parse_options(values)["thinking_budget"])
        return backend

    def set_thinking_budget(self, budget: int | None) -> None:
        if budget is None and self.model.startswith(NO_THINKING_BY_DEFAULT):
            budget = 0
        if budget is not None and budget < -1:
            raise UsageError(f"thinking_budget must be -1 (the model decides), 0 or more, not {budget}")
        self.thinking_budget = budget

    def resolve_key(self) -> str:
        """``--api-key-env``'s variable; left at GEMINI_API_KEY, GOOGLE_API_KEY when that one is unset."""
        variable = self.options.api_key_env
        if variable != KEY_VARIABLES[0]:
            return resolve_api_key(variable, self.base_urls)
        if not _key_given(variable) and _key_given(KEY_VARIABLES[1]):
            return resolve_api_key(KEY_VARIABLES[1], self.base_urls)
        try:
            return resolve_api_key(variable, self.base_urls)
        except BackendError as e:
            if _key_given(variable):
                raise  # a key file that cannot be read, or holds more than the key
            raise BackendError(
                "no API key: set the environment variable GEMINI_API_KEY or GOOGLE_API_KEY, or GEMINI_API_KEY_FILE "
                "to a file holding it (or name another variable with --api-key-env)"
            ) from e

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "provider": "gemini", "thinking_budget": self.thinking_budget}

    def limit_headers(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        return headers  # none but the retry-after that ``send`` reads from a 429's RetryInfo

    # -- the SDK ----------------------------------------------------------------------------------

    def http_options(self, url: str, client: Any, timeout_s: float) -> Any:
        """The SDK's settings for one endpoint: our own httpx client (redirects to another host refused;
        and no aiohttp, whose session the SDK retries on its own), the timeout in milliseconds, no SDK retries."""
        _, types, _ = gemini_sdk()
        key = "httpx_async_client" if hasattr(client, "aclose") else "httpx_client"
        root = url.removesuffix("/v1beta") + "/"  # the SDK adds the API version itself
        return types.HttpOptions(base_url=root, api_version="v1beta", timeout=int(timeout_s * 1000), **{key: client})

    def open_client(self, url: str) -> Any:
        import httpx  # the SDK's own HTTP client

        genai, _, _ = gemini_sdk()
        http = httpx.AsyncClient(event_hooks={"response": [check_redirect]}, timeout=self.options.timeout)
        client = genai.Client(api_key=self._api_key, http_options=self.http_options(url, http, self.options.timeout))
        client._lenscap_http = http  # closed with it
        client._lenscap_url = url
        return client

    async def close_client(self, client: Any) -> None:
        client.close()  # the synchronous client the SDK made for itself, unused here
        await client.aio.aclose()
        await client._lenscap_http.aclose()

    def sync_client(self, url: str, timeout_s: float) -> Any:
        """A synchronous client (the check, the batch transport)."""
        import httpx  # the SDK's own HTTP client

        genai, _, _ = gemini_sdk()
        http = httpx.Client(event_hooks={"response": [check_redirect_sync]}, timeout=timeout_s)
        client = genai.Client(api_key=self._api_key, http_options=self.http_options(url, http, timeout_s))
        client._lenscap_http = http  # closed with it (close_sync_client)
        return client

    @staticmethod
    def close_sync_client(client: Any) -> None:
        client.close()
        client._lenscap_http.close()

    # -- checks -----------------------------------------------------------------------------------

    def check(self) -> None:
        """Ask every endpoint for the model (``GET /v1beta/models/MODEL``): a wrong URL, key or model fails
        here, once, not per sample."""
        import httpx  # the SDK's own HTTP client

        _, _, errors = gemini_sdk()
        timeout = min(self.options.timeout, 20.0)
        for url in self.base_urls:
            client = self.sync_client(url, timeout)
            try:
                bounded_call(
                    lambda c=client: c.models.get(model=self.model), timeout + 1.0, f"{url} did not answer within {timeout:g}s"
                )
            except errors.APIError as e:
                if e.code == 404:
                    raise BackendError(f"model {self.model!r}: {self.scrub(error_message(e))}") from None
                if _key_refused(e):
                    raise BackendError(self.key_problem(url, e)) from None
                # Other answers (a gateway without the models endpoint) still caption, as for --backend openai.
            except OffHostRedirect as e:
                raise BackendError(redirect_message(url, e)) from None
            except httpx.TransportError as e:
                raise BackendError(f"cannot reach {url}: {self.scrub(_describe(e))}") from None
            except ValueError as e:  # a 200 that is not JSON: a proxy's page
                raise BackendError(
                    f"{url} did not answer as the Gemini API does ({type(e).__name__}): is --base-url right?"
                ) from None
            finally:
                self.close_sync_client(client)

    def key_problem(self, url: str, e: Any) -> str:
        if e.code == 403 and "key" not in error_message(e).lower():
            return f"{url} denied access: {self.scrub(error_message(e))}"
        return f"{url} rejected the API key in ${self.options.api_key_env}: {self.scrub(error_message(e))}"

    # -- one request ------------------------------------------------------------------------------

    def build_body(self, request: CaptionRequest) -> tuple[dict[str, Any], int]:
        """The GenerateContentRequest (REST JSON, as a batch file holds it) for one image, and its
        estimated input tokens. Raises ``UnreadableImage``."""
        image = prepare_image(request.image, self.options.max_side)
        data = base64.b64encode(image.data).decode("ascii")
        parts = [{"text": request.instruction}, {"inlineData": {"mimeType": image.mime, "data": data}}]
        config: dict[str, Any] = {"maxOutputTokens": self.options.max_tokens}
        if self.options.temperature is not None:
            config["temperature"] = self.options.temperature
        if self.thinking_budget is not None:
            config["thinkingConfig"] = {"thinkingBudget": self.thinking_budget}
        body: dict[str, Any] = {"contents": [{"role": "user", "parts": parts}], "generationConfig": config}
        if request.system:
            body["systemInstruction"] = {"parts": [{"text": request.system}]}
        return body, self._input_estimate(image.width, image.height, request)

    def probe_body(self) -> dict[str, Any]:
        return {"contents": [{"role": "user", "parts": [{"text": "Reply with OK."}]}], "generationConfig": {"maxOutputTokens": 1}}

    async def send(self, client: Any, body: dict[str, Any]) -> Reply:
        """One generateContent; Google's errors as ``ApiError`` (a 429's RetryInfo delay as its retry-after,
        a refused key as a 401 whatever status Google gave it)."""
        import httpx  # the SDK's own HTTP client

        _, types, errors = gemini_sdk()
        config = dict(body.get("generationConfig") or {})
        if "systemInstruction" in body:
            config["systemInstruction"] = body["systemInstruction"]
        contents = [types.Content.model_validate(c) for c in body["contents"]]
        try:
            reply = await client.aio.models.generate_content(
                model=self.model, contents=contents, config=types.GenerateContentConfig.model_validate(config)
            )
        except errors.APIError as e:
            status = 401 if _key_refused(e) and e.code != 403 else e.code
            said = f"{e.status}: {error_message(e)}" if e.status else error_message(e)
            raise ApiError(said, status, retry_headers(e)) from None
        except httpx.TimeoutException:
            raise ApiError("timed out", kind="timeout") from None
        except OffHostRedirect as e:
            raise BackendError(redirect_message(client._lenscap_url, e)) from None
        except httpx.TransportError as e:
            raise ApiError(_describe(e), kind="connection") from None
        except ValueError as e:  # the SDK could not read the 200 (not JSON, not its shape)
            raise ApiError(f"malformed reply: {type(e).__name__}", kind="malformed") from None
        if not reply.candidates and not (reply.prompt_feedback and reply.prompt_feedback.block_reason):
            raise ApiError("malformed reply: no candidates", kind="malformed")
        return Reply({}, reply)

    def interpret(self, key: str, reply: Any, estimate: int) -> CaptionResult:
        """A GenerateContentResponse (the SDK's object) as a caption outcome, priced as Google bills it:
        the prompt's tokens as input, the candidate's and the thinking's as output."""
        return answer_of(self, key, reply, estimate)


def answer_of(backend: GeminiBackend, key: str, reply: Any, estimate: int) -> CaptionResult:
    """``GeminiBackend.interpret``: online replies and batch results lines alike."""
    usage = reply.usage_metadata
    in_tok = usage.prompt_token_count if usage and usage.prompt_token_count is not None else estimate
    candidate = reply.candidates[0] if reply.candidates else None
    parts = (candidate.content.parts or []) if candidate and candidate.content else []
    text = " ".join((p.text or "") for p in parts if not p.thought).strip()
    if usage and usage.candidates_token_count is not None:
        out_tok = usage.candidates_token_count + (usage.thoughts_token_count or 0)
    else:
        out_tok = text_tokens(text) if text else 0
    max_tokens = backend.options.max_tokens
    impossible = impossible_usage(in_tok, out_tok, estimate, max_tokens)
    if impossible:
        return CaptionResult(key, ERROR, error=f"impossible reply: {impossible}", cost_usd=backend.price(estimate, max_tokens))
    result = CaptionResult(key, OK, input_tokens=in_tok, output_tokens=out_tok, cost_usd=backend.price(in_tok, out_tok))
    blocked = reply.prompt_feedback.block_reason if reply.prompt_feedback else None
    finish = api_name(candidate.finish_reason) if candidate else None
    if blocked:
        message = f" ({reply.prompt_feedback.block_reason_message})" if reply.prompt_feedback.block_reason_message else ""
        result.status, result.error = REFUSED, f"refused: the prompt was blocked ({api_name(blocked)}){message}"
    elif finish in REFUSALS:
        result.status, result.error = REFUSED, f"refused: the reply was stopped ({finish})"
    elif finish == "MAX_TOKENS":
        result.status, result.error = TRUNCATED, f"reply cut at --max-tokens {max_tokens}: {text}"
    elif not text:
        result.status, result.error = ERROR, f"empty reply (finish reason {finish})"
    else:
        result.caption = " ".join(text.split())
    return result


def _key_given(variable: str) -> bool:
    return bool(os.environ.get(variable, "").strip() or os.environ.get(f"{variable}_FILE", "").strip())


def api_name(value: Any) -> str:
    """An SDK enum (or the string it could not map) by its API name."""
    return str(getattr(value, "value", value))


def error_message(e: Any) -> str:
    """What Google said (``error.message``), never empty."""
    return str(e.message or e.status or f"HTTP {e.code}")


def retry_headers(e: Any) -> dict[str, str]:
    """A 429's ``RetryInfo.retryDelay`` ("7s", "0.5s") as the ``retry-after`` the rate limiter reads;
    none when the error names no delay (the limiter then backs off on its own)."""
    body = e.details if isinstance(e.details, dict) else {}
    for detail in (body.get("error") or body).get("details") or []:
        if isinstance(detail, dict) and detail.get("@type") == _RETRY_INFO and detail.get("retryDelay"):
            return {"retry-after": str(detail["retryDelay"])}
    return {}


def _key_refused(e: Any) -> bool:
    """Google refuses a bad key with a 400 INVALID_ARGUMENT that says so, or a 401/403."""
    return e.code in (401, 403) or (e.code == 400 and "api key" in error_message(e).lower())
