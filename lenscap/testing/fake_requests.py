"""What the fake OpenAI-compatible server checks in a chat-completions request, as the real API would:
its shape, its model and token limit, and that every image is a base64 data URL that decodes. The chat
endpoint (``fake_openai``) and the batch endpoints (``fake_batches``, each line of a batch file) share it."""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

from PIL import Image

__all__ = ["BadRequest", "validate"]


class BadRequest(Exception):
    """A request the real API would answer with an error: its status, message and code."""

    def __init__(self, status: int, message: str, code: str | None = None, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.code, self.type_ = status, code, type_


def validate(req: Any, decode: bool) -> tuple[str, list[str], list[tuple[bytes, Image.Image | None, tuple[int, int]]], int]:
    """Check a chat-completions request as the real API would; returns model, texts, images, max tokens."""
    if not isinstance(req, dict):
        raise BadRequest(400, "The request body must be a JSON object.")
    model = req.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(400, "you must provide a model parameter", "missing_required_parameter")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "'messages' must be a non-empty array.", "invalid_value")
    max_tokens = req.get("max_completion_tokens", req.get("max_tokens", 4096))
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(400, "max_tokens must be a positive integer.", "invalid_value")
    texts: list[str] = []
    images: list[tuple[bytes, Image.Image | None, tuple[int, int]]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "developer", "user", "assistant"):
            raise BadRequest(400, f"Invalid value for 'messages[{i}].role'.", "invalid_value")
        content = msg.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, list):
            raise BadRequest(400, f"Invalid type for 'messages[{i}].content'.", "invalid_type")
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                images.append(_decode_image(str(part["image_url"].get("url", "")), decode))
            else:
                raise BadRequest(400, f"Invalid content part in 'messages[{i}]'.", "invalid_value")
    return model, texts, images, max_tokens


def _decode_image(url: str, decode: bool) -> tuple[bytes, Image.Image | None, tuple[int, int]]:
    m = re.match(r"data:image/(jpeg|png|webp|gif);base64,(.*)$", url, re.S)
    if not m:
        raise BadRequest(
            400, "Invalid image URL: expected a base64 data URL of a JPEG, PNG, WEBP or GIF image.", "invalid_image_url"
        )
    try:
        raw = base64.b64decode(m.group(2), validate=True)
    except binascii.Error:
        raise BadRequest(400, "Invalid base64 image data.", "invalid_image_format") from None
    try:
        im = Image.open(io.BytesIO(raw))
        size = im.size
        if decode:
            im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
    except Exception:  # noqa: BLE001
        raise BadRequest(
            400, "You uploaded an unsupported image. Please make sure your image is valid.", "invalid_image"
        ) from None
    return raw, (im if decode else None), size
