"""The Files API and batch mode of the fake Gemini server (a mixin of ``FakeGemini``), as the official SDK
speaks them:

    POST /upload/v1beta/files              the resumable protocol: ``X-Goog-Upload-Command: start`` answers
                                           with an ``x-goog-upload-url``; chunks go there with ``upload``,
                                           the last with ``upload, finalize``, answered ``{"file": {...}}``
    GET /v1beta/files[?pageToken=]         GET /v1beta/files/ID           DELETE /v1beta/files/ID
    GET /download/v1beta/files/ID:download?alt=media                      a file's bytes
    POST /v1beta/models/MODEL:batchGenerateContent   {"batch": {"displayName", "inputConfig": {"fileName"}}}
    GET /v1beta/batches[?pageToken=]       GET /v1beta/batches/ID         POST /v1beta/batches/ID:cancel

A batch is an operation-shaped resource (``{"name": "batches/ID", "metadata": {"state": "BATCH_STATE_*",
"displayName", "output": {"responsesFile"}}}``). It runs ``batch_delay_s`` after it is created, when it is
next looked at: each input line (``{"key", "request"}``) is answered as ``generateContent`` would answer it
(the same fault markers, no rate limits) into one results file of ``{"key", "response"}`` or
``{"key", "error"}`` lines. Injected trouble, as the OpenAI fake's: ``batch_expire_after`` (only that many
requests run; the batch ends ``BATCH_STATE_EXPIRED``), ``fail_uploads``, ``upload_delay_s`` and
``create_delay_s`` (the server acts, then answers late: a client killed meanwhile never hears).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import re
import time
from typing import Any
from urllib.parse import parse_qs

from lenscap.testing.gemini_wire import BadGeminiRequest, google_error, read_request

__all__ = ["GeminiBatchEndpoints"]

Reply = tuple[int, dict[str, str], bytes]
_TERMINAL = ("BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED")
_PAGE = 20
_FILE_PATH = re.compile(r"^/v1beta/files/([^/:]+)$")
_DOWNLOAD_PATH = re.compile(r"^(?:/download)?/v1beta/files/([^/:]+):download$")
_BATCH_PATH = re.compile(r"^/v1beta/batches/([^/:]+)(?::(cancel))?$")


def _json(status: int, obj: Any) -> Reply:
    return status, {}, json.dumps(obj).encode()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class GeminiBatchEndpoints:
    settings: Any
    _lock: Any

    def _init_gemini_batches(self) -> None:
        self.gfiles: dict[str, dict[str, Any]] = {}  # name -> resource, with "_data" its bytes
        self.gbatches: dict[str, dict[str, Any]] = {}
        self._sessions: dict[str, dict[str, Any]] = {}  # resumable uploads in progress
        self._gids = 0
        self.gemini_uploads: list[str] = []  # display names of finished uploads, in order

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            self._gids += 1
            return f"{prefix}{self._gids:06d}"

    async def _gemini_batch_route(
        self, method: str, path: str, query: str, headers: dict[str, str], body: bytes, model_match: Any
    ) -> Reply | None:
        q = {k: v[-1] for k, v in parse_qs(query).items()}
        if path == "/upload/v1beta/files" and method == "POST":
            return self._upload_start(headers, body)
        if path.startswith("/upload/session/") and method == "POST":
            return await self._upload_chunk(path.rsplit("/", 1)[1], headers, body)
        if path == "/v1beta/files" and method == "GET":
            return self._page("files", list(self.gfiles.values()), q)
        m = _DOWNLOAD_PATH.match(path)
        if m and method == "GET":
            f = self.gfiles.get(f"files/{m.group(1)}")
            return (200, {"content-type": "application/octet-stream"}, f["_data"]) if f else self._missing(path)
        m = _FILE_PATH.match(path)
        if m:
            f = self.gfiles.get(f"files/{m.group(1)}")
            if f is None:
                return self._missing(path)
            if method == "DELETE":
                del self.gfiles[f["name"]]
                return _json(200, {})
            return _json(200, _public(f))
        if model_match and model_match.group(2) == "batchGenerateContent" and method == "POST":
            return await self._create(model_match.group(1), body)
        if path == "/v1beta/batches" and method == "GET":
            for b in self.gbatches.values():
                self._advance(b)
            return self._page("operations", list(reversed(self.gbatches.values())), q)
        m = _BATCH_PATH.match(path)
        if m:
            b = self.gbatches.get(f"batches/{m.group(1)}")
            if b is None:
                return self._missing(path)
            if m.group(2) == "cancel" and method == "POST":
                self._advance(b)
                if b["metadata"]["state"] not in _TERMINAL:
                    self._finish(b, "BATCH_STATE_CANCELLED")
                return _json(200, {})
            self._advance(b)
            return _json(200, b)
        return None

    def _missing(self, path: str) -> Reply:
        return google_error(404, f"Requested entity was not found: {path}")

    @staticmethod
    def _page(field: str, items: list[dict[str, Any]], q: dict[str, str]) -> Reply:
        start = int(q.get("pageToken") or 0)
        size = int(q.get("pageSize") or _PAGE)
        out: dict[str, Any] = {field: [_public(i) for i in items[start : start + size]]}
        if start + size < len(items):
            out["nextPageToken"] = str(start + size)
        return _json(200, out)

    # -- files ----------------------------------------------------------------------------------

    def _upload_start(self, headers: dict[str, str], body: bytes) -> Reply:
        if headers.get("x-goog-upload-command", "").lower() != "start":
            return _json(400, {"error": {"code": 400, "message": "resumable uploads only", "status": "INVALID_ARGUMENT"}})
        raw = (json.loads(body or b"{}") or {}).get("file") or {}
        # Google's JSON accepts a field's proto name as well as its camelCase one; the SDK sends the former here.
        meta = {
            "displayName": raw.get("displayName", raw.get("display_name")),
            "mimeType": raw.get("mimeType", raw.get("mime_type")),
        }
        session = self._new_id("s")
        self._sessions[session] = {"meta": meta, "data": bytearray()}
        host = headers.get("host", "127.0.0.1")
        url = f"http://{host}/upload/session/{session}"
        return 200, {"x-goog-upload-url": url, "x-goog-upload-status": "active"}, b""

    async def _upload_chunk(self, session: str, headers: dict[str, str], body: bytes) -> Reply:
        s = self._sessions.get(session)
        if s is None:
            return self._missing(f"/upload/session/{session}")
        s["data"] += body
        if "finalize" not in headers.get("x-goog-upload-command", ""):
            return 200, {"x-goog-upload-status": "active"}, b""
        with self._lock:
            if self.settings.fail_uploads > 0:
                self.settings.fail_uploads -= 1
                del self._sessions[session]
                return (
                    500,
                    {"x-goog-upload-status": "final"},
                    b'{"error": {"code": 500, "message": "upload failed", "status": "INTERNAL"}}',
                )
        del self._sessions[session]
        name = "files/" + self._new_id("f")
        data = bytes(s["data"])
        self.gfiles[name] = {
            "name": name,
            "displayName": s["meta"].get("displayName"),
            "mimeType": s["meta"].get("mimeType") or "application/jsonl",
            "sizeBytes": str(len(data)),
            "createTime": _now(),
            "state": "ACTIVE",
            "sha256Hash": hashlib.sha256(data).hexdigest(),
            "_data": data,
        }
        self.gemini_uploads.append(s["meta"].get("displayName") or name)
        if self.settings.upload_delay_s:
            await asyncio.sleep(self.settings.upload_delay_s)
        return 200, {"x-goog-upload-status": "final"}, json.dumps({"file": _public(self.gfiles[name])}).encode()

    # -- batches --------------------------------------------------------------------------------

    async def _create(self, model: str, body: bytes) -> Reply:
        try:
            batch = json.loads(body)["batch"]
            file_name = batch["inputConfig"]["fileName"]
        except (ValueError, KeyError, TypeError):
            return _json(400, {"error": {"code": 400, "message": "batch.input_config is required", "status": "INVALID_ARGUMENT"}})
        if file_name not in self.gfiles:
            return self._missing(file_name)
        name = "batches/" + self._new_id("b")
        self.gbatches[name] = {
            "name": name,
            "metadata": {
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
                "model": f"models/{model}",
                "displayName": batch.get("displayName"),
                "inputConfig": {"fileName": file_name},
                "state": "BATCH_STATE_PENDING",
                "createTime": _now(),
            },
            "_created": time.monotonic(),
        }
        if self.settings.create_delay_s:
            await asyncio.sleep(self.settings.create_delay_s)
        return _json(200, _public(self.gbatches[name]))

    def _advance(self, batch: dict[str, Any]) -> None:
        """Run a batch whose time has come: every line answered into one results file."""
        meta = batch["metadata"]
        if meta["state"] in _TERMINAL or time.monotonic() - batch["_created"] < self.settings.batch_delay_s:
            return
        model = meta["model"].removeprefix("models/")
        lines = [line for line in self.gfiles[meta["inputConfig"]["fileName"]]["_data"].splitlines() if line.strip()]
        limit = self.settings.batch_expire_after
        out = [self._answer_line(model, raw) for raw in (lines if limit is None else lines[:limit])]
        results = "files/" + self._new_id("r")
        data = b"".join(json.dumps(o).encode() + b"\n" for o in out)
        self.gfiles[results] = {
            "name": results,
            "displayName": f"results of {batch['name']}",
            "mimeType": "application/jsonl",
            "sizeBytes": str(len(data)),
            "createTime": _now(),
            "state": "ACTIVE",
            "_data": data,
        }
        meta["output"] = {"responsesFile": results}
        self._finish(batch, "BATCH_STATE_SUCCEEDED" if limit is None or limit >= len(lines) else "BATCH_STATE_EXPIRED")

    @staticmethod
    def _finish(batch: dict[str, Any], state: str) -> None:
        batch["metadata"] |= {"state": state, "endTime": _now()}
        batch["done"] = True

    def _answer_line(self, model: str, raw: bytes) -> dict[str, Any]:
        try:
            line = json.loads(raw)
            key, request = line["key"], line["request"]
        except (ValueError, KeyError, TypeError):
            return {"error": {"code": 400, "message": "malformed batch line", "status": "INVALID_ARGUMENT"}}
        try:
            texts, images, max_tokens, thinking = read_request(request)
        except BadGeminiRequest as e:
            return {"key": key, "error": {"code": e.code, "message": str(e), "status": "INVALID_ARGUMENT"}}
        sha = hashlib.sha256(b"".join(r for r, _, _ in images)).hexdigest()
        with self._lock:
            self.requests += 1
            self.image_requests[sha] += 1
        fault = self._fault(sha, "\n".join(texts))  # type: ignore[attr-defined]
        if fault in ("500", "503"):
            return {"key": key, "error": {"code": int(fault), "message": "An internal error has occurred.", "status": "INTERNAL"}}
        if fault == "badimage":
            message = "Unable to process input image. Please retry or report in the forum."
            return {"key": key, "error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}}
        est = self.prompt_tokens(model, texts, images)  # type: ignore[attr-defined]
        return {"key": key, "response": self.answer(model, images, sha, est, max_tokens, fault, thinking)}  # type: ignore[attr-defined]


def _public(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if not k.startswith("_")}
