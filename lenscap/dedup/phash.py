"""A 64-bit perceptual hash (pHash) of image bytes, computed from a reduced-size decode.

The algorithm is imagehash's ``phash`` (greyscale 32x32, 2-D DCT-II, the 8x8 lowest frequencies
against their median, row-major, first bit most significant), with one change that makes it several
times faster: a JPEG is decoded at 1/2, 1/4 or 1/8 scale (draft mode, never below 64 pixels a side)
before the 32x32 resize, instead of decoding every pixel. Hashes therefore differ from imagehash's
by a few bits on some images, which is why every hash is stored with ``ALGORITHM``: hashes are only
ever compared with hashes of the same algorithm.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["ALGORITHM", "ImageHash", "phash", "hamming"]

ALGORITHM = "lenscap-phash-v1"
_SIDE = 32
_LOW = 8
# Below this standard deviation (grey levels out of 255) the image is blank or a single colour: its
# DCT is noise, and all such images would collide with each other.
_DEGENERATE_STD = 2.0


def _dct_rows() -> np.ndarray:
    """The first 8 rows of the unnormalised DCT-II matrix for 32 points (scipy's ``dct`` type 2)."""
    k = np.arange(_LOW)[:, None]
    n = np.arange(_SIDE)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * _SIDE))


_DCT = _dct_rows()
_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


@dataclass(frozen=True)
class ImageHash:
    phash: int  # unsigned 64-bit
    degenerate: bool  # blank or single-colour: excluded from near-duplicate search
    width: int
    height: int


def phash(data: bytes) -> ImageHash:
    """Hash encoded image bytes. Raises on bytes that are not a decodable image."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        image.draft("L", (2 * _SIDE, 2 * _SIDE))
        grey = image.convert("L").resize((_SIDE, _SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    low = _DCT @ pixels @ _DCT.T
    bits = (low > np.median(low)).ravel()
    value = int(np.bitwise_or.reduce(_WEIGHTS[bits])) if bits.any() else 0
    return ImageHash(value, bool(pixels.std() < _DEGENERATE_STD), width, height)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
