"""Colour thumbnails of low-information images, and the check that two of them show the same picture.

A perceptual hash sees only the light/dark layout of a greyscale image, so flat graphics collide: a
black image with a green square and a green image with a pink square hash within 0-4 bits. For an
image whose hash quality is low (``phash.LOW_QUALITY``), the signature keeps a 16x16 RGB thumbnail
(768 bytes), and a pair found by the hash search is merged only if the thumbnails agree: the mean
absolute difference of their channels, in the best of the 8 flips and rotations, at most
``MAX_THUMBNAIL_DIFFERENCE`` grey levels. Measured on generated flat graphics: resized, recompressed
(JPEG quality 35) and flipped copies 0.3-2.0; same-layout colour pairs 40 and more; any two of 40
distinct flat graphics at least 11.

Thumbnails are kept below ``THUMBNAIL_BELOW``, 1.5 times the low-quality line, so that a copy whose
quality lands just above the line still has one to be compared with.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["THUMBNAIL_SIDE", "THUMBNAIL_BELOW", "MAX_THUMBNAIL_DIFFERENCE", "thumbnail", "thumbnail_of", "thumbnail_differences"]

THUMBNAIL_SIDE = 16
THUMBNAIL_BELOW = 75.0
MAX_THUMBNAIL_DIFFERENCE = 6.0


def thumbnail(data: bytes) -> bytes:
    """The 16x16 RGB thumbnail (box-filtered, aspect ignored, 768 bytes) of encoded image bytes; a
    JPEG decoded at reduced scale."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (4 * THUMBNAIL_SIDE, 4 * THUMBNAIL_SIDE))
        return thumbnail_of(image)


def thumbnail_of(image: Image.Image) -> bytes:
    """The 16x16 RGB thumbnail of an opened image."""
    return image.convert("RGB").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BOX).tobytes()


def _pixels(thumbs: list[bytes]) -> np.ndarray:
    raw = np.frombuffer(b"".join(thumbs), dtype=np.uint8)
    return raw.reshape(len(thumbs), THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3).astype(np.int16)


def thumbnail_differences(a: list[bytes], b: list[bytes]) -> np.ndarray:
    """For each pair (a[i], b[i]), the mean absolute channel difference in the best of b's 8 flips and
    rotations (a flipped or rotated copy is compared the way round it matches)."""
    if not a:
        return np.zeros(0)
    x, y = _pixels(a), _pixels(b)
    best = np.full(len(a), np.inf)
    for turned in (y, y.transpose(0, 2, 1, 3)):
        for variant in (turned, turned[:, ::-1], turned[:, :, ::-1], turned[:, ::-1, ::-1]):
            best = np.minimum(best, np.abs(x - variant).mean(axis=(1, 2, 3)))
    return best
