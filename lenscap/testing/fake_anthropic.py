"""A fake Anthropic Messages API for tests and demos: real HTTP on loopback, close enough to the wire
protocol for the official ``anthropic`` SDK.

    POST /v1/messages                      a caption computed from the image's pixels (``fake_caption``)
    GET  /v1/models                        the models it serves
    POST /v1/messages/batches              ``{"requests": [{"custom_id", "params"}]}``
    GET  /v1/messages/batches[?limit=&after_id=]   newest first
    GET  /v1/messages/batches/ID           GET .../ID/results (JSONL, once ended)   POST .../ID/cancel

It is ``FakeOpenAI`` with Anthropic's routes: the same HTTP server, counters (requests and successes
per image, so a test proves nothing was paid twice), rate-limit buckets and fault markers
(``[[fault:429x2]]`` in a request's text, ``fail_next``, ``cycle``). Kinds here: 429, 500, 529
(``overloaded_error``), timeout, malformed, refusal (``stop_reason: refusal``), max-tokens (a reply cut
at ``max_tokens``; ``length`` is the same), badimage. Errors have Anthropic's shape,
``{"type": "error", "error": {"type", "message"}}``; rate limits go out as
``anthropic-ratelimit-{requests,input-tokens}-{limit,remaining,reset}`` (reset in RFC 3339) and 429s
carry ``retry-after`` in seconds.

A batch runs ``batch_delay_s`` after it is created, when it is next looked at, each request answered
as ``POST /v1/messages`` would answer it (no rate limits). ``create_delay_s``: the server creates the
batch, then answers late (a client killed meanwhile never hears); ``batch_expire_after``: only that
many requests run, the rest expire.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from lenscap.caption.pricing import image_tokens, text_tokens
from lenscap.testing.fake_openai import FakeOpenAI, FakeSettings
from lenscap.testing.fake_requests import BadRequest, _decode_image

__all__ = ["FakeAnthropic", "CLAUDE_MODELS", "validate_messages"]

CLAUDE_MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-5", "claude-opus-4-1")
Reply = tuple[int, dict[str, str], bytes]
_CUSTOM_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_MAX_BATCH_REQUESTS = 100_000
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
_ERROR_TYPES |= {500: "api_error", 529: "overloaded_error"}


def _rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


def _error(status: int, message: str) -> Reply:
    kind = _ERROR_TYPES.get(status, "api_error")
    return status, {}, json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()


def _json(obj: Any, status: int = 200) -> Reply:
    return status, {}, json.dumps(obj).encode()


def validate_messages(req: Any, decode: bool) -> tuple[str, list[str], list[tuple[bytes, Any, tuple[int, int]]], int]:
    """Check a Messages request as the API does; returns model, texts, images, max_tokens."""
    if not isinstance(req, dict):
        raise BadRequest(400, "The request body must be a JSON object.")
    model, max_tokens, messages = req.get("model"), req.get("max_tokens"), req.get("messages")
    if not isinstance(model, str) or not model:
        raise BadRequest(400, "model: Field required")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(400, "max_tokens: Field required (a positive integer)")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "messages: at least one message is required")
    temperature = req.get("temperature")
    if temperature is not None and not (isinstance(temperature, (int, float)) and 0 <= temperature <= 1):
        raise BadRequest(400, "temperature: Input should be less than or equal to 1")
    texts = [req["system"]] if isinstance(req.get("system"), str) else []
    images: list[tuple[bytes, Any, tuple[int, int]]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant"):
            raise BadRequest(400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = msg.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise BadRequest(400, f"messages.{i}.content: Input should be a valid list")
        for block in blocks:
            kind = block.get("type") if isinstance(block, dict) else None
            source = block.get("source") if kind == "image" else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif isinstance(source, dict) and source.get("type") == "base64":
                media = str(source.get("media_type", ""))
                if media not in ("image/jpeg", "image/png", "image/gif", "image/webp"):
                    raise BadRequest(400, f"messages.{i}.content: image media_type {media!r} is not supported")
                try:
                    images.append(_decode_image(f"data:{media};base64,{source.get('data', '')}", decode))
                except BadRequest:
                    raise BadRequest(400, "messages: Could not process image") from None
            else:
                raise BadRequest(400, f"messages.{i}.content: Input tag {kind!r} does not match any expected tag")
    return model, texts, images, max_tokens


class FakeAnthropic(FakeOpenAI):
    def __init__(self, settings: FakeSettings | None = None, host: str = "127.0.0.1", port: int = 0, **kw: Any) -> None:
        kw.setdefault("models", CLAUDE_MODELS)
        super().__init__(settings, host, port, **kw)

    def _init_batches(self) -> None:
        super()._init_batches()
        self.batches: dict[str, dict[str, Any]] = {}  # Message Batches, by id (each with its requests)

    @property
    def base_url(self) -> str:
        """What ``Anthropic(base_url=...)`` takes: the server's root (the SDK adds ``/v1/...``)."""
        return f"http://{self.host}:{self.port}"

    # -- HTTP -----------------------------------------------------------------------------------

    async def _route(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes) -> Reply | None:
        if path.startswith("/_fake/"):
            return await super()._route(method, path, query, headers, body)
        key = self.settings.api_key
        if key is not None and key not in (headers.get("x-api-key"), headers.get("authorization", "").removeprefix("Bearer ")):
            return _error(401, "invalid x-api-key")
        if not headers.get("anthropic-version"):
            return _error(400, "anthropic-version: header is required")
        if path == "/v1/models" and method == "GET":
            data = [{"type": "model", "id": m, "display_name": m, "created_at": _rfc3339(0)} for m in self.settings.models]
            return _json({"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]})
        if path == "/v1/messages" and method == "POST":
            return await self._messages(body)
        if path.startswith("/v1/messages/batches"):
            return await self._batches_route(method, path, query, body)
        return _error(404, f"Not found: {method} {path}")

    # -- messages -------------------------------------------------------------------------------

    async def _messages(self, body: bytes) -> Reply | None:
        with self._lock:
            self.requests += 1
        try:
            req = json.loads(body)
        except ValueError:
            return self._count(_error(400, "The request body is not valid JSON."))
        status, reply, broken = await self._answer(req, online=True)
        if status == 0:
            return None  # a hang
        if status == 429:
            return self._count(self._anthropic_rate_limited())
        if broken:
            return self._count((200, self._anthropic_limits(), b'{"id": "msg_broken", "type": "message", "conte'))
        return self._count((status, self._anthropic_limits() if status == 200 else {}, json.dumps(reply).encode()))

    async def _answer(self, req: Any, online: bool) -> tuple[int, dict[str, Any], bool]:
        """(status, body, torn?) for one Messages request; status 0: the server hangs (online only)."""
        s = self.settings
        try:
            model, texts, images, max_tokens = validate_messages(req, s.decode_images)
        except BadRequest as e:
            return e.status, _error_body(e.status, str(e)), False
        sha = hashlib.sha256(b"".join(raw for raw, _, _ in images)).hexdigest()
        with self._lock:
            self.image_requests[sha] += 1
            self.recent_texts.append("\n".join(texts))
        if model not in s.models:
            return 404, _error_body(404, f"model: {model}"), False
        est = sum(text_tokens(t) for t in texts) + sum(image_tokens(model, *size) for _, _, size in images)
        if online and not self._admit(1, est):
            return 429, {}, False
        fault = self._fault(sha, "\n".join(texts))
        if online and s.latency_s:
            await asyncio.sleep(s.latency_s)
        if fault in ("429", "500", "529"):
            return int(fault), _error_body(int(fault), "Overloaded" if fault == "529" else "Internal server error"), False
        if fault == "timeout":
            if online:
                await asyncio.sleep(s.timeout_sleep_s)
                return 0, {}, False
            return 500, _error_body(500, "Internal server error"), False
        if fault == "badimage":
            return (
                400,
                _error_body(
                    400,
                    "messages.0.content.0.image.source.base64: The image was specified using the image/jpeg media type, but does not appear to be a valid jpeg image",
                ),
                False,
            )
        completion = self._completion(model, images, sha, est, max_tokens, "length" if fault == "max-tokens" else fault)
        return 200, _as_message(completion, fault), fault == "malformed"

    def _anthropic_limits(self) -> dict[str, str]:
        now = time.time()
        headers: dict[str, str] = {}
        for bucket, kind in ((self._rpm, "requests"), (self._tpm, "input-tokens")):
            if bucket is None:
                continue
            openai_names = bucket.headers("x")  # the bucket's figures, under OpenAI's names for a kind "x"
            for field in ("limit", "remaining"):
                headers[f"anthropic-ratelimit-{kind}-{field}"] = openai_names[f"x-ratelimit-{field}-x"]
            reset = float(openai_names["x-ratelimit-reset-x"].rstrip("s"))
            headers[f"anthropic-ratelimit-{kind}-reset"] = _rfc3339(now + reset)
        return headers

    def _anthropic_rate_limited(self) -> Reply:
        headers = self._anthropic_limits()
        waits = [b.wait_s(c) for b, c in ((self._rpm, 1), (self._tpm, 1)) if b]
        if self.settings.retry_after:
            headers["retry-after"] = str(max(1, round(max(waits + [0.05]))))
        status, _, payload = _error(429, "Number of request tokens has exceeded your per-minute rate limit")
        return status, headers, payload

    # -- message batches ------------------------------------------------------------------------

    async def _batches_route(self, method: str, path: str, query: str, body: bytes) -> Reply:
        parts = path.strip("/").split("/")  # v1, messages, batches, [id], [results|cancel]
        args = {k: v[-1] for k, v in parse_qs(query).items()}
        if len(parts) == 3 and method == "POST":
            return await self._create(body)
        if len(parts) == 3 and method == "GET":
            for b in list(self.batches.values()):
                self._advance(b)
            return self._list(args)
        b = self.batches.get(parts[3]) if len(parts) > 3 else None
        if b is None:
            return _error(404, f"message batch {parts[3] if len(parts) > 3 else ''!r} not found")
        if len(parts) == 5 and parts[4] == "cancel" and method == "POST":
            if b["processing_status"] == "in_progress":
                b["processing_status"], b["cancel_initiated_at"] = "canceling", _rfc3339(time.time())
            return _json(_public(b))
        self._advance(b)
        if len(parts) == 5 and parts[4] == "results" and method == "GET":
            if b["processing_status"] != "ended":
                return _error(400, f"Batch {b['id']} is still in progress; results are available once it has ended")
            return 200, {"content-type": "application/binary"}, b"".join(json.dumps(r).encode() + b"\n" for r in b["_results"])
        return _json(_public(b))

    def _list(self, args: dict[str, str]) -> Reply:
        ordered = sorted(self.batches.values(), key=lambda b: b["id"], reverse=True)  # newest first
        if args.get("after_id"):
            ordered = [b for b in ordered if b["id"] < args["after_id"]]
        limit = int(args.get("limit", 20))
        page = ordered[:limit]
        return _json(
            {
                "data": [_public(b) for b in page],
                "has_more": len(ordered) > limit,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
            }
        )

    async def _create(self, body: bytes) -> Reply:
        try:
            requests = json.loads(body).get("requests")
        except (ValueError, AttributeError):
            return _error(400, "The request body is not valid JSON.")
        if not isinstance(requests, list) or not 1 <= len(requests) <= _MAX_BATCH_REQUESTS:
            return _error(400, f"requests: between 1 and {_MAX_BATCH_REQUESTS} requests a batch")
        ids = [r.get("custom_id") if isinstance(r, dict) else None for r in requests]
        bad = next((i for i in ids if not isinstance(i, str) or not _CUSTOM_ID_RE.match(i)), "")
        if bad != "":
            return _error(400, f"requests: custom_id {bad!r} does not match ^[a-zA-Z0-9_-]{{1,64}}$")
        if len(set(ids)) != len(ids):
            return _error(400, "requests: custom_id values must be unique within a batch")
        now = time.time()
        with self._lock:
            self._ids += 1
            batch_id = f"msgbatch_{self._ids:08d}"
        b = {
            "id": batch_id,
            "type": "message_batch",
            "processing_status": "in_progress",
            "request_counts": {"processing": len(requests), "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0},
            "ended_at": None,
            "created_at": _rfc3339(now),
            "expires_at": _rfc3339(now + 86400),
            "archived_at": None,
            "cancel_initiated_at": None,
            "results_url": None,
            "_requests": requests,
            "_ready_at": time.monotonic() + self.settings.batch_delay_s,
        }
        self.batches[batch_id] = b
        if self.settings.create_delay_s:
            await asyncio.sleep(self.settings.create_delay_s)
        return _json(_public(b))

    def _advance(self, b: dict[str, Any]) -> None:
        """Run the batch if its time has come (or end it, cancelled), lazily: when someone looks."""
        if b["processing_status"] == "ended":
            return
        canceling = b["processing_status"] == "canceling"
        if not canceling and time.monotonic() < b["_ready_at"]:
            return
        counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
        results = []
        expire_after = self.settings.batch_expire_after
        for i, r in enumerate(b["_requests"]):
            if canceling or (expire_after is not None and i >= expire_after):
                kind = "canceled" if canceling else "expired"
                result: dict[str, Any] = {"type": kind}
            else:
                status, reply, broken = _run_now(self._answer(r.get("params"), online=False))
                if status == 200 and not broken:
                    result, kind = {"type": "succeeded", "message": reply}, "succeeded"
                elif status == 200:
                    result, kind = {"type": "succeeded", "message": {"id": "msg_broken", "type": "message"}}, "succeeded"
                else:
                    result, kind = {"type": "errored", "error": reply}, "errored"
            counts[kind] += 1
            results.append({"custom_id": r["custom_id"], "result": result})
        b.update(
            processing_status="ended",
            request_counts=counts,
            ended_at=_rfc3339(time.time()),
            results_url=f"{self.base_url}/v1/messages/batches/{b['id']}/results",
            _results=results,
        )


def _run_now(coroutine: Any) -> Any:
    """A batch request's answer, computed in place: without latency or hangs it never awaits."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("a batch answer awaited")


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}


def _as_message(completion: dict[str, Any], fault: str | None) -> dict[str, Any]:
    """The fake's chat completion (counted, captioned from the pixels) in the Messages API's shape."""
    choice = completion["choices"][0]
    text = choice["message"]["content"] or ""
    stop = "max_tokens" if choice["finish_reason"] == "length" else "end_turn"
    if fault == "refusal":
        stop, text = "refusal", ""
    return {
        "id": completion["id"].replace("chatcmpl-", "msg_"),
        "type": "message",
        "role": "assistant",
        "model": completion["model"],
        "content": [{"type": "text", "text": text}] if text else [],
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": completion["usage"]["prompt_tokens"],
            "output_tokens": completion["usage"]["completion_tokens"],
        },
    }


def _public(b: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in b.items() if not k.startswith("_")}
