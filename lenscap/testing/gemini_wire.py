"""What the fake Gemini server checks in a GenerateContentRequest, as the API would, and the shape of
Google's errors: shared by ``generateContent`` (``fake_gemini``) and each line of a batch file
(``fake_gemini_batches``)."""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

from PIL import Image

__all__ = ["BadGeminiRequest", "google_error", "read_request"]

Reply = tuple[int, dict[str, str], bytes]
_STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED"}
_STATUS |= {500: "INTERNAL", 503: "UNAVAILABLE"}


def google_error(code: int, message: str, details: list[dict[str, Any]] | None = None) -> Reply:
    """An error as Google's APIs send it."""
    error: dict[str, Any] = {"code": code, "message": message, "status": _STATUS.get(code, "UNKNOWN")}
    if details:
        error["details"] = details
    return code, {}, json.dumps({"error": error}).encode()


class BadGeminiRequest(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def read_request(req: Any) -> tuple[list[str], list[tuple[bytes, Image.Image, tuple[int, int]]], int, int | None]:
    """A GenerateContentRequest's texts (system instruction included), decoded images, maxOutputTokens and
    thinking budget (None: the model's own),
    checked as the API checks them. Shared by generateContent and each line of a batch file."""
    if not isinstance(req, dict) or not isinstance(req.get("contents"), list) or not req["contents"]:
        raise BadGeminiRequest(400, "* GenerateContentRequest.contents: contents is not specified")
    parts = [p for c in req["contents"] if isinstance(c, dict) for p in (c.get("parts") or [])]
    system = req.get("systemInstruction") or req.get("system_instruction") or {}
    parts += system.get("parts") or [] if isinstance(system, dict) else []
    texts, images = [], []
    for part in parts:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, dict) and isinstance(part.get("inlineData") or part.get("inline_data"), dict):
            images.append(_decode(part.get("inlineData") or part.get("inline_data")))
        else:
            raise BadGeminiRequest(400, "Invalid JSON payload received. Unknown part.")
    config = req.get("generationConfig") or req.get("generation_config") or {}
    max_tokens = config.get("maxOutputTokens", config.get("max_output_tokens", 8192))
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadGeminiRequest(400, "max_output_tokens must be positive")
    thinking = (config.get("thinkingConfig") or config.get("thinking_config") or {}).get("thinkingBudget")
    return texts, images, max_tokens, thinking


def _decode(blob: dict[str, Any]) -> tuple[bytes, Image.Image, tuple[int, int]]:
    mime = blob.get("mimeType") or blob.get("mime_type")
    if mime not in ("image/jpeg", "image/png", "image/webp", "image/gif"):
        raise BadGeminiRequest(400, f"Unsupported MIME type: {mime}")
    try:
        raw = base64.urlsafe_b64decode(str(blob.get("data", "")))
    except (binascii.Error, ValueError):
        raise BadGeminiRequest(400, "Invalid value at 'contents[0].parts[1].inline_data.data' (TYPE_BYTES)") from None
    try:
        im = Image.open(io.BytesIO(raw))
        size = im.size  # before the draft, which decodes at an eighth of it
        im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        im.load()
    except Exception:  # noqa: BLE001 - whatever Pillow raises on bytes that are no image
        raise BadGeminiRequest(400, "Unable to process input image. Please retry or report in the forum.") from None
    return raw, im, size
