"""What every hosted-API caption backend shares, whichever provider it talks to: the request-by-request
machinery of ``--backend openai`` and ``--backend anthropic`` (and any SDK-driven provider).

One asyncio pool per shard: ``concurrency`` requests in flight, each first admitted by its
endpoint's rate limiter. The SDK's own retries are off; ours (tenacity) retry 429s, 5xx, timeouts,
dropped connections and malformed replies with exponential backoff and jitter, and a 429 pauses
every request to that endpoint for the server's ``retry-after``. After the last attempt the sample
gets ``caption_status=error`` and the message. Problems with the job itself (key rejected, model
unknown, server unreachable) stop the run with one message instead. The outage breaker, the held
first errors and the probe are here too.

A provider's backend (``ApiChatBackend`` subclass) says only what differs: how a request body is
built (``build_body``), how a client is opened and one request sent (``open_client``, ``send``:
its SDK's failures become ``ApiError``, one type with an HTTP status), how a reply reads as a caption
(``interpret``), what its rate-limit headers say (``limit_headers``, in the limiter's names), the
probe request (``probe_body``) and the check before any work (``check``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlparse

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from lenscap.caption.backends.api_guards import OffHostRedirect, public_url, redirect_message
from lenscap.caption.backends.base import ERROR, OK, CaptionBackend, CaptionRequest, CaptionResult
from lenscap.caption.cluster_limits import start_account_limits
from lenscap.caption.image_prep import UnreadableImage
from lenscap.caption.pricing import PriceTable, image_tokens, text_tokens
from lenscap.caption.ratelimit import EndpointLimiter
from lenscap.core.errors import BackendError, LenscapError, Outage, UsageError
from lenscap.core.executors import RayExecutor

if TYPE_CHECKING:
    from lenscap.core.executors import Executor

__all__ = [
    "REFUSAL_RE",
    "ApiChatBackend",
    "check_endpoint",
    "ApiError",
    "ApiOptions",
    "Reply",
    "resolve_api_key",
    "sdk_error",
    "impossible_usage",
]

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

DETAILS = ("low", "high", "auto")
# The model answered, but with a refusal instead of a caption (when the API does not flag it).
REFUSAL_RE = re.compile(r"^\s*(I'm sorry|I am sorry|Sorry,|I can(no|')t|I'm unable|I am unable|I won't)\b", re.IGNORECASE)


@dataclass
class ApiOptions:
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
    output_tpm: float | None = None  # output tokens per minute, where the provider limits them apart (Anthropic)

    def validate(self, backend: str = "openai", max_temperature: float = 2.0) -> None:
        if not self.model:
            raise UsageError(f"--model is required for the {backend} backend")
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
        if self.temperature is not None and not 0 <= self.temperature <= max_temperature:
            raise UsageError(f"--temperature must be between 0 and {max_temperature:g}, not {self.temperature}")
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


class ApiError(Exception):
    """One failed exchange with a provider, whatever its SDK: the HTTP ``status`` (None for no answer),
    the provider's message, the response's headers, and ``kind``: ``status`` (an HTTP error), ``timeout``,
    ``connection`` (no answer) or ``malformed`` (a 200 whose body is not a usable reply)."""

    def __init__(
        self, message: str, status: int | None = None, headers: Mapping[str, str] | None = None, kind: str = "status"
    ) -> None:
        super().__init__(message)
        self.status, self.headers, self.kind = status, headers or {}, kind


@dataclass
class Reply:
    """A provider's answer: its headers (for the rate limiter) and its body (the SDK's object)."""

    headers: Mapping[str, str]
    body: Any


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


class ApiChatBackend(CaptionBackend):
    """A hosted API, request by request; a subclass is one provider (see the module's docstring)."""

    needs_key = True
    priced = True
    batch_priced = False  # the batch APIs bill half
    default_base_url: ClassVar[str]
    base_url_variable: ClassVar[str | None] = None  # the environment variable a base URL may come from
    max_temperature: ClassVar[float] = 2.0
    output_limited: ClassVar[bool] = False  # True: output tokens have a limit of their own (Anthropic)

    @classmethod
    def from_options(cls, values: dict[str, Any]) -> ApiChatBackend:
        v = cls.parse_options(values)
        fields = ApiOptions.__dataclass_fields__
        kwargs = {k: v[k] for k in v if k in fields and k not in ("prices", "base_urls")}
        return cls(ApiOptions(**kwargs, base_urls=list(v.get("base_url") or []), prices=PriceTable.load(v.get("prices"))))

    def set_processes(self, processes: int) -> None:
        self.options.process_share = 1.0 / max(1, processes)
        for ep in self.endpoints:
            for bucket in ep.limiter.buckets():
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

    def __init__(self, options: ApiOptions) -> None:
        options.validate(self.name, self.max_temperature)
        self.options = options
        self.model = options.model
        from_env = os.environ.get(self.base_url_variable) if self.base_url_variable else None
        urls = options.base_urls or [from_env or self.default_base_url]
        self.base_urls = [u.rstrip("/") for u in urls]
        self._api_key = self.resolve_key() if self.needs_key else "no-key"
        self.endpoints = [
            _Endpoint(u, EndpointLimiter(options.rpm, options.tpm, options.process_share, options.output_tpm))
            for u in self.base_urls
        ]
        self._new_run()

    def resolve_key(self) -> str:
        """The API key: ``--api-key-env``'s variable, or the file its ``_FILE`` twin names (a provider
        whose SDK reads more than one variable says which, in its order)."""
        return resolve_api_key(self.options.api_key_env, self.base_urls)

    # -- description ----------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        o = self.options
        return {
            "backend": self.name,
            "model": o.model,
            "max_tokens": o.max_tokens,
            "temperature": o.temperature,
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

    def usage_result(self, key: str, in_tok: Any, out_tok: Any, estimate: int, text: str) -> CaptionResult:
        """An answered request priced from the usage it reports (``ok``; the caller reads the reply's
        text and stop reason into it). Token counts the request cannot have used (negative, or far over
        what it sent and --max-tokens) make it an error whose cost is the worst case reserved for it: a
        reply's word is not a price."""
        in_tok = estimate if in_tok is None else in_tok
        out_tok = text_tokens(text) if out_tok is None else out_tok
        impossible = impossible_usage(in_tok, out_tok, estimate, self.options.max_tokens)
        if impossible:
            worst = self.price(estimate, self.options.max_tokens)
            # Not "malformed reply" (the server's failure, held and asked again): it answered, and billed.
            return CaptionResult(key, ERROR, error=f"impossible reply: {impossible}", cost_usd=worst)
        return CaptionResult(key, OK, input_tokens=in_tok, output_tokens=out_tok, cost_usd=self.price(in_tok, out_tok))

    # -- what a provider says ------------------------------------------------------------------

    @abstractmethod
    def open_client(self, url: str) -> Any:
        """The SDK's asynchronous client for one endpoint (its own retries off, ``--timeout``, redirects
        off the host refused with ``check_redirect``)."""

    async def close_client(self, client: Any) -> None:
        """Close what ``open_client`` opened."""
        await client.close()

    @abstractmethod
    async def send(self, client: Any, body: dict[str, Any]) -> Reply:
        """One request; every failure raised as ``ApiError`` (``BackendError`` for a redirect off the host)."""

    @abstractmethod
    def build_body(self, request: CaptionRequest) -> tuple[dict[str, Any], int]:
        """The request body for one image, and its estimated input tokens. Raises ``UnreadableImage``.
        Shared with the batch backends, which write it to a file."""

    @abstractmethod
    def interpret(self, key: str, reply: Any, estimate: int) -> CaptionResult:
        """A reply's body as a caption outcome, priced from the usage it reports."""

    @abstractmethod
    def probe_body(self) -> dict[str, Any]:
        """A one-token text request: whether the server answers at all."""

    def limit_headers(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """The response's rate-limit headers in the names the limiter reads (OpenAI's ``x-ratelimit-*``,
        ``retry-after``); a provider with its own names translates them."""
        return headers

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

    def _pick(self, tokens: float, output: float) -> _Endpoint:
        if len(self.endpoints) == 1:
            return self.endpoints[0]
        healthy = [ep for ep in self.endpoints if not ep.down] or self.endpoints
        return min(healthy, key=lambda ep: ep.limiter.expected_wait(tokens, output))

    async def _caption_one(self, request: CaptionRequest, wait_out_outage: bool = True) -> CaptionResult:
        try:
            body, estimate = self.build_body(request)
        except UnreadableImage as e:
            return CaptionResult(request.key, ERROR, error=str(e))
        try:
            if self.output_limited:  # input and output tokens are limited apart (Anthropic)
                reply = await self._call(body, estimate, wait_out_outage, output=self.options.max_tokens)
            else:
                reply = await self._call(body, estimate + self.options.max_tokens, wait_out_outage)
        except _SampleError as e:
            return CaptionResult(request.key, ERROR, error=self.scrub(str(e)))
        return self.interpret(request.key, reply, estimate)

    async def _call(self, body: dict[str, Any], tokens: float, wait_out_outage: bool = True, output: float = 0.0) -> Any:
        """One completion, with retries. When every endpoint is down after answering earlier in the run
        (an outage, not this image; a server that never answered is the breaker's), the request waits
        and is sent again, one request at a time as a probe, until an endpoint answers or
        ``--outage-timeout`` has passed since the last success: then ``Outage`` stops the run, and no
        sample that the outage failed is recorded as an error."""
        while True:
            try:
                return await self._attempts(body, tokens, output)
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
                        return await self._attempts(body, tokens, output)
                    except _SampleError as e:
                        if not e.transient:
                            raise
                        failed = e

    async def _attempts(self, body: dict[str, Any], tokens: float, output: float) -> Any:
        backoff = wait_exponential_jitter(initial=0.5, max=30.0)

        def wait(state: Any) -> float:
            # After a 429 the endpoint's limiter already holds every request for retry-after.
            exc = state.outcome.exception() if state.outcome else None
            return 0.0 if isinstance(exc, ApiError) and exc.status == 429 else backoff(state)

        tries = self.options.max_retries + 1
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(tries), retry=retry_if_exception(_retryable), wait=wait, reraise=True
            ):
                with attempt:
                    ep = self._pick(tokens, output)
                    await ep.limiter.acquire(tokens, output)
                    sent = time.monotonic()
                    try:
                        reply = await self._send(ep, body)
                    except ApiError as e:
                        limits = self.limit_headers(e.headers)
                        if e.status == 429:
                            # A storm of 429s is the server's failure too: an endpoint refusing everything is down.
                            ep.limiter.on_rate_limited(limits, backoff(attempt.retry_state), time.monotonic() - sent)
                        elif limits:
                            ep.limiter.observe(limits, time.monotonic() - sent)
                        if e.status == 429 or (e.status or 0) >= 500 or e.kind in ("timeout", "connection"):
                            ep.failures += 1
                        raise
                    finally:
                        ep.limiter.learned()  # a failed probe must not hold the others forever
                    ep.limiter.observe(self.limit_headers(reply.headers), time.monotonic() - sent)
                    ep.failures = 0
                    self._run_state.last_success = time.monotonic()
                    self._run_state.answered = True
                    return reply.body
        except ApiError as e:
            raise self._final(e, tries) from None
        raise AssertionError("unreachable")

    def _final(self, e: ApiError, tries: int) -> Exception:
        """The last attempt's failure: the job's (key, access, model: ``BackendError``) or the sample's."""
        if e.status == 401:
            return BackendError(f"the server rejected the API key in ${self.options.api_key_env}: {self.scrub(str(e))}")
        if e.status == 403:
            return BackendError(f"permission denied: {self.scrub(str(e))}")
        if e.status == 404:
            return BackendError(f"model {self.model!r}: {self.scrub(str(e))}")
        if e.status is not None:
            return _SampleError(
                f"HTTP {e.status}: {e}", bad_request=e.status in (400, 422), transient=e.status >= 500 or e.status == 429
            )
        if e.kind == "timeout":
            return _SampleError(f"timed out after {self.options.timeout:g}s ({tries} attempts)", transient=True)
        if e.kind == "connection":
            return _SampleError(f"connection failed ({tries} attempts): {e}", transient=True)
        return _SampleError(f"{e} ({tries} attempts)")

    async def _send(self, ep: _Endpoint, body: dict[str, Any]) -> Reply:
        """One request, bounded in all by --timeout: the SDK's timeout bounds each read, and a server that
        sends a byte at a time would keep a request going for ever."""
        try:
            # A little over --timeout: a slow read is the SDK's own timeout (which closes the connection
            # cleanly); this one ends only a reply that keeps arriving, slowly.
            async with asyncio.timeout(self.options.timeout + 0.25):
                return await self.send(ep.client, body)
        except TimeoutError:
            raise ApiError("took too long", kind="timeout") from None
        except OffHostRedirect as e:
            raise BackendError(redirect_message(ep.url, e)) from None


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


def impossible_usage(in_tok: Any, out_tok: Any, estimate: int, max_tokens: int) -> str | None:
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
    if not isinstance(e, ApiError):
        return False
    return e.status is None or e.status in (408, 409, 429) or e.status >= 500


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e


def check_endpoint(sdk: Any, url: str, ask: Callable[[], Any], backend: ApiChatBackend, what: str) -> None:
    """``ask`` (the first request to ``url``, through a Stainless-made SDK: ``openai``, ``anthropic``),
    its failures said in one line: a key refused or access denied, no answer, a redirect off the host
    stop the job; another HTTP error (a proxy without ``what``) does not: such servers still caption."""
    try:
        ask()
    except sdk.AuthenticationError as e:
        raise BackendError(
            f"{url} rejected the API key in ${backend.options.api_key_env}: {backend.scrub(_message(e))}"
        ) from None
    except sdk.PermissionDeniedError as e:
        raise BackendError(f"{url} denied access: {backend.scrub(_message(e))}") from None
    except sdk.APIConnectionError as e:
        cause = e.__cause__ or e
        if isinstance(cause, OffHostRedirect):
            raise BackendError(redirect_message(url, cause)) from None
        raise BackendError(f"cannot reach {url}: {backend.scrub(str(cause) or type(cause).__name__)}") from None
    except OffHostRedirect as e:
        raise BackendError(redirect_message(url, e)) from None
    except (sdk.APIStatusError, sdk.APIResponseValidationError):
        pass  # a server (or proxy) without {what} still captions


def sdk_error(sdk: Any, e: Exception, url: str) -> Exception:
    """An exception of a Stainless-made SDK (``openai``, ``anthropic``: the same exception classes) as
    ``ApiError``, or as ``BackendError`` for a redirect off the host; anything else unchanged."""
    if isinstance(e, sdk.APIStatusError):
        return ApiError(_message(e), e.status_code, e.response.headers)
    if isinstance(e, sdk.APITimeoutError):
        return ApiError("timed out", kind="timeout")
    if isinstance(e, sdk.APIConnectionError):
        if isinstance(e.__cause__, OffHostRedirect):
            return BackendError(redirect_message(url, e.__cause__))
        return ApiError(_describe(e.__cause__ or e), kind="connection")
    if isinstance(e, (ValueError, sdk.APIResponseValidationError)):
        return ApiError(f"malformed reply: {e}", kind="malformed")
    return e
