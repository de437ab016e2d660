"""``--backend describe``: an offline description computed from the image itself. No model, no key.

It says what the pixels say and nothing else: orientation and size, dominant colours by name,
brightness and contrast, any legible text verbatim (with the ``ocr`` extra), and how many frontal
faces OpenCV's cascade finds. It cannot say what the image shows. It is the demo's captioner when no
API key is set, and a baseline that costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from lenscap.caption.backends.base import ERROR, OK, CaptionBackend, CaptionRequest, CaptionResult, Option
from lenscap.caption.vision import ImageFacts, faces_available, image_facts, ocr_available
from lenscap.core.errors import MissingDependency
from lenscap.core.install import install_hint

__all__ = ["DescribeBackend", "describe_facts"]

VERSION = "describe-1"


def _size_class(w: int, h: int) -> str:
    side = max(w, h)
    return "small" if side < 320 else "medium-sized" if side < 1024 else "large"


def _orientation(w: int, h: int) -> str:
    if w > h * 1.15:
        return "landscape"
    if h > w * 1.15:
        return "portrait"
    return "square"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe_facts(f: ImageFacts) -> str:
    parts = [f"A {_size_class(f.width, f.height)} {_orientation(f.width, f.height)} image ({f.width}x{f.height} pixels)"]
    if f.colours:
        parts[0] += f", mostly {_join([name for name, _ in f.colours])}"
    light = "dark" if f.brightness < 70 else "dim" if f.brightness < 110 else "bright" if f.brightness > 185 else "evenly lit"
    contrast = "low contrast" if f.contrast < 30 else "high contrast" if f.contrast > 75 else "moderate contrast"
    sentences = [parts[0] + ".", f"It is {light}, with {contrast}."]
    if f.text:
        quoted = "; ".join(f'"{t}"' for t in f.text[:8])
        sentences.append(f"Visible text reads {quoted}.")
    if f.faces:
        sentences.append(f"{f.faces} face{'s' if f.faces != 1 else ''} {'are' if f.faces != 1 else 'is'} visible.")
    return " ".join(sentences)


class DescribeBackend(CaptionBackend):
    """An offline description computed from the pixels (size, colours, light, text, faces); no model, no key."""

    name = "describe"
    sends_prompt = False  # it reads the pixels, never the prompt
    options = (
        Option(
            "ocr",
            str,
            "auto",
            "Read visible text (needs the ocr extra): auto uses it when installed.",
            choices=("auto", "on", "off"),
        ),
        Option(
            "faces",
            str,
            "auto",
            "Count frontal faces with OpenCV's cascade: auto uses it when available.",
            choices=("auto", "on", "off"),
        ),
    )

    def __init__(self, ocr: str = "auto", faces: str = "auto") -> None:
        if ocr == "on" and not ocr_available():
            raise MissingDependency(f"--option ocr=on needs the ocr extra: {install_hint('ocr')}")
        if faces == "on" and not faces_available():
            raise MissingDependency("--option faces=on needs OpenCV (opencv-python-headless)")
        self.with_text = ocr == "on" or (ocr == "auto" and ocr_available())
        self.with_faces = faces == "on" or (faces == "auto" and faces_available())
        self.model = VERSION + ("+ocr" if self.with_text else "") + ("+faces" if self.with_faces else "")

    def identity(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model}

    def caption_all(self, requests: Iterable[CaptionRequest], on_result: Callable[[CaptionResult], None]) -> None:
        for request in requests:
            try:
                facts = image_facts(request.image, self.with_text, self.with_faces)
            except MissingDependency:
                raise
            except Exception as e:  # noqa: BLE001 - an unreadable image is this sample's outcome
                on_result(CaptionResult(request.key, ERROR, error=f"cannot decode image: {type(e).__name__}: {e}"))
                continue
            on_result(
                CaptionResult(request.key, OK, caption=describe_facts(facts), input_tokens=0, output_tokens=0, cost_usd=0.0)
            )
