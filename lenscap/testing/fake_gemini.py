"""A fake Gemini API server for tests: real HTTP on loopback, close enough to Google's wire protocol for
the official ``google-genai`` SDK.

Implements ``POST /v1beta/models/MODEL:generateContent`` (checks the request's shape and that every
``inlineData`` image decodes, as URL-safe base64 the way the SDK sends it), ``GET /v1beta/models/MODEL``,
and, in ``fake_gemini_batches``, the Files API (the SDK's resumable upload) and batch mode. Errors have
Google's shape, ``{"error": {"code", "message", "status", "details"}}``; Gemini sends no rate-limit
headers, so a 429 ``RESOURCE_EXHAUSTED`` carries a ``RetryInfo`` ``retryDelay`` in its details.

It is ``FakeOpenAI``'s HTTP server, counters and fault machinery speaking another protocol: the caption
is the same one computed from the image's pixels (``fake_caption``), requests and successes are counted
per image (SHA-256 of the image bytes) so a test proves nothing was paid twice, and faults come the same
two ways (a ``[[fault:KIND]]`` / ``[[fault:KINDxN]]`` marker in the prompt, or ``fail_next``/``cycle``).
Kinds: 429 (with a retryDelay), 429-bare (without), 500, 503, timeout, malformed, safety (the candidate
stopped by SAFETY), recitation, blocked (the prompt blocked: ``promptFeedback.blockReason``), length
(``MAX_TOKENS``), badimage, huge-usage.

``FakeGemini(api_key=KEY)`` requires the key in ``x-goog-api-key`` (what the SDK sends) and answers any
other with Google's 400 ``API_KEY_INVALID``; ``seen_keys_in_urls`` counts requests whose URL carried a key.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from typing import Any
from urllib.parse import unquote

from lenscap.caption.pricing import image_tokens, text_tokens
from lenscap.testing.fake_gemini_batches import GeminiBatchEndpoints
from lenscap.testing.fake_openai import FakeOpenAI, FakeSettings, fake_caption
from lenscap.testing.gemini_wire import BadGeminiRequest, google_error, read_request

__all__ = ["FakeGemini", "GEMINI_MODELS", "google_error"]

GEMINI_MODELS = ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-2.5-flash-lite")
Reply = tuple[int, dict[str, str], bytes]
_MODEL_PATH = re.compile(r"^/v1beta/models/([^/:]+)(?::([A-Za-z]+))?$")


class FakeGemini(GeminiBatchEndpoints, FakeOpenAI):
    def __init__(self, settings: FakeSettings | None = None, host: str = "127.0.0.1", port: int = 0, **kw: Any) -> None:
        kw.setdefault("models", GEMINI_MODELS)
        super().__init__(settings, host, port, **kw)
        self._init_gemini_batches()

    def reset_counters(self) -> None:
        super().reset_counters()
        self.seen_keys_in_urls = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"  # the SDK adds /v1beta (or /upload/v1beta) itself

    async def _route(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes) -> Reply | None:
        if path.startswith("/_fake/"):
            return await super()._route(method, path, query, headers, body)
        path = unquote(path)
        if "key=" in query:
            with self._lock:
                self.seen_keys_in_urls += 1
        # An upload session's URL is its own credential, as Google's is: its chunks carry no key.
        keyless = path.startswith("/upload/session/")
        if self.settings.api_key is not None and not keyless and headers.get("x-goog-api-key") != self.settings.api_key:
            reason = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
            return google_error(400, "API key not valid. Please pass a valid API key.", [reason])
        m = _MODEL_PATH.match(path)
        if m and m.group(2) == "generateContent" and method == "POST":
            return await self._generate(m.group(1), body)
        if m and m.group(2) is None and method == "GET":
            if m.group(1) not in self.settings.models:
                return google_error(404, f"models/{m.group(1)} is not found for API version v1beta.")
            return 200, {}, json.dumps({"name": f"models/{m.group(1)}", "displayName": m.group(1)}).encode()
        reply = await self._gemini_batch_route(method, path, query, headers, body, m)
        if reply is not None:
            return reply
        return google_error(404, f"Method not found: {method} {path}")

    # -- generateContent ------------------------------------------------------------------------

    async def _generate(self, model: str, body: bytes) -> Reply | None:
        s = self.settings
        with self._lock:
            self.requests += 1
        try:
            texts, images, max_tokens, thinking = read_request(json.loads(body))
        except BadGeminiRequest as e:
            return self._count(google_error(e.code, str(e)))
        except ValueError:
            return self._count(google_error(400, "Invalid JSON payload received."))
        sha = hashlib.sha256(b"".join(raw for raw, _, _ in images)).hexdigest()
        with self._lock:
            self.image_requests[sha] += 1
            self.recent_texts.append("\n".join(texts))
        if model not in s.models:
            return self._count(google_error(404, f"models/{model} is not found for API version v1beta."))
        est = self.prompt_tokens(model, texts, images)
        if not self._admit(1, est + max_tokens):
            return self._count(self.resource_exhausted(True))
        fault = self._fault(sha, "\n".join(texts))
        if s.latency_s:
            await asyncio.sleep(s.latency_s)
        if fault in ("429", "429-bare"):
            return self._count(self.resource_exhausted(fault == "429"))
        if fault in ("500", "503"):
            return self._count(google_error(int(fault), "An internal error has occurred. Please retry."))
        if fault == "timeout":
            await asyncio.sleep(s.timeout_sleep_s)
            return None
        if fault == "malformed":
            return self._count((200, {}, b'{"candidates": [{"content": {"parts": [{"te'))
        if fault == "badimage":
            return self._count(google_error(400, "Unable to process input image. Please retry or report in the forum."))
        return self._count((200, {}, json.dumps(self.answer(model, images, sha, est, max_tokens, fault, thinking)).encode()))

    @staticmethod
    def prompt_tokens(model: str, texts: list[str], images: list[Any]) -> int:
        return sum(text_tokens(t) for t in texts) + sum(image_tokens(model, *size) for _, _, size in images)

    def resource_exhausted(self, with_delay: bool) -> Reply:
        waits = [b.wait_s(c) for b, c in ((self._rpm, 1), (self._tpm, 0)) if b]
        wait = max(waits + [0.05])
        details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{wait:.3f}s"}] if with_delay else None
        return google_error(429, "You exceeded your current quota, please check your plan and billing details.", details)

    def answer(
        self, model: str, images: list[Any], sha: str, est: int, max_tokens: int, fault: str | None, thinking: int | None = None
    ) -> dict[str, Any]:
        """A billed GenerateContentResponse: a caption, one stopped by SAFETY or RECITATION or MAX_TOKENS,
        or a prompt blocked outright (no candidate; the prompt's tokens are still reported)."""
        usage: dict[str, Any] = {"promptTokenCount": est, "totalTokenCount": est}
        if fault == "blocked":  # the prompt's tokens are reported, so counted as billed
            with self._lock:
                self.image_successes[sha] += 1
                self.input_tokens += est
            return {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "usageMetadata": usage, "modelVersion": model}
        caption = fake_caption(
            images[0][1] if images else None, images[0][2] if images else None, sha, self.settings.caption_words
        )
        words = caption.split()
        finish, text = "STOP", caption
        # 2.5 Flash and Pro think first unless told not to (a budget of 0): billed as output, within maxOutputTokens.
        budget = thinking if thinking is not None and thinking >= 0 else (0 if model.endswith("lite") else 7)
        thoughts = min(budget, 24, max_tokens - 1)
        if fault in ("safety", "recitation"):
            finish, text = fault.upper(), ""
        elif fault == "length" or len(words) * 4 // 3 + thoughts > max_tokens:
            finish, text = "MAX_TOKENS", " ".join(words[: max(1, (max_tokens - thoughts) * 3 // 4)])
        out_tokens = min(max_tokens - thoughts, max(1, len(text.split()) * 4 // 3)) if text else 0
        with self._lock:
            now = time.monotonic()
            self.first_success = now if self.first_success is None else self.first_success
            self.last_success = now
            self.image_successes[sha] += 1
            self.input_tokens += est
            self.output_tokens += out_tokens + thoughts
        usage |= {
            "candidatesTokenCount": out_tokens,
            "thoughtsTokenCount": thoughts,
            "totalTokenCount": est + out_tokens + thoughts,
        }
        if fault == "huge-usage":
            usage |= {"promptTokenCount": 10**10, "candidatesTokenCount": 10**9}
        candidate: dict[str, Any] = {"finishReason": finish, "index": 0}
        if text:
            candidate["content"] = {"role": "model", "parts": [{"text": text}]}
        if finish == "SAFETY":
            candidate["safetyRatings"] = [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}]
        return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": sha[:16]}
