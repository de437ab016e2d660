"""A 64-bit perceptual hash (pHash) of image bytes and of the image's 8 flips and rotations, with a
quality, computed from one reduced-size decode and one DCT.

The hash is imagehash's ``phash`` (greyscale 32x32, 2-D DCT-II, the 8x8 lowest frequencies against
their median, row-major, first bit most significant), with one change that makes it several times
faster: a JPEG is decoded at 1/2, 1/4 or 1/8 scale (draft mode, never below 64 pixels a side) before
the 32x32 resize, instead of decoding every pixel. Hashes therefore differ from imagehash's by a few
bits on some images, which is why every hash is stored with ``ALGORITHM``: hashes are only ever
compared with hashes of the same algorithm.

The dihedral variants (the hash the image would have if it were flipped, or rotated by 90, 180 or
270 degrees) come from the same 8x8 block: flipping the 32x32 image left to right multiplies DCT-II
coefficient (u, v) by (-1)^v, top to bottom by (-1)^u, and transposing it swaps u and v. Each variant
block is thresholded by its own median, so a variant is bit for bit the hash of the transformed
image's 32x32 resize.

What the search indexes (``keys``) is the hash as it is, plus the hash of the image's canonical
orientation: the one whose coefficients (0, 1) and (1, 0), the left-right and top-bottom brightness
slopes, are both positive, the first at least as large as the second. Every flip and rotation of an
image has the same canonical orientation, so flipped and rotated copies meet on it. Where the choice
is close (a slope within ``CANONICAL_MARGIN`` of the block's AC energy of zero, or the two within it
of each other), every orientation that qualifies within the margin is a key too, so noise that tips
the choice does not lose the copy: 2.4 keys per photo in all. The search took 2-4 times v1's time
(one hash per image) at 200,000 and 1M images; indexing all 8 variants instead (each image as it is
joined with every variant of every other) took 12 times (``bench/dedup_tiers.py``).

The quality (0-100, like PDQ's) is the share of the 32x32 grey image that has texture: the percentage
of pixels whose difference from their right and lower neighbours adds up to more than 2 grey levels.
A flat graphic (shapes on a plain background) has texture only along its edges and measured 0-36;
the photo-like test images 89-95, recompressed copies the same. Two other measures were tried and do
not separate them: the DCT energy of the low block (a green square on black carries more
low-frequency energy than most photos) and the mean gradient (a high-contrast square's edges weigh
as much as a photo's texture). Below ``LOW_QUALITY`` a hash match alone is not trusted
(``dedup.thumbnails``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from lenscap.dedup.thumbnails import THUMBNAIL_BELOW, thumbnail, thumbnail_of

__all__ = ["ALGORITHM", "LOW_QUALITY", "CANONICAL_MARGIN", "ImageHash", "phash", "hamming"]

# v2: v1's hash plus its canonical orientations, the quality and a thumbnail of low-information images.
ALGORITHM = "lenscap-phash-v2"
CANONICAL_MARGIN = 0.05
# Below this quality a near-hash match is verified by the pair's colour thumbnails.
LOW_QUALITY = 50.0
_SIDE = 32
_LOW = 8
# Below this standard deviation (grey levels out of 255) the image is blank or a single colour: its
# DCT is noise, and all such images would collide with each other.
_DEGENERATE_STD = 2.0
_TEXTURE_LEVELS = 2.0


def _dct_rows() -> np.ndarray:
    """The first 8 rows of the unnormalised DCT-II matrix for 32 points (scipy's ``dct`` type 2)."""
    k = np.arange(_LOW)[:, None]
    n = np.arange(_SIDE)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * _SIDE))


_DCT = _dct_rows()
_ODD = (-1.0) ** np.arange(_LOW)
# The 8 orientations, identity first, as (transpose, sign pattern): flipping top-bottom multiplies
# row u by (-1)^u, left-right column v by (-1)^v.
_SIGNS = np.stack([np.outer(_ODD if fy else np.ones(_LOW), _ODD if fx else np.ones(_LOW)) for fy in (0, 1) for fx in (0, 1)])


@dataclass(frozen=True)
class ImageHash:
    phash: int  # unsigned 64-bit, the image as it is
    variants: tuple[int, ...]  # the 8 dihedral variants, ``phash`` first
    keys: tuple[int, ...]  # what the search indexes: ``phash``, then the canonical orientation(s)
    quality: float  # percentage of the 32x32 grey image with texture
    degenerate: bool  # blank or single-colour: excluded from near-duplicate search
    width: int
    height: int
    thumbnail: bytes | None = None  # 16x16 RGB, for images below ``THUMBNAIL_BELOW`` quality

    @property
    def low_quality(self) -> bool:
        return self.quality < LOW_QUALITY


def dihedral_blocks(low: np.ndarray) -> np.ndarray:
    """The 8x8 DCT blocks of the 8 flips and rotations of the image whose block is ``low``, it first."""
    return np.concatenate([low[None] * _SIGNS, low.T[None] * _SIGNS])


def hashes_of(blocks: np.ndarray) -> tuple[int, ...]:
    """One hash per 8x8 block, each against its own median."""
    flat = blocks.reshape(len(blocks), _LOW * _LOW)
    packed = np.packbits(flat > np.median(flat, axis=1, keepdims=True), axis=1)  # first bit most significant
    return tuple(int.from_bytes(row.tobytes(), "big") for row in packed)


def canonical(blocks: np.ndarray) -> np.ndarray:
    """Which of the 8 orientation blocks are canonical, within ``CANONICAL_MARGIN``: both brightness
    slopes positive, the left-right one the larger. Exactly one when no choice is close."""
    energy = np.sqrt(max(float((blocks[0] ** 2).sum() - blocks[0, 0, 0] ** 2), 1e-9))
    across, down = blocks[:, 0, 1] / energy, blocks[:, 1, 0] / energy
    m = CANONICAL_MARGIN
    return (across >= -m) & (down >= -m) & (np.abs(across) >= np.abs(down) - m)


def _texture(pixels: np.ndarray) -> float:
    """The percentage of pixels whose right and lower neighbours differ from them by more than 2 levels in all."""
    gradient = np.zeros_like(pixels)
    gradient[:, :-1] += np.abs(np.diff(pixels, axis=1))
    gradient[:-1, :] += np.abs(np.diff(pixels, axis=0))
    return float(100.0 * (gradient > _TEXTURE_LEVELS).mean())


def phash(data: bytes) -> ImageHash:
    """Hash encoded image bytes. Raises on bytes that are not a decodable image."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        # A JPEG is decoded in grey at reduced scale: its thumbnail, when one is needed, decodes it
        # again in colour. Any other format is decoded once, whole, for both.
        jpeg = image.format == "JPEG"
        if jpeg:
            image.draft("L", (2 * _SIDE, 2 * _SIDE))
        grey = image.convert("L").resize((_SIDE, _SIDE), Image.Resampling.LANCZOS)
        pixels = np.asarray(grey, dtype=np.float64)
        quality = _texture(pixels)
        # Only low-information images need their colours to be told apart: the others keep no thumbnail.
        thumb = None if quality >= THUMBNAIL_BELOW else thumbnail(data) if jpeg else thumbnail_of(image)
    blocks = dihedral_blocks(_DCT @ pixels @ _DCT.T)
    variants = hashes_of(blocks)
    keys = tuple(dict.fromkeys([variants[0], *(h for h, c in zip(variants, canonical(blocks)) if c)]))
    return ImageHash(variants[0], variants, keys, quality, bool(pixels.std() < _DEGENERATE_STD), width, height, thumb)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
