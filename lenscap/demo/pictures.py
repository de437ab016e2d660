"""Deterministic synthetic images, and the broken files the web serves as images."""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "scene",
    "photo",
    "graphic",
    "colour_pair",
    "scene_caption",
    "jpeg_bytes",
    "png_bytes",
    "truncated_jpeg",
    "html_page",
    "bomb_png",
]

_COLOURS = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (230, 210, 50),
    "purple": (130, 50, 160),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
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


def graphic(seed: int, size: tuple[int, int] = (400, 300)) -> Image.Image:
    """A flat graphic: one to three plain shapes on a plain background, no gradient, no texture (an
    icon, a chart, a logo): little for a perceptual hash to go on."""
    rng = random.Random(seed * 31337 + 3)
    colours = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(3)]
    img = Image.new("RGB", size, colours[0])
    draw = ImageDraw.Draw(img)
    w, h = size
    for k in range(rng.randint(1, 3)):
        side = rng.randint(min(w, h) // 10, min(w, h) * 2 // 5)
        x, y = rng.randrange(w - side), rng.randrange(h - side)
        (draw.rectangle if k % 2 == 0 else draw.ellipse)((x, y, x + side, y + side), fill=colours[1 + k % 2])
    return img


# Dark background, light shapes: pHash sees the same light/dark layout in every one of these.
_DARK_LIGHT = (
    ((0, 0, 0), (0, 200, 0)),
    ((0, 160, 0), (255, 150, 200)),
    ((20, 20, 120), (250, 220, 40)),
    ((120, 20, 20), (200, 240, 255)),
    ((60, 60, 60), (255, 255, 255)),
)


def colour_pair(seed: int, size: tuple[int, int] = (300, 300)) -> tuple[Image.Image, Image.Image]:
    """Two distinct flat graphics with one layout and the same light/dark order in different colours (a
    black image with a green square, a green image with a pink square): they hash within a few bits."""
    rng = random.Random(seed * 7 + 5)
    w, h = size
    boxes = []
    for _ in range(rng.randint(1, 2)):
        side = rng.randint(min(w, h) // 5, min(w, h) // 2)
        x, y = rng.randrange(w - side), rng.randrange(h - side)
        boxes.append((x, y, x + side, y + side))
    out = []
    for dark, light in (_DARK_LIGHT[seed % 5], _DARK_LIGHT[(seed + 1) % 5]):
        img = Image.new("RGB", size, dark)
        for box in boxes:
            ImageDraw.Draw(img).rectangle(box, fill=light)
        out.append(img)
    return out[0], out[1]


def photo(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """``scene(seed)`` over a smooth random colour field: as distinct from other seeds as photos are
    from each other (perceptual hashes of unrelated photos differ in 14 or more bits of 64)."""
    rng = random.Random(seed * 104729 + 7)
    field = Image.new("RGB", (8, 6))
    field.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(48)])
    return Image.blend(field.resize(size, Image.Resampling.BICUBIC), scene(seed, size), 0.5)


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


def cartoon_face(size: int = 300) -> Image.Image:
    """A drawn face (head, eyes, brows, nose, mouth) that OpenCV's frontal-face cascade finds."""
    im = Image.new("RGB", (size, size), (90, 90, 90))
    d = ImageDraw.Draw(im)
    s = size
    d.ellipse((s * 0.2, s * 0.1, s * 0.8, s * 0.9), fill=(225, 190, 160))
    for x in (0.32, 0.56):
        d.ellipse((s * x, s * 0.35, s * (x + 0.12), s * 0.43), fill=(30, 30, 30))
        d.rectangle((s * (x - 0.02), s * 0.3, s * (x + 0.14), s * 0.32), fill=(60, 40, 30))
    d.polygon([(s * 0.5, s * 0.45), (s * 0.45, s * 0.6), (s * 0.55, s * 0.6)], fill=(200, 160, 130))
    d.ellipse((s * 0.4, s * 0.66, s * 0.6, s * 0.74), fill=(150, 60, 60))
    return im.filter(ImageFilter.GaussianBlur(2))
