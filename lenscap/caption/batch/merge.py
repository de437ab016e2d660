"""Reading a finished batch's output and error files: one answer, or a reason to ask again, per request."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lenscap.caption.backends.base import ERROR, CaptionResult
from lenscap.caption.batch.ids import parse_custom_id

__all__ = ["read_answers", "FINAL_HTTP"]

FINAL_HTTP = (400, 401, 403, 404, 413, 422)  # the request itself is wrong: asking again will not help


def read_answers(backend: Any, paths: list[Path]) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """(custom id, journal entry, None) for an answer, (custom id, None, message) for a request to ask
    again. A torn line names no request: its request counts as missing."""
    for path in paths:
        if not path.exists():
            continue
        with open(path, "rb") as f:
            for raw in f:
                if raw.strip():
                    parsed = _read_line(backend, raw)
                    if parsed is not None:
                        yield parsed


def _read_line(backend: Any, raw: bytes) -> tuple[str, dict[str, Any] | None, str | None] | None:
    own_reader = getattr(backend, "read_batch_line", None)
    if own_reader is not None:  # another provider's output format (gemini-batch)
        try:
            return own_reader(json.loads(raw))
        except ValueError:
            return None
    try:
        line = json.loads(raw)
        custom_id = str(line["custom_id"])
        _, key = parse_custom_id(custom_id)
    except (ValueError, KeyError, TypeError):
        return None
    if "result" in line:  # a provider's own result (Anthropic's Message Batches), read by its backend
        entry, message = backend.batch_result(key, line["result"])
        return custom_id, entry, message
    response = line.get("response") or {}
    error = line.get("error")
    code = response.get("status_code")
    body = response.get("body") or {}
    if error or code != 200:
        message = (
            (error or {}).get("message")
            or ((body.get("error") or {}).get("message") if isinstance(body, dict) else None)
            or f"HTTP {code}"
        )
        if code in FINAL_HTTP:
            return custom_id, {**CaptionResult(key, ERROR, error=f"HTTP {code}: {message}").to_dict(), "cached": False}, None
        return custom_id, None, message
    try:
        from openai.types.chat import ChatCompletion  # the SDK takes about a second to import: only where a reply is read

        completion = ChatCompletion.model_validate(body)
        if not completion.choices:
            raise ValueError("no choices")
    except Exception as e:  # noqa: BLE001 - any malformed body
        return custom_id, None, f"malformed reply in the batch output: {type(e).__name__}"
    result = backend.interpret(key, completion, 0)
    return custom_id, {**result.to_dict(), "cached": False}, None
