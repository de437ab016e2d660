"""``--backend openai``: any server that speaks OpenAI's chat-completions API, through the official
``openai`` client (OpenAI, Azure OpenAI's v1 endpoint, vLLM, Ollama, LM Studio, ...).

One asyncio pool per shard: ``concurrency`` requests in flight, each first admitted by its
endpoint's rate limiter. The SDK's own retries are off; ours (tenacity) retry 429s, 5xx, timeouts,
dropped connections and malformed replies with exponential backoff and jitter, and a 429 pauses
every request to that endpoint for the server's ``retry-after``. After the last attempt the sample
gets ``caption_status=error`` and the message. Problems with the job itself (key rejected, model
unknown, server unreachable) stop the run with one message instead.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from lenscap.caption.backends.api_guards import (
    OffHostRedirect,
    check_models,
    check_redirect,
    check_redirect_sync,
    public_url,
    redirect_message,
)
from lenscap.caption.backends.base import (
    API_PANEL,
    ERROR,
    MODEL_PANEL,
    OK,
    REFUSED,
    TRUNCATED,
    CaptionBackend,
    CaptionRequest,
    CaptionResult,
    Option,
)
from lenscap.caption.cluster_limits import start_account_limits
from lenscap.caption.image_prep import UnreadableImage, prepare_image
from lenscap.caption.pricing import PriceTable, image_tokens, text_tokens
from lenscap.caption.ratelimit import EndpointLimiter
from lenscap.core.errors import BackendError, LenscapError, Outage, UsageError
from lenscap.core.executors import RayExecutor

if TYPE_CHECKING:
    from lenscap.core.executors import Executor

__all__ = ["OpenAIChatBackend", "OpenAIOptions", "COMMON_OPTIONS", "DEFAULT_MODEL"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4.1-mini"  # caption's default model; estimate's too
DETAILS = ("low", "high", "auto")
# The model answered, but with a refusal instead of a caption (when the API does not flag it).
_REFUSAL_RE = re.compile(r"^\s*(I'm sorry|I am sorry|Sorry,|I can(no|')t|I'm unable|I am unable|I won't)\b", re.IGNORECASE)
_REASONING_RE = re.compile(r"^(o\d|gpt-5)")
# The same server error this many times before any success means the job is wrong (an unsupported
# parameter, an unknown model, a server failing every request), not the images: stop instead of
# marking every sample failed.
_BREAKER_THRESHOLD = 5
# Server-side failures in a row, with no success between, after which an endpoint counts as down:
# traffic moves to the others, and when all are down, requests wait and probe one at a time.
_OUTAGE_AFTER = 5
# The most input tokens a reply may claim for one image request: generous over our estimate (a model
# may count an image in many more tokens than OpenAI's formula), far under what a lying or broken
# server would bill (negative or billions: an error, never a price).
_INPUT_SLACK, _INPUT_EXTRA = 8, 32_768
# Output tokens a reply may claim over --max-tokens (a server that counts a stop token or two).
_OUTPUT_EXTRA = 64


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


@dataclass
class OpenAIOptions:
    model: str
    base_urls: list[str] = field(default_factory=list)
    api_key_env: str = "OPENAI_API_KEY"
    max_tokens: int = 300
    temperature: float | None = None
    detail: str = "low"
    max_side: int = 512
    rpm: float | None = None
    tpm: float | None = None
    concurrency: int = 32
    timeout: float = 60.0
    max_retries: int = 5
    outage_timeout: float = 300.0
    process_share: float = 1.0  # this process's part of the limits when several processes share them
    prices: PriceTable = field(default_factory=PriceTable)

    def validate(self) -> None:
        if not self.model:
            raise UsageError("--model is required for the openai backend")
        if self.detail not in DETAILS:
            raise UsageError(f"--detail must be one of {', '.join(DETAILS)}, not {self.detail!r}")
        for name, value, low in (
            ("--max-tokens", self.max_tokens, 1),
            ("--max-side", self.max_side, 16),
            ("--concurrency", self.concurrency, 1),
            ("--max-retries", self.max_retries, 0),
        ):
            if value < low:
                raise UsageError(f"{name} must be at least {low}, not {value}")
        for name, value in (
            ("--rpm", self.rpm),
            ("--tpm", self.tpm),
            ("--timeout", self.timeout),
            ("--outage-timeout", self.outage_timeout),
        ):
            if value is not None and value <= 0:
                raise UsageError(f"{name} must be positive, not {value}")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise UsageError(f"--temperature must be between 0 and 2, not {self.temperature}")
        for url in self.base_urls:
            parsed = urlparse(url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise UsageError(f"--base-url {url!r} is not an http(s) URL")


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(env_name: str, base_urls: list[str]) -> str:
    """The key from the named variable, else from the file that ``${env_name}_FILE`` names: cron and
    containers keep a key in a file (mode 600) so that it is in no crontab, shell history or process
    list. A server on this machine (vLLM, Ollama) needs none."""
    key = os.environ.get(env_name, "").strip()
    if key:
        return key
    key_file = os.environ.get(f"{env_name}_FILE", "").strip()
    if key_file:
        return _key_from_file(f"{env_name}_FILE", key_file)
    if base_urls and all(_is_loopback(u) for u in base_urls):
        return "no-key"
    raise BackendError(
        f"no API key: set the environment variable {env_name}, or {env_name}_FILE to a file holding it "
        "(or name another variable with --api-key-env)"
    )


def _key_from_file(variable: str, path: str) -> str:
    """The key a file holds, its surrounding whitespace removed; what goes wrong names the file, never the key."""
    try:
        key = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise BackendError(f"${variable} names {path}, which cannot be read: {getattr(e, 'strerror', None) or e}") from None
    if not key:
        raise BackendError(f"${variable} names {path}, which is empty")
    if any(c.isspace() for c in key) or key.startswith(variable.removesuffix("_FILE") + "="):
        raise BackendError(f"${variable} names {path}, which must hold the key alone (not NAME=KEY, one line)")
    return key


class MalformedReply(Exception):
    """A 200 whose body is not a usable chat completion."""


class _TookTooLong(Exception):
    """A request that took longer than --timeout in all (a server that answers a byte at a time)."""


class _Endpoint:
    def __init__(self, url: str, limiter: EndpointLimiter) -> None:
        self.url = url
        self.limiter = limiter
        self.client: Any = None
        self.failures = 0  # server-side failures (5xx, timeouts, dropped connections) since its last success

    @property
    def down(self) -> bool:
        return self.failures >= _OUTAGE_AFTER

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "client": None}  # opened per shard, in the worker


class OpenAIChatBackend(CaptionBackend):
    """Any OpenAI-compatible chat-completions server (OpenAI, Azure, vLLM serve, Ollama), request by request."""

    name = "openai"
    needs_key = True
    priced = True
    options = COMMON_OPTIONS + ONLINE_OPTIONS
    batch_priced = False  # the Batch API bills half

    @classmethod
    def from_options(cls, values: dict[str, Any]) -> OpenAIChatBackend:
        v = cls.parse_options(values)
        fields = OpenAIOptions.__dataclass_fields__
        kwargs = {k: v[k] for k in v if k in fields and k not in ("prices", "base_urls")}
        return cls(OpenAIOptions(**kwargs, base_urls=list(v.get("base_url") or []), prices=PriceTable.load(v.get("prices"))))

    def set_processes(self, processes: int) -> None:
        self.options.process_share = 1.0 / max(1, processes)
        for ep in self.endpoints:
            for bucket in (ep.limiter.requests, ep.limiter.tokens):
                bucket.share = self.options.process_share

    def share_limits(self, executor: Executor) -> None:
        """On a Ray cluster every worker takes its turns from one actor holding the account's limits,
        so nothing is split (``--processes`` does not apply) and an idle worker's part goes to the others."""
        if not isinstance(executor, RayExecutor):
            for ep in self.endpoints:
                ep.limiter.use_account(None, "")
            return
        account = start_account_limits(
            executor.connect(), {ep.url: (self.options.rpm, self.options.tpm) for ep in self.endpoints}
        )
        self.set_processes(1)
        for ep in self.endpoints:
            ep.limiter.use_account(account, ep.url)

    def has_price(self) -> bool:
        return self.options.prices.price(self.model) is not None

    def __init__(self, options: OpenAIOptions) -> None:
        options.validate()
        self.options = options
        self.model = options.model
        urls = options.base_urls or [self.default_base_url()]
        self.base_urls = [u.rstrip("/") for u in urls]
        self._api_key = self.resolve_key() if self.needs_key else "no-key"
        self.endpoints = [_Endpoint(u, EndpointLimiter(options.rpm, options.tpm, options.process_share)) for u in self.base_urls]
        self._new_run()

    # -- what another provider's backend replaces (gemini.py) ----------------------------------

    def default_base_url(self) -> str:
        """The API's address when no --base-url is given."""
        return os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL

    def resolve_key(self) -> str:
        """The API key, from the variable --api-key-env names (or the file its ``_FILE`` twin names)."""
        return resolve_api_key(self.options.api_key_env, self.base_urls)

    def open_client(self, url: str) -> Any:
        """The asynchronous SDK client of one endpoint, opened per shard in the worker."""
        import openai  # the SDK takes about a second to import: only where a request is made

        return openai.AsyncOpenAI(
            base_url=url,
            api_key=self._api_key,
            max_retries=0,
            timeout=self.options.timeout,
            http_client=openai.DefaultAsyncHttpxClient(event_hooks={"response": [check_redirect]}),
        )

    async def close_client(self, client: Any) -> None:
        await client.close()

    def probe_body(self) -> dict[str, Any]:
        """The cheapest request the server can answer: a one-token text request (``_server_answers``)."""
        limit_name = "max_completion_tokens" if _REASONING_RE.match(self.model) else "max_tokens"
        return {"model": self.model, "messages": [{"role": "user", "content": "Reply with OK."}], limit_name: 1}

    # -- description ----------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        o = self.options
        return {
            "backend": self.name,
            "model": o.model,
            "max_tokens": o.max_tokens,
            "temperature": o.temperature,
            "detail": o.detail,
            "max_side": o.max_side,
        }

    def parameters(self) -> dict[str, Any]:
        o = self.options
        hosts = [public_url(u) for u in self.base_urls]
        return {
            **self.identity(),
            "base_urls": hosts,
            "key_variable": o.api_key_env,
            "rpm": o.rpm,
            "tpm": o.tpm,
            "concurrency": o.concurrency,
            "timeout": o.timeout,
            "max_retries": o.max_retries,
        }

    def scrub(self, text: str) -> str:
        """Error text as shown to users: never the key, even if a server echoes it."""
        return text.replace(self._api_key, "***") if self._api_key and self._api_key != "no-key" else text

    # -- costs ----------------------------------------------------------------------------------

    def _fit(self, width: int, height: int) -> tuple[int, int]:
        s = min(1.0, self.options.max_side / max(width, height, 1))
        return max(1, round(width * s)), max(1, round(height * s))

    def _input_estimate(self, width: int, height: int, request: CaptionRequest) -> int:
        text = text_tokens(request.instruction) + (text_tokens(request.system) if request.system else 0)
        return text + image_tokens(self.model, *self._fit(width, height), self.options.detail)

    def estimate_cost(self, width: int, height: int, request: CaptionRequest) -> float:
        return self.price(self._input_estimate(width, height, request), self.options.max_tokens) or 0.0

    def price(self, input_tokens: int, output_tokens: int) -> float | None:
        """USD for this usage, or None when the model's price is unknown."""
        return self.options.prices.cost(self.model, input_tokens, output_tokens, batch=self.batch_priced)

    # -- checks ---------------------------------------------------------------------------------

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
                check_models(client, url, min(self.options.timeout, 20.0))
            except openai.AuthenticationError as e:
                raise BackendError(
                    f"{url} rejected the API key in ${self.options.api_key_env}: {self.scrub(_message(e))}"
                ) from None
            except openai.PermissionDeniedError as e:
                raise BackendError(f"{url} denied access: {self.scrub(_message(e))}") from None
            except openai.APIConnectionError as e:
                cause = e.__cause__ or e
                if isinstance(cause, OffHostRedirect):
                    raise BackendError(redirect_message(url, cause)) from None
                raise BackendError(f"cannot reach {url}: {self.scrub(str(cause) or type(cause).__name__)}") from None
            except OffHostRedirect as e:
                raise BackendError(redirect_message(url, e)) from None
            except openai.APIStatusError:
                pass  # servers without /models (or a proxy in front) still caption
            finally:
                client.close()

    # -- captioning -----------------------------------------------------------------------------

    def caption_all(self, requests: Iterable[CaptionRequest], on_result: Callable[[CaptionResult], None]) -> None:
        try:
            asyncio.run(self._run(iter(requests), on_result))
        except BaseExceptionGroup as group:
            # A fatal backend error in one task cancels the others; report it, not the group.
            fatal = [e for e in _leaves(group) if isinstance(e, LenscapError)]
            if fatal:
                raise fatal[0] from None
            raise next(iter(_leaves(group))) from None

    async def _run(self, requests: Iterator[CaptionRequest], on_result: Callable[[CaptionResult], None]) -> None:
        for ep in self.endpoints:
            ep.client = self.open_client(ep.url)
        self._probe = asyncio.Lock()
        breaker = _FirstErrorsBreaker(on_result, self._run_state)
        try:

            async def worker() -> None:
                for request in requests:  # pulled lazily, shared by all workers (one thread: no lock needed)
                    breaker.report(await self._caption_one(request), request)

            async with asyncio.TaskGroup() as tg:
                for _ in range(self.options.concurrency):
                    tg.create_task(worker())
            if breaker.held:
                await self._settle_held(breaker)
        finally:
            for ep in self.endpoints:
                await self.close_client(ep.client)

    def setup(self) -> None:
        self._new_run()

    def answered_before(self) -> None:
        self._answered_before = True

    def _new_run(self) -> None:
        """What the run learns about the server lives for the run (every shard of this worker), not one
        shard: a storm that starts at a shard boundary is still an outage of a server that answered
        (in this run, or in an earlier one into the same output)."""
        self._run_state = _RunState(time.monotonic(), getattr(self, "_answered_before", False))
        for ep in self.endpoints:
            ep.failures = 0

    @property
    def _answered(self) -> bool:
        return self._run_state.answered

    async def _settle_held(self, breaker: _FirstErrorsBreaker) -> None:
        """The shard's last errors, with no answer from the server since they came, are not yet the
        samples' own: each is asked once more. Those that fail again are recorded only if the server
        then answers a probe (a one-token text request, waiting out an outage for up to
        --outage-timeout); if it does not, the run stops (``Outage``) and the rerun asks them."""
        held = breaker.take_held()
        room = asyncio.Semaphore(self.options.concurrency)

        async def ask_again(request: CaptionRequest) -> CaptionResult:
            async with room:
                return await self._caption_one(request, wait_out_outage=False)

        for again, (_, request) in zip(await asyncio.gather(*(ask_again(request) for _, request in held)), held, strict=True):
            breaker.report(again, request)
        if breaker.held and not await self._server_answers():
            raise Outage(
                f"the server failed the last {len(breaker.held)} request(s) of a shard, again when asked once more, and "
                f"answers no probe (last: {self.scrub(breaker.held[-1][0].error or '')}); nothing was recorded for "
                "them: rerun to ask them"
            )
        breaker.flush()

    async def _server_answers(self) -> bool:
        """Whether the server answers a chat request now: a one-token text request (any HTTP answer but a
        server error counts), waiting out an outage as any request does."""
        body = self.probe_body()
        # A flaky server (four errors, then an answer) may fail one probe's attempts: probe again until it
        # answers or has been silent for --outage-timeout, as a request waiting out an outage would.
        while True:
            try:
                await self._call(body, 16)
            except _SampleError as e:
                if not e.transient:
                    return True
                if time.monotonic() - self._run_state.last_success > self.options.outage_timeout:
                    return False
                await asyncio.sleep(1.0)
                continue
            return True

    def _pick(self, tokens: float) -> _Endpoint:
        if len(self.endpoints) == 1:
            return self.endpoints[0]
        healthy = [ep for ep in self.endpoints if not ep.down] or self.endpoints
        return min(healthy, key=lambda ep: ep.limiter.expected_wait(tokens))

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

    async def _caption_one(self, request: CaptionRequest, wait_out_outage: bool = True) -> CaptionResult:
        try:
            body, estimate = self.build_body(request)
        except UnreadableImage as e:
            return CaptionResult(request.key, ERROR, error=str(e))
        try:
            completion = await self._call(body, estimate + self.options.max_tokens, wait_out_outage)
        except _SampleError as e:
            return CaptionResult(request.key, ERROR, error=self.scrub(str(e)))
        return self.interpret(request.key, completion, estimate)

    async def _call(self, kwargs: dict[str, Any], tokens: float, wait_out_outage: bool = True) -> Any:
        """One completion, with retries. When every endpoint is down after answering earlier in the run
        (an outage, not this image; a server that never answered is the breaker's), the request waits
        and is sent again, one request at a time as a probe, until an endpoint answers or
        ``--outage-timeout`` has passed since the last success: then ``Outage`` stops the run, and no
        sample that the outage failed is recorded as an error."""
        while True:
            try:
                return await self._attempts(kwargs, tokens)
            except _SampleError as e:
                if not (wait_out_outage and e.transient and self._answered and all(ep.down for ep in self.endpoints)):
                    raise
                failed = e
            async with self._probe:  # one probe at a time while down; the others queue behind it
                down_for = time.monotonic() - self._run_state.last_success
                if down_for > self.options.outage_timeout:
                    raise Outage(
                        f"no caption endpoint has answered for {down_for:.0f}s (last: {self.scrub(str(failed))}); "
                        "the run stopped, and the samples left unanswered are asked on the rerun"
                    ) from None
                if all(ep.down for ep in self.endpoints):
                    await asyncio.sleep(min(30.0, max(1.0, down_for / 8)))
                    try:
                        return await self._attempts(kwargs, tokens)
                    except _SampleError as e:
                        if not e.transient:
                            raise
                        failed = e

    async def _attempts(self, kwargs: dict[str, Any], tokens: float) -> Any:
        import openai  # the SDK takes about a second to import: only where a request is made

        backoff = wait_exponential_jitter(initial=0.5, max=30.0)

        def wait(state: Any) -> float:
            # After a 429 the endpoint's limiter already holds every request for retry-after.
            exc = state.outcome.exception() if state.outcome else None
            return 0.0 if isinstance(exc, openai.RateLimitError) else backoff(state)

        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.options.max_retries + 1),
                retry=retry_if_exception(_retryable),
                wait=wait,
                reraise=True,
            ):
                with attempt:
                    ep = self._pick(tokens)
                    await ep.limiter.acquire(tokens)
                    sent = time.monotonic()
                    try:
                        raw = await self._send(ep, kwargs)
                    except openai.RateLimitError as e:
                        # A storm of 429s is the server's failure too: an endpoint refusing everything is down.
                        ep.failures += 1
                        ep.limiter.on_rate_limited(e.response.headers, backoff(attempt.retry_state), time.monotonic() - sent)
                        raise
                    except openai.APIStatusError as e:
                        ep.limiter.observe(e.response.headers, time.monotonic() - sent)
                        if e.status_code >= 500:
                            ep.failures += 1
                        raise
                    except (openai.APIConnectionError, openai.APITimeoutError, _TookTooLong) as e:
                        if isinstance(e.__cause__, OffHostRedirect):
                            raise BackendError(redirect_message(ep.url, e.__cause__)) from None
                        ep.failures += 1
                        raise
                    finally:
                        ep.limiter.learned()  # a failed probe must not hold the others forever
                    ep.limiter.observe(raw.headers, time.monotonic() - sent)
                    try:
                        completion = raw.parse()
                    except (ValueError, openai.APIResponseValidationError) as e:
                        raise MalformedReply(f"malformed reply: {e}") from None
                    if not getattr(completion, "choices", None) or completion.choices[0].message is None:
                        raise MalformedReply("malformed reply: no choices")
                    ep.failures = 0
                    self._run_state.last_success = time.monotonic()
                    self._run_state.answered = True
                    return completion
        except openai.AuthenticationError as e:
            raise BackendError(
                f"the server rejected the API key in ${self.options.api_key_env}: {self.scrub(_message(e))}"
            ) from None
        except openai.PermissionDeniedError as e:
            raise BackendError(f"permission denied: {self.scrub(_message(e))}") from None
        except openai.NotFoundError as e:
            raise BackendError(f"model {self.model!r}: {self.scrub(_message(e))}") from None
        except openai.APIStatusError as e:
            raise _SampleError(
                f"HTTP {e.status_code}: {_message(e)}",
                bad_request=e.status_code in (400, 422),
                transient=e.status_code >= 500 or e.status_code == 429,
            ) from None
        except (openai.APITimeoutError, _TookTooLong):
            raise _SampleError(
                f"timed out after {self.options.timeout:g}s ({self.options.max_retries + 1} attempts)", transient=True
            ) from None
        except openai.APIConnectionError as e:
            raise _SampleError(
                f"connection failed ({self.options.max_retries + 1} attempts): {_describe(e.__cause__ or e)}", transient=True
            ) from None
        except MalformedReply as e:
            raise _SampleError(f"{e} ({self.options.max_retries + 1} attempts)") from None
        raise AssertionError("unreachable")

    async def _send(self, ep: _Endpoint, kwargs: dict[str, Any]) -> Any:
        """One request, bounded in all by --timeout: the SDK's timeout bounds each read, and a server that
        sends a byte at a time would keep a request going for ever."""
        try:
            # A little over --timeout: a slow read is the SDK's own timeout (which closes the connection
            # cleanly); this one ends only a reply that keeps arriving, slowly.
            async with asyncio.timeout(self.options.timeout + 0.25):
                return await ep.client.chat.completions.with_raw_response.create(**kwargs)
        except TimeoutError:
            raise _TookTooLong() from None
        except OffHostRedirect as e:
            raise BackendError(redirect_message(ep.url, e)) from None

    def interpret(self, key: str, completion: Any, estimate: int) -> CaptionResult:
        """A chat completion (the SDK's object) as a caption outcome, priced. Token counts the request
        cannot have used (negative, or far over what it sent and --max-tokens) make it an error whose cost
        is the worst case reserved for it: a reply's word is not a price."""
        choice = completion.choices[0]
        message = choice.message
        usage = getattr(completion, "usage", None)
        in_tok = getattr(usage, "prompt_tokens", None) if usage else None
        out_tok = getattr(usage, "completion_tokens", None) if usage else None
        text = (message.content or "").strip() if isinstance(message.content, str) else ""
        if in_tok is None:
            in_tok = estimate
        if out_tok is None:
            out_tok = text_tokens(text)
        impossible = _impossible_usage(in_tok, out_tok, estimate, self.options.max_tokens)
        if impossible:
            worst = self.price(estimate, self.options.max_tokens)
            # Not "malformed reply" (the server's failure, held and asked again): it answered, and billed.
            return CaptionResult(key, ERROR, error=f"impossible reply: {impossible}", cost_usd=worst)
        cost = self.price(in_tok, out_tok)
        result = CaptionResult(key, OK, input_tokens=in_tok, output_tokens=out_tok, cost_usd=cost)
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
        elif _REFUSAL_RE.match(text) and len(text.split()) < 40:
            result.status, result.error = REFUSED, f"refused: {text}"
        else:
            result.caption = " ".join(text.split())
        return result


