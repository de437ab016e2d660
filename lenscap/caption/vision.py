"""Facts about an image that need no model: size, orientation, colours, brightness, contrast, and,
with optional extras, text (OCR) and faces. Shared by the ``describe`` backend and ``--hints ocr``."""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageStat

from lenscap.caption.image_prep import UnreadableImage
from lenscap.core.errors import MissingDependency
from lenscap.core.install import install_hint

__all__ = [
    "ImageFacts",
    "image_facts",
    "read_text",
    "read_text_from_bytes",
    "count_faces",
    "ocr_available",
    "faces_available",
    "COLOUR_NAMES",
]

COLOUR_NAMES: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "dark grey": (70, 70, 70),
    "grey": (128, 128, 128),
    "light grey": (190, 190, 190),
    "white": (245, 245, 245),
    "red": (200, 35, 35),
    "dark red": (110, 20, 20),
    "orange": (240, 140, 30),
    "yellow": (235, 215, 50),
    "olive": (120, 120, 40),
    "green": (50, 160, 60),
    "dark green": (25, 80, 35),
    "teal": (30, 140, 140),
    "cyan": (60, 200, 220),
    "light blue": (140, 180, 230),
    "blue": (40, 70, 200),
    "navy": (20, 30, 90),
    "purple": (120, 50, 150),
    "pink": (235, 140, 180),
    "magenta": (210, 50, 170),
    "brown": (115, 75, 40),
    "beige": (220, 200, 160),
}
_NAMES = list(COLOUR_NAMES)
_PALETTE = Image.new("P", (1, 1))
_PALETTE.putpalette([c for rgb in COLOUR_NAMES.values() for c in rgb] + [0] * (768 - 3 * len(COLOUR_NAMES)))


@dataclass
class ImageFacts:
    width: int
    height: int
    colours: list[tuple[str, float]]  # name, share of the pixels
    brightness: float  # mean luma, 0..255
    contrast: float  # luma standard deviation
    text: list[str] = field(default_factory=list)
    faces: int | None = None


def image_facts(data: bytes, with_text: bool = False, with_faces: bool = False) -> ImageFacts:
    im = Image.open(io.BytesIO(data))
    width, height = im.size
    im.draft("RGB", (256, 256))  # JPEG: decode at reduced size; statistics do not need every pixel
    rgb = im.convert("RGB")
    small = rgb.copy()
    small.thumbnail((128, 128))
    quantized = small.quantize(palette=_PALETTE, dither=Image.Dither.NONE)
    counts = sorted(((n, i) for n, i in quantized.getcolors(256) or [] if i < len(_NAMES)), reverse=True)
    total = sum(n for n, _ in counts) or 1
    colours = [(_NAMES[i], n / total) for n, i in counts[:3] if n / total >= 0.08]
    luma = ImageStat.Stat(small.convert("L"))
    facts = ImageFacts(width, height, colours, luma.mean[0], luma.stddev[0])
    if with_text:
        facts.text = read_text(rgb)
    if with_faces:
        facts.faces = count_faces(rgb)
    return facts


# -- optional extras: OCR (rapidocr-onnxruntime, which bundles its models) and OpenCV's face cascade --

_ocr_engine: Any = None
_ocr_lock = threading.Lock()


def ocr_available() -> bool:
    try:
        import rapidocr_onnxruntime  # noqa: F401 - optional (the ocr extra)
    except ImportError:
        return False
    return True


def read_text(image: Image.Image, min_score: float = 0.6) -> list[str]:
    """Legible text, top to bottom, as the OCR engine read it."""
    return [text for _, text in read_text_boxes(image, min_score)]


def read_text_boxes(image: Image.Image, min_score: float = 0.6) -> list[tuple[list[list[float]], str]]:
    """(box corners, text) for each legible line, top to bottom."""
    global _ocr_engine
    try:
        from rapidocr_onnxruntime import RapidOCR  # optional (the ocr extra)
    except ImportError:
        raise MissingDependency(f"reading text in images needs the ocr extra: {install_hint('ocr')}") from None
    with _ocr_lock:
        if _ocr_engine is None:
            _ocr_engine = RapidOCR()
        found, _ = _ocr_engine(np.asarray(image))
    lines = sorted(found or [], key=lambda r: (r[0][0][1], r[0][0][0]))
    return [(box, text.strip()) for box, text, score in lines if float(score) >= min_score and text.strip()]


def read_text_from_bytes(data: bytes) -> list[str]:
    """``read_text`` on encoded image bytes. Raises ``UnreadableImage``."""
    try:
        im = Image.open(io.BytesIO(data))
        im.draft("RGB", (1600, 1600))  # OCR needs the detail that small text has; no more than that
        rgb = im.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise UnreadableImage(f"cannot decode image: {type(e).__name__}: {e}") from None
    return read_text(rgb)


def faces_available() -> bool:
    """OpenCV 4.x with its bundled cascades. OpenCV 5 (pulled in by the ocr extra) has no
    CascadeClassifier, so faces are then not counted."""
    try:
        import cv2  # optional (the ocr extra)
    except ImportError:
        return False
    cascades = getattr(getattr(cv2, "data", None), "haarcascades", None)
    return (
        bool(cascades) and hasattr(cv2, "CascadeClassifier") and os.path.exists(cascades + "haarcascade_frontalface_default.xml")
    )


_cascade: Any = None


def count_faces(image: Image.Image) -> int:
    """Frontal faces found by OpenCV's bundled Haar cascade: a count, not an identification."""
    global _cascade
    try:
        import cv2  # optional (the ocr extra)
    except ImportError:
        raise MissingDependency("counting faces needs OpenCV (opencv-python-headless)") from None
    if _cascade is None:
        _cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    gray = np.asarray(image.convert("L"))
    found = _cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
    return len(found)
