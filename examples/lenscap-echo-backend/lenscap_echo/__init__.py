"""A minimal lenscap caption backend: the caption is the image's size and the prompt's first words."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable

from PIL import Image

from lenscap.backends.base import ERROR, OK, CaptionBackend, CaptionRequest, CaptionResult, Option


class EchoBackend(CaptionBackend):
    """Echoes the image size and the instruction: a plugin example, not a captioner."""

    name = "echo"
    options = (
        Option("prefix", str, "", "Text put before every caption."),
        Option("upper", bool, False, "Upper-case the caption."),
    )

    def __init__(self, prefix: str = "", upper: bool = False) -> None:
        self.prefix, self.upper = prefix, upper
        self.model = "echo-1"

    def caption_all(self, requests: Iterable[CaptionRequest], on_result: Callable[[CaptionResult], None]) -> None:
        for r in requests:
            try:
                w, h = Image.open(io.BytesIO(r.image)).size
            except Exception as e:  # noqa: BLE001
                on_result(CaptionResult(r.key, ERROR, error=f"not an image: {e}"))
                continue
            text = f"{self.prefix}{w}x{h} image; asked: {' '.join(r.instruction.split()[:4])}"
            on_result(CaptionResult(r.key, OK, caption=text.upper() if self.upper else text, cost_usd=0.0))