class _SampleError(Exception):
    def __init__(self, message: str, bad_request: bool = False, transient: bool = False) -> None:
        super().__init__(message)
        self.bad_request = bad_request
        self.transient = transient  # the server's failure (5xx, timeout, connection), not the request's


@dataclass
class _RunState:
    """What one worker's run has learned of the server, kept across its shards."""

    last_success: float  # when an endpoint last answered (or the run began)
    answered: bool = False  # before any answer, failures are the job's (the breaker), not an outage


class _FirstErrorsBreaker:
    """Holds the server's errors until the next success: only an answer after them shows that the
    server is up and the error was the sample's own. Until then they are not recorded, so a run that
    stops (an ``Outage``) leaves those samples for the rerun. The same error five times before any
    success in the run is the job's problem (an unsupported parameter, a model the server does not
    have, a server that fails every request), not five images' problems: the run stops with it."""

    def __init__(self, on_result: Callable[[CaptionResult], None], run: _RunState) -> None:
        self.on_result = on_result
        self.held: list[tuple[CaptionResult, CaptionRequest]] = []
        self.run = run

    def report(self, result: CaptionResult, request: CaptionRequest) -> None:
        error = result.error or ""
        if result.status == ERROR and _server_error(error):
            # Not even an answer to another request during this one's attempts shows the server up when
            # this one failed: only an answer after it does.
            self.held.append((result, request))
            errors = {r.error for r, _ in self.held}
            if not self.run.answered and len(self.held) >= _BREAKER_THRESHOLD and len(errors) == 1:
                raise BackendError(
                    f"the server failed the first {len(self.held)} requests with: {error}; "
                    "nothing was recorded for them: fix the job (or wait for the server) and rerun"
                )
            return
        if result.status != ERROR:
            self.run.answered = True
            self.flush()
        self.on_result(result)

    def take_held(self) -> list[tuple[CaptionResult, CaptionRequest]]:
        held, self.held = self.held, []
        return held

    def flush(self) -> None:
        for r, _ in self.take_held():
            self.on_result(r)


