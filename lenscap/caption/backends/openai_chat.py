"""``--backend openai``: any server that speaks OpenAI's chat-completions API, through the official
``openai`` client (OpenAI, Azure OpenAI's v1 endpoint, vLLM, Ollama, LM Studio, ...).

The request-by-request machinery (rate limits, retries, the outage breaker) is every API backend's
(``api_chat.ApiChatBackend``); this module says what is OpenAI's: the chat-completions body, the
reply's choices and usage, its finish reasons, the ``/models`` check.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

from lenscap.caption.backends.api_chat import (
    REFUSAL_RE,
    ApiChatBackend,
    ApiError,
    ApiOptions,
    Reply,
    _describe,
    _message,
    check_endpoint,
    resolve_api_key,
    sdk_error,
)
from lenscap.caption.backends.api_guards import (
    check_models,
    check_redirect,
    check_redirect_sync,
)
from lenscap.caption.backends.base import (
    API_PANEL,
    ERROR,
    MODEL_PANEL,
    REFUSED,
    TRUNCATED,
    CaptionRequest,
    CaptionResult,
    Option,
)
from lenscap.caption.image_prep import prepare_image

__all__ = ["OpenAIChatBackend", "OpenAIOptions", "COMMON_OPTIONS", "DEFAULT_MODEL", "resolve_api_key", "_message", "_describe"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4.1-mini"  # caption's default model; estimate's too
_REASONING_RE = re.compile(r"^(o\d|gpt-5)")

COMMON_OPTIONS = (
    Option("model", str, DEFAULT_MODEL, "Model: name on the server, hub id or local directory.", panel=MODEL_PANEL),
    Option(
        "base_url",
        str,
        [],
        "API base URL; repeat for a pool of deployments.",
        repeated=True,
        panel=API_PANEL,
        default_text="$OPENAI_BASE_URL or OpenAI",
    ),
    Option(
        "api_key_env",
        str,
        "OPENAI_API_KEY",
        "Name of the environment variable holding the API key (not the key); NAME_FILE may name a file holding it.",
        panel=API_PANEL,
    ),
    Option("max_tokens", int, 300, "Most output tokens per caption.", panel=MODEL_PANEL),
    Option("temperature", float, None, "Sampling temperature.", panel=MODEL_PANEL, default_text="the server's"),
    Option("detail", str, "low", "Image detail.", choices=("low", "high", "auto"), panel=API_PANEL),
    Option("max_side", int, 512, "Longest image side in pixels, after downscaling, that the model sees.", panel=MODEL_PANEL),
    Option(
        "timeout",
        float,
        60.0,
        "Seconds one request may take in all: connecting, sending and the whole reply.",
        panel=API_PANEL,
    ),
    Option("prices", str, None, "JSON or TOML price file (USD per 1M tokens) over the built-in table.", panel=API_PANEL),
)
ONLINE_OPTIONS = (
    Option(
        "rpm",
        float,
        None,
        "Requests per minute per endpoint.",
        panel=API_PANEL,
        default_text="from the server's rate-limit headers",
    ),
    Option(
        "tpm",
        float,
        None,
        "Tokens per minute per endpoint.",
        panel=API_PANEL,
        default_text="from the server's rate-limit headers",
    ),
    Option("concurrency", int, 32, "Requests in flight per process.", panel=API_PANEL),
    Option(
        "max_retries",
        int,
        5,
        "Retries per request on 429, 5xx, timeouts, connection errors, malformed replies (batch backends: rounds of new batches).",
        panel=API_PANEL,
    ),
    Option(
        "outage_timeout",
        float,
        300.0,
        "Seconds every endpoint may fail every request before the run stops (exit 1), "
        "leaving the unanswered samples for the rerun.",
        panel=API_PANEL,
    ),
)


OpenAIOptions = ApiOptions  # its old name


class OpenAIChatBackend(ApiChatBackend):
    """Any OpenAI-compatible chat-completions server (OpenAI, Azure, vLLM serve, Ollama), request by request."""

    name = "openai"
    options = COMMON_OPTIONS + ONLINE_OPTIONS
    default_base_url = DEFAULT_BASE_URL
    base_url_variable = "OPENAI_BASE_URL"

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "detail": self.options.detail}  # only OpenAI's models take a detail

    def check(self) -> None:
        """Reach every endpoint once (``GET /models``): a wrong URL or key fails here, not per sample."""
        import openai  # the SDK takes about a second to import: only where a request is made

        for url in self.base_urls:
            client = openai.OpenAI(
                base_url=url,
                api_key=self._api_key,
                max_retries=1,
                timeout=min(self.options.timeout, 20.0),
                http_client=openai.DefaultHttpxClient(event_hooks={"response": [check_redirect_sync]}),
            )
            try:
                check_endpoint(openai, url, partial(check_models, client, url, min(self.options.timeout, 20.0)), self, "/models")
            finally:
                client.close()

    # -- one request ----------------------------------------------------------------------------

    def open_client(self, url: str) -> Any:
        import openai  # the SDK takes about a second to import: only where a request is made

        return openai.AsyncOpenAI(
            base_url=url,
            api_key=self._api_key,
            max_retries=0,
            timeout=self.options.timeout,
            http_client=openai.DefaultAsyncHttpxClient(event_hooks={"response": [check_redirect]}),
        )

    async def send(self, client: Any, body: dict[str, Any]) -> Reply:
        import openai  # the SDK takes about a second to import: only where a request is made

        try:
            raw = await client.chat.completions.with_raw_response.create(**body)
            completion = raw.parse()
        except (openai.APIError, ValueError) as e:
            raise sdk_error(openai, e, str(client.base_url).rstrip("/")) from None
        if not getattr(completion, "choices", None) or completion.choices[0].message is None:
            raise ApiError("malformed reply: no choices", headers=raw.headers, kind="malformed")
        return Reply(raw.headers, completion)

    def probe_body(self) -> dict[str, Any]:
        limit_name = "max_completion_tokens" if _REASONING_RE.match(self.model) else "max_tokens"
        return {"model": self.model, "messages": [{"role": "user", "content": "Reply with OK."}], limit_name: 1}

    def build_body(self, request: CaptionRequest) -> tuple[dict[str, Any], int]:
        """The chat-completions request body for one image, and its estimated input tokens.
        Raises ``UnreadableImage``. Shared with the batch backends, which write it to a file."""
        image = prepare_image(request.image, self.options.max_side)
        content: list[dict[str, Any]] = [
            {"type": "text", "text": request.instruction},
            {"type": "image_url", "image_url": {"url": image.data_url(), "detail": self.options.detail}},
        ]
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        if request.system:
            messages.insert(0, {"role": "system", "content": request.system})
        # Reasoning models take only max_completion_tokens; other servers (vLLM, Ollama) know max_tokens.
        limit_name = "max_completion_tokens" if _REASONING_RE.match(self.model) else "max_tokens"
        body: dict[str, Any] = {"model": self.model, "messages": messages, limit_name: self.options.max_tokens}
        if self.options.temperature is not None:
            body["temperature"] = self.options.temperature
        return body, self._input_estimate(image.width, image.height, request)

    def interpret(self, key: str, completion: Any, estimate: int) -> CaptionResult:
        """A chat completion (the SDK's object) as a caption outcome, priced."""
        choice = completion.choices[0]
        message = choice.message
        usage = getattr(completion, "usage", None)
        text = (message.content or "").strip() if isinstance(message.content, str) else ""
        result = self.usage_result(
            key,
            getattr(usage, "prompt_tokens", None) if usage else None,
            getattr(usage, "completion_tokens", None) if usage else None,
            estimate,
            text,
        )
        if result.status == ERROR:
            return result
        refusal = getattr(message, "refusal", None)
        if refusal:
            result.status, result.error = REFUSED, f"refused: {refusal}"
        elif choice.finish_reason == "content_filter":
            result.status, result.error = REFUSED, "refused: the server's content filter stopped the reply"
        elif choice.finish_reason == "length":
            result.status = TRUNCATED
            result.error = f"reply cut at --max-tokens {self.options.max_tokens}: {text}"
        elif not text:
            result.status, result.error = ERROR, "empty reply"
        elif REFUSAL_RE.match(text) and len(text.split()) < 40:
            result.status, result.error = REFUSED, f"refused: {text}"
        else:
            result.caption = " ".join(text.split())
        return result
