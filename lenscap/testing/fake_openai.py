"""A fake OpenAI-compatible server for tests, benchmarks and demos: real HTTP on loopback.

Implements ``POST /v1/chat/completions`` (validates the request shape and that every image
decodes), ``GET /v1/models``, rate limits with OpenAI's header names, latency, and injected faults.
It answers with a deterministic caption computed from the image, and counts requests and successes
per image (SHA-256 of the uploaded bytes) so tests can prove nothing was paid twice.

Faults, two ways:
  * a marker anywhere in a request's text, e.g. ``[[fault:500x2]]``: the first 2 requests for that
    image get a 500, later ones succeed (no count: every request). Kinds: 429, 429-bare (no
    retry-after), 500, 503, fastapi400 (a 400 with FastAPI's ``{"detail": ...}`` body), timeout,
    malformed, refusal, length, badimage, null (``content: null``), negative-usage, huge-usage (token
    counts no request can use), drip (a reply sent one byte every ``drip_s`` seconds);
  * ``fail_next``: a list of kinds served to the next requests in arrival order (a 429/5xx storm);
    ``cycle``: kinds served in turn, for ever (``["500"] * 4 + ["ok"]``: a flaky server).

``models_body`` makes ``GET /v1/models`` answer 200 with that text (a proxy's login page);
``redirect_to`` answers every API request with a 307 to that base URL (another host).

Run it in-process (``FakeOpenAI(...).start()``; a thread with its own event loop), or as a process:
``python -m lenscap.testing.fake_openai --port 8000 --rpm 600 --latency 0.3``. ``GET /_fake/stats``
returns the counters; ``POST /_fake/config`` changes settings while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from lenscap.caption.pricing import image_tokens, text_tokens
from lenscap.testing.fake_batches import BatchEndpoints
from lenscap.testing.fake_requests import BadRequest, validate

__all__ = ["FakeOpenAI", "FakeOpenAIProcess", "FakeSettings", "fake_caption"]

_FAULT_RE = re.compile(r"\[\[fault:([a-z0-9-]+?)(?:x(\d+))?\]\]")
_DEFAULT_MODELS = ("gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-4o", "gpt-4o-mini")
_COLOURS = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (230, 210, 50),
    "orange": (235, 140, 40),
    "purple": (130, 60, 160),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
    "brown": (120, 80, 40),
    "pink": (235, 150, 180),
    "teal": (40, 150, 150),
}


@dataclass
class FakeSettings:
    rpm: float | None = None
    tpm: float | None = None
    burst_s: float = 1.0  # limits enforced over this window, as OpenAI may ("60,000 RPM as 1,000 RPS")
    latency_s: float = 0.0
    retry_after: bool = True  # send retry-after-ms / retry-after with 429s
    api_key: str | None = None  # when set, requests must carry it
    models: tuple[str, ...] = _DEFAULT_MODELS
    caption_words: int = 60
    timeout_sleep_s: float = 30.0
    decode_images: bool = True
    fail_next: list[str] = field(default_factory=list)
    cycle: list[str] = field(default_factory=list)
    drip_s: float = 0.5
    models_body: str | None = None
    redirect_to: str | None = None
    # Batches (see fake_batches.py)
    batch_delay_s: float = 0.3
    batch_expire_after: int | None = None
    fail_uploads: int = 0
    upload_delay_s: float = 0.0
    create_delay_s: float = 0.0
    batch_queue_limit: int | None = None  # enqueued input tokens allowed (OpenAI's batch queue limit); None: no limit


def _colour_name(rgb: tuple[int, ...]) -> str:
    return min(_COLOURS, key=lambda n: sum((a - b) ** 2 for a, b in zip(_COLOURS[n], rgb[:3], strict=False)))


def fake_caption(image: Image.Image | None, size: tuple[int, int] | None, sha: str, words: int) -> str:
    """A deterministic, plausible caption: the image's size and average colour, then filler."""
    if image is not None and size is not None:
        w, h = size
        small = image.convert("RGB").resize((1, 1))
        colour = _colour_name(small.getpixel((0, 0)))  # type: ignore[arg-type]
        shape = "wide" if w > h * 1.2 else "tall" if h > w * 1.2 else "square"
        head = f"A {shape} {w}x{h} picture dominated by {colour} tones, reference {sha[:8]}."
    else:
        head = f"A picture, reference {sha[:8]}."
    filler = "Soft even light falls across the scene and the composition stays balanced and calm".split()
    out = head.split()
    i = 0
    while len(out) < words:
        out.append(filler[i % len(filler)])
        i += 1
    return " ".join(out[:words]).rstrip(".") + "."