def _server_error(error: str) -> bool:
    """An error the server (or the way to it) gave, not one of the image's own (a 400 about the image)."""
    if error.startswith("HTTP "):
        return "image" not in error.lower()
    return error.startswith(("timed out", "connection failed", "malformed reply"))


def _impossible_usage(in_tok: Any, out_tok: Any, estimate: int, max_tokens: int) -> str | None:
    """Why a reply's token counts cannot be true for the request sent, or None."""
    if not isinstance(in_tok, int) or not isinstance(out_tok, int) or in_tok < 0 or out_tok < 0:
        return f"the server reported impossible token counts ({in_tok!r} input, {out_tok!r} output)"
    if in_tok > _INPUT_SLACK * estimate + _INPUT_EXTRA or out_tok > max_tokens + _OUTPUT_EXTRA:
        return (
            f"the server reported {in_tok} input and {out_tok} output tokens for a request of about {estimate} "
            f"input tokens and at most {max_tokens} output tokens"
        )
    return None


def _message(e: Any) -> str:
    """What the server said, from the body shapes servers use: OpenAI's ``error.message``, a bare
    ``message`` or ``error`` string, FastAPI's ``detail`` (a string, or a list of ``msg``); never empty."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str) and inner:
            return inner
        if body.get("message"):
            return str(body["message"])
        detail = body.get("detail")
        if isinstance(detail, str) and detail:
            return detail
        if isinstance(detail, list) and detail:
            return "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
    text = str(getattr(e, "message", None) or e)
    if text.startswith("Error code: ") and isinstance(body, str) and body.strip():
        return body.strip()[:300]  # a body that is not JSON: its text, not the SDK's "Error code: 400"
    return text or _describe(e)


def _describe(e: BaseException) -> str:
    """An exception as one line that says something: its text, else its type."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _retryable(e: BaseException) -> bool:
    import openai  # the SDK takes about a second to import: only where a request is made

    if isinstance(
        e, (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError, MalformedReply, _TookTooLong)
    ):
        return True
    return isinstance(e, openai.APIStatusError) and (e.status_code in (408, 409) or e.status_code >= 500)


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e
