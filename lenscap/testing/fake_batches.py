"""The Files and Batches endpoints of the fake OpenAI-compatible server (a mixin of ``FakeOpenAI``).

    POST /v1/files (multipart: purpose, file)      GET /v1/files[?purpose=]     GET /v1/files/ID[/content]
    DELETE /v1/files/ID
    POST /v1/batches                               GET /v1/batches[?after=&limit=]
    GET /v1/batches/ID                             POST /v1/batches/ID/cancel

A batch runs ``batch_delay_s`` after it is created, when it is next looked at: each input line is
answered as ``/v1/chat/completions`` would answer it (the same fault markers, no rate limits), into
an output file and an error file. Injected trouble: ``batch_expire_after`` (only that many requests
run, the rest expire), ``fail_uploads`` (the next N uploads get a 500), ``upload_delay_s`` and
``create_delay_s`` (the server acts, then answers late: a client killed meanwhile never hears),
``batch_queue_limit`` (OpenAI's batch queue limit: input tokens of unfinished batches; a batch created
past it is accepted, then ``failed`` with ``token_limit_exceeded`` at its first look).

The queue is recorded for tests: ``enqueued_tokens()`` now, ``peak_enqueued`` at most, and
``enqueued_log``, a (monotonic time, enqueued tokens) pair at each admission and each release.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import hashlib
import json
import time
from typing import Any
from urllib.parse import parse_qs

from lenscap.caption.pricing import image_tokens, text_tokens
from lenscap.testing.fake_requests import BadRequest, validate

__all__ = ["BatchEndpoints"]

Reply = tuple[int, dict[str, str], bytes]
_TERMINAL = ("completed", "failed", "expired", "cancelled")


def _json(status: int, obj: Any) -> Reply:
    return status, {}, json.dumps(obj).encode()


def _err(status: int, message: str, code: str | None = None) -> Reply:
    return _json(status, {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})


class BatchEndpoints:
    settings: Any
    _lock: Any

    def _init_batches(self) -> None:
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._ids = 0
        self.uploads: list[str] = []
        self._enqueued = 0  # input tokens of admitted batches not yet terminal (OpenAI's batch queue)
        self.peak_enqueued = 0
        self.enqueued_log: list[tuple[float, int]] = []

    def enqueued_tokens(self) -> int:
        """Input tokens of the batches now in the queue (admitted, not yet terminal)."""
        with self._lock:
            return self._enqueued

    def release_batches(self) -> None:
        """Let every batch created so far run at its next look, whatever its delay (tests)."""
        for b in self.batches.values():
            b["_ready_at"] = 0.0

    def _next_id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            return f"{prefix}{self._ids:08d}"

    # -- routing --------------------------------------------------------------------------------

    async def _batch_route(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes) -> Reply | None:
        parts = path.strip("/").split("/")  # v1, files|batches, [id], [content|cancel]
        args = {k: v[-1] for k, v in parse_qs(query).items()}
        if parts[1] == "files":
            if method == "POST" and len(parts) == 2:
                return await self._upload(headers, body)
            if method == "GET" and len(parts) == 2:
                return self._list(self.files.values(), args, lambda f: not args.get("purpose") or f["purpose"] == args["purpose"])
            if method == "DELETE" and len(parts) == 3 and parts[2] in self.files:
                with self._lock:
                    del self.files[parts[2]]
                return _json(200, {"id": parts[2], "object": "file", "deleted": True})
            if method == "GET" and len(parts) >= 3 and parts[2] in self.files:
                f = self.files[parts[2]]
                if len(parts) == 4 and parts[3] == "content":
                    return 200, {"content-type": "application/octet-stream"}, f["_bytes"]
                return _json(200, _public(f))
            return _err(404, f"No such File object: {parts[2] if len(parts) > 2 else ''}")
        if method == "POST" and len(parts) == 2:
            return await self._create_batch(body)
        if method == "GET" and len(parts) == 2:
            for b in list(self.batches.values()):
                self._advance(b)
            return self._list(self.batches.values(), args, lambda b: True)
        if len(parts) >= 3 and parts[2] in self.batches:
            b = self.batches[parts[2]]
            if method == "POST" and len(parts) == 4 and parts[3] == "cancel":
                if b["status"] not in _TERMINAL:
                    b["status"], b["cancelling_at"] = "cancelling", int(time.time())
                return _json(200, _public(b))
            self._advance(b)
            return _json(200, _public(b))
        return _err(404, f"No such Batch object: {parts[2] if len(parts) > 2 else ''}")

    def _list(self, items: Any, args: dict[str, str], keep: Any) -> Reply:
        ordered = sorted((x for x in items if keep(x)), key=lambda x: x["id"], reverse=True)  # newest first
        if args.get("after"):
            ordered = [x for x in ordered if x["id"] < args["after"]]
        limit = int(args.get("limit", 20))
        page = ordered[:limit]
        return _json(
            200,
            {
                "object": "list",
                "data": [_public(x) for x in page],
                "has_more": len(ordered) > limit,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
            },
        )

    # -- files ----------------------------------------------------------------------------------

    async def _upload(self, headers: dict[str, str], body: bytes) -> Reply:
        if self.settings.fail_uploads > 0:
            self.settings.fail_uploads -= 1
            return _json(
                500, {"error": {"message": "The server had an error while processing your request.", "type": "server_error"}}
            )
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + headers.get("content-type", "").encode() + b"\r\n\r\n" + body
        )
        fields: dict[str, Any] = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = (part.get_filename(), part.get_payload(decode=True))
        if "file" not in fields or "purpose" not in fields:
            return _err(400, "Missing required parameter: 'file' or 'purpose'.")
        filename, data = fields["file"]
        f = {
            "id": self._next_id("file-"),
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename or "upload",
            "purpose": fields["purpose"][1].decode(),
            "status": "processed",
            "_bytes": data,
        }
        self.files[f["id"]] = f
        self.uploads.append(f["filename"])  # every upload ever made, deleted or not
        if self.settings.upload_delay_s:
            await asyncio.sleep(self.settings.upload_delay_s)
        return _json(200, _public(f))

    def _store(self, lines: list[bytes], purpose: str, name: str) -> str | None:
        if not lines:
            return None
        data = b"\n".join(lines) + b"\n"
        f = {
            "id": self._next_id("file-"),
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": name,
            "purpose": purpose,
            "status": "processed",
            "_bytes": data,
        }
        self.files[f["id"]] = f
        return f["id"]

    # -- batches --------------------------------------------------------------------------------

    async def _create_batch(self, body: bytes) -> Reply:
        try:
            req = json.loads(body)
        except ValueError:
            return _err(400, "We could not parse the JSON body of your request.")
        file_id = req.get("input_file_id")
        if file_id not in self.files:
            return _err(400, f"Input file {file_id!r} not found.", "invalid_input_file")
        if req.get("endpoint") != "/v1/chat/completions" or req.get("completion_window") != "24h":
            return _err(400, "Only endpoint /v1/chat/completions with completion_window 24h is supported.")
        now = int(time.time())
        b = {
            "id": self._next_id("batch_"),
            "object": "batch",
            "endpoint": req["endpoint"],
            "errors": None,
            "input_file_id": file_id,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": req.get("metadata") or {},
            "_ready_at": time.monotonic() + self.settings.batch_delay_s,
        }
        b["_tokens"], model = self._input_tokens(self.files[file_id]["_bytes"])
        limit = self.settings.batch_queue_limit
        with self._lock:  # check and add at once: concurrent creates must not both slip under the limit
            if limit is not None and self._enqueued + b["_tokens"] > limit:
                b["_rejected"] = (
                    f"Enqueued token limit reached for {model} in organization org-fake. Limit: {limit:,} "
                    "enqueued tokens. Please try again once some in_progress batches have been completed."
                )
            else:
                b["_queued"] = True
                self._queue_change(b["_tokens"])
        self.batches[b["id"]] = b
        if self.settings.create_delay_s:
            await asyncio.sleep(self.settings.create_delay_s)
        return _json(200, _public(b))

    def _input_tokens(self, raw: bytes) -> tuple[int, str]:
        """(input tokens, model of the first request) of an input file, estimated as ``_batch_answer`` bills them."""

        total, first_model = 0, None
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                body = json.loads(line).get("body")
            except (ValueError, AttributeError):
                continue
            if first_model is None and isinstance(body, dict) and isinstance(body.get("model"), str):
                first_model = body["model"]  # named in the limit error, as OpenAI names the first request's
            try:
                model, texts, images, _ = validate(body, self.settings.decode_images)
            except BadRequest:
                continue  # an invalid line costs nothing (it fails at run time)
            details = [
                p["image_url"].get("detail") or "low"
                for m in body["messages"]
                if isinstance(m["content"], list)
                for p in m["content"]
                if p["type"] == "image_url"
            ]  # validate's order: one per image
            total += sum(text_tokens(t) for t in texts)
            total += sum(image_tokens(model, *size, d) for (_, _, size), d in zip(images, details, strict=True))
        return total, first_model or "unknown"

    def _queue_change(self, delta: int) -> None:
        """Move the enqueued total; the caller holds ``_lock``."""
        self._enqueued += delta
        self.peak_enqueued = max(self.peak_enqueued, self._enqueued)
        self.enqueued_log.append((time.monotonic(), self._enqueued))

    def _advance(self, b: dict[str, Any]) -> None:
        """Run the batch if its time has come (lazily: when someone looks); a terminal batch leaves the queue."""
        self._step(b)
        if b["status"] in _TERMINAL:
            with self._lock:
                if b.pop("_queued", False):
                    self._queue_change(-b["_tokens"])

    def _step(self, b: dict[str, Any]) -> None:
        if b["status"] in _TERMINAL:
            return
        if b.get("_rejected"):  # over the queue limit: accepted at create, failed when first seen
            b["status"], b["failed_at"] = "failed", int(time.time())
            b["errors"] = {
                "object": "list",
                "data": [{"code": "token_limit_exceeded", "message": b["_rejected"], "param": None, "line": None}],
            }
            return
        if b["status"] == "cancelling":
            b["status"], b["cancelled_at"] = "cancelled", int(time.time())
            return
        if time.monotonic() < b["_ready_at"]:
            b["status"], b["in_progress_at"] = "in_progress", b["in_progress_at"] or int(time.time())
            return
        raw = self.files[b["input_file_id"]]["_bytes"]
        out: list[bytes] = []
        err: list[bytes] = []
        try:
            requests = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except ValueError:
            b["status"], b["failed_at"] = "failed", int(time.time())
            b["errors"] = {
                "object": "list",
                "data": [{"code": "invalid_json_line", "message": "A line of the input file is not valid JSON."}],
            }
            return
        expire_after = self.settings.batch_expire_after
        for i, r in enumerate(requests):
            cid = r.get("custom_id")
            if expire_after is not None and i >= expire_after:
                err.append(
                    json.dumps(
                        {
                            "id": f"batch_req_{i}",
                            "custom_id": cid,
                            "response": None,
                            "error": {
                                "code": "batch_expired",
                                "message": "This request could not be executed before the completion window expired.",
                            },
                        }
                    ).encode()
                )
                continue
            status, answer, broken = self._batch_answer(r.get("body"))
            line = {
                "id": f"batch_req_{i}",
                "custom_id": cid,
                "response": {"status_code": status, "request_id": f"req_{i}", "body": answer},
                "error": None,
            }
            if broken:
                out.append(json.dumps(line).encode()[:60])  # a torn output line
            elif status == 200:
                out.append(json.dumps(line).encode())
            else:
                err.append(json.dumps(line).encode())
        expired = expire_after is not None and len(requests) > expire_after
        now = int(time.time())
        b["status"] = "expired" if expired else "completed"
        b["expired_at" if expired else "completed_at"] = now
        b["finalizing_at"] = now
        b["output_file_id"] = self._store(out, "batch_output", f"{b['id']}_output.jsonl")
        b["error_file_id"] = self._store(err, "batch_output", f"{b['id']}_error.jsonl")
        b["request_counts"] = {"total": len(requests), "completed": len(out), "failed": len(err)}

    def _batch_answer(self, body: Any) -> tuple[int, dict[str, Any], bool]:
        """(status, response body, torn?) for one batch request, as the online endpoint would answer."""
        with self._lock:
            self.requests += 1
        try:
            model, texts, images, max_tokens = validate(body, self.settings.decode_images)
        except BadRequest as e:
            return e.status, {"error": {"message": str(e), "type": e.type_, "code": e.code}}, False
        sha = hashlib.sha256(b"".join(raw for raw, _, _ in images)).hexdigest()
        with self._lock:
            self.image_requests[sha] += 1
        if model not in self.settings.models:
            return (
                404,
                {
                    "error": {
                        "message": f"The model `{model}` does not exist or you do not have access to it.",
                        "type": "invalid_request_error",
                        "code": "model_not_found",
                    }
                },
                False,
            )
        fault = self._fault(sha, "\n".join(texts))
        if fault in ("429", "429-bare", "500", "503", "timeout"):
            status = 429 if fault.startswith("429") else 500 if fault == "timeout" else int(fault)
            return (
                status,
                {"error": {"message": "The server had an error while processing your request.", "type": "server_error"}},
                False,
            )
        if fault == "badimage":
            return (
                400,
                {
                    "error": {
                        "message": "You uploaded an unsupported image. Please make sure your image is valid.",
                        "type": "invalid_request_error",
                        "code": "invalid_image",
                    }
                },
                False,
            )
        est = sum(text_tokens(t) for t in texts) + sum(image_tokens(model, *size, "low") for _, _, size in images)
        return 200, self._completion(model, images, sha, est, max_tokens, fault), fault == "malformed"


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if not k.startswith("_")}
