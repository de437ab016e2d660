"""A minimal lenscap caption backend: the caption is the image's size and the prompt's first words."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable

from PIL import Image

from lenscap.plugin import ERROR, OK, CaptionBackend, CaptionRequest, CaptionResult, Option


class EchoBackend(CaptionBackend):
    """Echoes the image size and the instruction: a plugin example, not a captioner."""

    name = "echo"  # what --backend takes; the entry point's name in pyproject.toml
    options = (  # -O prefix=... -O upper=true; lenscap parses and checks them, and refuses unknown ones
        Option("prefix", str, "", "Text put before every caption."),
        Option("upper", bool, False, "Upper-case the caption."),
    )

    def __init__(self, prefix: str = "", upper: bool = False) -> None:
        self.prefix, self.upper = prefix, upper
        self.model = "echo-1"  # the caption_model column; left out, it would be the backend's name

    def caption_all(self, requests: Iterable[CaptionRequest], on_result: Callable[[CaptionResult], None]) -> None:
        for r in requests:  # one result per request, in any order
            try:
                w, h = Image.open(io.BytesIO(r.image)).size
            except Exception as e:  # noqa: BLE001 - a bad image is this sample's outcome, not the job's
                on_result(CaptionResult(r.key, ERROR, error=f"not an image: {e}"))
                continue
            text = f"{self.prefix}{w}x{h} image; asked: {' '.join(r.instruction.split()[:4])}"
            on_result(CaptionResult(r.key, OK, caption=text.upper() if self.upper else text, cost_usd=0.0))
