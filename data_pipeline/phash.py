"""64-bit DCT perceptual hash (pHash): 32x32 grayscale -> 2-D DCT -> top-left 8x8 -> above median."""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

HASH_SIZE = 8  # 8x8 low-frequency block -> 64 bits
IMG_SIZE = 32  # the DCT input; 4x the hash size, as in the classic pHash


def _dct_rows(n: int, k: int) -> np.ndarray:
    """The first k rows of the orthonormal DCT-II matrix of size n: (k, n)."""
    # Written out rather than scipy.fft.dctn: only 8 of 32 coefficients per axis are needed, two small
    # matmuls compute exactly those, and each ingest worker is spared importing scipy.fft (~0.3 s).
    i = np.arange(n, dtype=np.float64)
    rows = np.stack([np.cos(math.pi * (2 * i + 1) * u / (2 * n)) for u in range(k)])  # (k, n)
    rows[0] *= math.sqrt(1 / n)
    rows[1:] *= math.sqrt(2 / n)
    return rows


_DCT = _dct_rows(IMG_SIZE, HASH_SIZE)  # (8, 32)


def _gray(img: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 (H, W) luma of a PIL image or an (H, W[, 3]) uint8 RGB array (ITU-R 601 weights, as PIL "L")."""
    if isinstance(img, Image.Image):
        img = np.asarray(img if img.mode in ("L", "RGB") else img.convert("RGB"))
    if img.ndim == 2:
        return img
    return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)


def phash(img: Image.Image | np.ndarray) -> int:
    """64-bit perceptual hash of an image (PIL or uint8 RGB array); near-duplicates differ in few bits."""
    # INTER_AREA is an exact pixel-area average: every source pixel counts, so the hash of a large
    # image is as stable as a small one's and costs one pass over the pixels.
    small = cv2.resize(_gray(img), (IMG_SIZE, IMG_SIZE), interpolation=cv2.INTER_AREA)
    coeffs = _DCT @ small.astype(np.float64) @ _DCT.T  # (8, 8), DC at [0, 0]; == dctn(type 2, ortho)[:8, :8]
    bits = (coeffs > np.median(coeffs)).ravel()  # (64,) row-major
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def phash_hex(value: int) -> str:
    """The 16-hex-digit form stored in KEY.json."""
    return f"{value:016x}"


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes."""
    return (a ^ b).bit_count()