class _Bucket:
    def __init__(self, per_minute: float, burst_s: float) -> None:
        self.per_minute = per_minute
        self.capacity = max(1.0, per_minute * burst_s / 60.0)
        self.level = self.capacity
        self.updated = time.monotonic()

    def refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.per_minute / 60.0)
        self.updated = now

    def admit(self, cost: float) -> bool:
        self.refill()
        if self.level >= min(cost, self.capacity):
            self.level -= cost
            return True
        return False

    def headers(self, kind: str) -> dict[str, str]:
        self.refill()
        remaining = max(0, int(self.per_minute * self.level / self.capacity))
        reset = max(0.0, (self.capacity - self.level) * 60.0 / self.per_minute)
        return {
            f"x-ratelimit-limit-{kind}": str(int(self.per_minute)),
            f"x-ratelimit-remaining-{kind}": str(remaining),
            f"x-ratelimit-reset-{kind}": f"{reset:.3f}s",
        }

    def wait_s(self, cost: float) -> float:
        self.refill()
        need = min(cost, self.capacity) - self.level
        return max(0.0, need * 60.0 / self.per_minute)


class FakeOpenAI(BatchEndpoints):
    def __init__(self, settings: FakeSettings | None = None, host: str = "127.0.0.1", port: int = 0, **kw: Any) -> None:
        self.settings = settings or FakeSettings(**kw)
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._lock = threading.Lock()
        self._init_batches()
        self.reset_counters()
        self._apply_limits()

    # -- counters -------------------------------------------------------------------------------

    def reset_counters(self) -> None:
        with self._lock:
            self.requests = 0
            self.responses: Counter[int] = Counter()
            self.image_requests: Counter[str] = Counter()
            self.image_successes: Counter[str] = Counter()
            self.marker_counts: Counter[str] = Counter()
            self.cycle_at = 0
            self.input_tokens = 0
            self.output_tokens = 0
            self.recent_texts: deque[str] = deque(maxlen=1000)  # what prompts said (tests of prompt building)
            self.first_success: float | None = None  # monotonic times: throughput as the server saw it
            self.last_success: float | None = None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "responses": {str(k): v for k, v in sorted(self.responses.items())},
                "image_requests": dict(self.image_requests),
                "image_successes": dict(self.image_successes),
                "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
                "success_span_s": (self.last_success - self.first_success)
                if self.first_success is not None and self.last_success is not None
                else None,
            }

    def _apply_limits(self) -> None:
        s = self.settings
        self._rpm = _Bucket(s.rpm, s.burst_s) if s.rpm else None
        self._tpm = _Bucket(s.tpm, s.burst_s) if s.tpm else None

    def configure(self, **changes: Any) -> None:
        for k, v in changes.items():
            if not hasattr(self.settings, k):
                raise KeyError(k)
            setattr(self.settings, k, tuple(v) if k == "models" else v)
        self._apply_limits()

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> FakeOpenAI:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle_connection, self.host, self.port, backlog=1024)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-openai", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def serve_forever(self) -> None:
        server = await asyncio.start_server(self._handle_connection, self.host, self.port, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        print(json.dumps({"base_url": self.base_url}), flush=True)
        async with server:
            await server.serve_forever()

    # -- HTTP -----------------------------------------------------------------------------------

    async def _handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                path, _, query = path.partition("?")
                reply = await self._route(method, path, query, headers, body)
                if reply is None:  # a simulated hang: drop the connection
                    return
                status, extra_headers, payload = reply
                keep_alive = headers.get("connection", "").lower() != "close"
                extra_headers = {"content-type": "application/json", **extra_headers}
                drip = extra_headers.pop(_DRIP, None)
                head_lines = [
                    f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
                    f"content-length: {len(payload)}",
                    "connection: " + ("keep-alive" if keep_alive else "close"),
                ]
                head_lines += [f"{k}: {v}" for k, v in extra_headers.items()]
                message = ("\r\n".join(head_lines) + "\r\n\r\n").encode("latin-1") + payload
                if drip is not None:  # a byte at a time: each read is quick, the whole reply takes ages
                    for i in range(len(message)):
                        writer.write(message[i : i + 1])
                        await writer.drain()
                        await asyncio.sleep(float(drip))
                writer.write(message if drip is None else b"")
                await writer.drain()
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return  # the client went away (a timeout, a killed process)
        finally:
            writer.close()

    async def _route(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes] | None:
        if path == "/_fake/stats":
            return 200, {}, json.dumps(self.stats()).encode()
        if path == "/_fake/config" and method == "POST":
            self.configure(**json.loads(body or b"{}"))
            return 200, {}, b"{}"
        if path == "/_fake/reset" and method == "POST":
            self.reset_counters()
            return 200, {}, b"{}"
        if self.settings.api_key is not None and headers.get("authorization") != f"Bearer {self.settings.api_key}":
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        if self.settings.redirect_to is not None and path.startswith("/v1/"):
            with self._lock:
                self.requests += 1
            target = self.settings.redirect_to.rstrip("/") + path[len("/v1") :]
            return 307, {"location": target, "content-type": "text/plain"}, b""
        if path == "/v1/models" and method == "GET" and self.settings.models_body is not None:
            return 200, {"content-type": "text/html"}, self.settings.models_body.encode()
        if path == "/v1/models" and method == "GET":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "lenscap-fake"} for m in self.settings.models]
            return 200, {}, json.dumps({"object": "list", "data": data}).encode()
        if path == "/v1/chat/completions" and method == "POST":
            return await self._chat(body)
        if path.startswith(("/v1/files", "/v1/batches")):
            return await self._batch_route(method, path, query, headers, body)
        return _error(404, f"Unknown request URL: {method} {path}.", "unknown_url")

    # -- chat completions -----------------------------------------------------------------------

    async def _chat(self, body: bytes) -> tuple[int, dict[str, str], bytes] | None:
        s = self.settings
        with self._lock:
            self.requests += 1
        try:
            req = json.loads(body)
            model, texts, images, max_tokens = validate(req, s.decode_images)
        except BadRequest as e:
            return self._count(_error(e.status, str(e), e.code, e.type_))
        except ValueError:
            return self._count(_error(400, "We could not parse the JSON body of your request.", None))
        sha = hashlib.sha256(b"".join(raw for raw, _, _ in images)).hexdigest()
        with self._lock:
            self.image_requests[sha] += 1
            self.recent_texts.append("\n".join(texts))
        if model not in s.models:
            return self._count(
                _error(404, f"The model `{model}` does not exist or you do not have access to it.", "model_not_found")
            )
        est = sum(text_tokens(t) for t in texts) + sum(image_tokens(model, *size, "low") for _, _, size in images)
        if not self._admit(1, est + max_tokens):
            return self._count(self._rate_limited(est + max_tokens))
        limit_headers = self._limit_headers()
        fault = self._fault(sha, "\n".join(texts))
        if s.latency_s:
            await asyncio.sleep(s.latency_s)
        if fault in ("429", "429-bare"):
            return self._count(self._rate_limited(0, with_retry_after=fault == "429"))
        if fault in ("500", "503"):
            return self._count(_error(int(fault), "The server had an error while processing your request.", None, "server_error"))
        if fault == "fastapi400":  # how a FastAPI server (transformers serve) explains a 400
            return self._count((400, {}, json.dumps({"detail": f"Model {model!r} is not loaded on this server"}).encode()))
        if fault == "timeout":
            await asyncio.sleep(s.timeout_sleep_s)
            return None
        if fault == "malformed":
            return self._count((200, limit_headers, b'{"id": "chatcmpl-broken", "choices": [{"index": 0, "mess'))
        if fault == "badimage":
            return self._count(
                _error(400, "You uploaded an unsupported image. Please make sure your image is valid.", "invalid_image")
            )
        reply = self._completion(model, images, sha, est, max_tokens, fault)
        if fault == "null":
            reply["choices"][0]["message"]["content"] = None
        elif fault == "negative-usage":
            reply["usage"] = {"prompt_tokens": -1_000_000_000, "completion_tokens": -5, "total_tokens": -1_000_000_005}
        elif fault == "huge-usage":
            reply["usage"] = {"prompt_tokens": 10**10, "completion_tokens": 10**9, "total_tokens": 11 * 10**9}
        if fault == "drip":
            limit_headers = {**limit_headers, _DRIP: str(s.drip_s)}
        return self._count((200, limit_headers, json.dumps(reply).encode()))

    def _completion(
        self, model: str, images: list[Any], sha: str, est: int, max_tokens: int, fault: str | None
    ) -> dict[str, Any]:
        """A successful (billed) chat completion: a caption, a refusal, or a reply cut at max tokens."""
        caption = fake_caption(
            images[0][1] if images else None, images[0][2] if images else None, sha, self.settings.caption_words
        )
        words = caption.split()
        finish, content, refusal = "stop", caption, None
        if fault == "refusal":
            content, refusal = None, "I'm sorry, but I can't help with that."
        elif fault == "length" or len(words) * 4 // 3 > max_tokens:
            finish, content = "length", " ".join(words[: max(1, max_tokens * 3 // 4)])
        out_tokens = min(max_tokens, max(1, len((content or refusal or "").split()) * 4 // 3))
        with self._lock:
            now = time.monotonic()
            self.first_success = now if self.first_success is None else self.first_success
            self.last_success = now
            self.image_successes[sha] += 1
            self.input_tokens += est
            self.output_tokens += out_tokens
        return {
            "id": f"chatcmpl-{sha[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": content, "refusal": refusal}}
            ],
            "usage": {"prompt_tokens": est, "completion_tokens": out_tokens, "total_tokens": est + out_tokens},
        }

    def _count(self, reply: tuple[int, dict[str, str], bytes]) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.responses[reply[0]] += 1
        return reply

    def _limit_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self._rpm:
            headers |= self._rpm.headers("requests")
        if self._tpm:
            headers |= self._tpm.headers("tokens")
        return headers

    def _admit(self, requests: int, tokens: int) -> bool:
        with self._lock:
            if self._rpm and self._rpm.wait_s(requests) > 0:
                return False
            if self._tpm and self._tpm.wait_s(tokens) > 0:
                return False
            if self._rpm:
                self._rpm.admit(requests)
            if self._tpm:
                self._tpm.admit(tokens)
            return True

    def _rate_limited(self, tokens: int, with_retry_after: bool | None = None) -> tuple[int, dict[str, str], bytes]:
        headers = self._limit_headers()
        waits = [b.wait_s(c) for b, c in ((self._rpm, 1), (self._tpm, tokens)) if b]
        wait = max(waits + [0.05])
        if self.settings.retry_after if with_retry_after is None else with_retry_after:
            headers["retry-after-ms"] = str(max(1, int(wait * 1000)))
            headers["retry-after"] = str(max(1, round(wait)))
        _, _, payload = _error(429, "Rate limit reached for requests. Please try again later.", "rate_limit_exceeded", "requests")
        return 429, headers, payload

    def _fault(self, sha: str, text: str) -> str | None:
        with self._lock:
            if self.settings.fail_next:
                return self.settings.fail_next.pop(0)
            if self.settings.cycle:
                kind = self.settings.cycle[self.cycle_at % len(self.settings.cycle)]
                self.cycle_at += 1
                return None if kind == "ok" else kind
            m = _FAULT_RE.search(text)
            if not m:
                return None
            kind, times = m.group(1), m.group(2)
            if times is None:
                return kind
            marker = f"{sha}:{m.group(0)}"
            self.marker_counts[marker] += 1
            return kind if self.marker_counts[marker] <= int(times) else None


_DRIP = "x-fake-drip"  # a reply's header that says to send it slowly (taken out before it is sent)
_REASONS = {
    200: "OK",
    307: "Temporary Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _error(
    status: int, message: str, code: str | None, type_: str = "invalid_request_error"
) -> tuple[int, dict[str, str], bytes]:
    return status, {}, json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


class FakeOpenAIProcess:
    """The server in a process of its own (benchmarks: its CPU is not the client's GIL), driven over HTTP."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = ""

    def __enter__(self) -> FakeOpenAIProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lenscap.testing.fake_openai", *self.args], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.base_url = json.loads(self.proc.stdout.readline())["base_url"]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        root = self.base_url.rsplit("/v1", 1)[0]
        data = json.dumps(body).encode() if body is not None else None
        with urllib.request.urlopen(urllib.request.Request(root + path, data=data), timeout=30) as r:
            return json.loads(r.read())

    def stats(self) -> dict[str, Any]:
        return self._call("/_fake/stats")

    def reset(self, **settings: Any) -> None:
        """Zero the counters; refill the rate limits (re-applied by any configure call)."""
        self._call("/_fake/reset", {})
        self._call("/_fake/config", settings)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--rpm", type=float)
    p.add_argument("--tpm", type=float)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--no-decode", action="store_true", help="check image headers only (benchmarks)")
    a = p.parse_args()
    server = FakeOpenAI(FakeSettings(rpm=a.rpm, tpm=a.tpm, latency_s=a.latency, decode_images=not a.no_decode), a.host, a.port)
    try:
        asyncio.run(server.serve_forever())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
