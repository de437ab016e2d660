"""Deterministic synthetic images, and the broken files the web serves as images."""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw, ImageFilter

__all__ = ["scene", "scene_caption", "jpeg_bytes", "png_bytes", "truncated_jpeg", "html_page", "bomb_png"]

_COLOURS = {
    "red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 210, 50),
    "purple": (130, 50, 160), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
_SHAPES = ("circle", "square", "triangle")


def _plan(seed: int) -> tuple[str, list[tuple[str, str]]]:
    rng = random.Random(seed)
    background = rng.choice(list(_COLOURS))
    shapes = [(rng.choice([c for c in _COLOURS if c != background]), rng.choice(_SHAPES)) for _ in range(rng.randint(1, 4))]
    return background, shapes


def scene(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A gradient background with a few coloured shapes; the same seed gives the same image."""
    rng = random.Random(seed * 7919 + 1)
    background, shapes = _plan(seed)
    w, h = size
    base = Image.new("RGB", size, _COLOURS[background])
    overlay = Image.linear_gradient("L").resize(size).point(lambda v: v // 3)
    img = Image.composite(Image.new("RGB", size, (255, 255, 255)), base, overlay)
    draw = ImageDraw.Draw(img)
    for colour, shape in shapes:
        r = rng.randint(min(w, h) // 10, min(w, h) // 4)
        cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=_COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=_COLOURS[colour])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=_COLOURS[colour])
    return img.filter(ImageFilter.SMOOTH)


def scene_caption(seed: int) -> str:
    """An alt-text-like caption for ``scene(seed)``: short and a little vague, as on the web."""
    background, shapes = _plan(seed)
    things = ", ".join(f"a {c} {s}" for c, s in shapes)
    return f"{things} on {background}"


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def truncated_jpeg(seed: int = 0) -> bytes:
    """A JPEG cut off part-way, as a dropped connection leaves it."""
    data = jpeg_bytes(scene(seed))
    return data[: len(data) * 2 // 3]


def html_page() -> bytes:
    return b"<!DOCTYPE html><html><head><title>Not Found</title></head><body>Image not found</body></html>"


def bomb_png(side: int = 20_000) -> bytes:
    """A small file that decodes to side*side pixels (400 million by default)."""
    return png_bytes(Image.new("1", (side, side)))
