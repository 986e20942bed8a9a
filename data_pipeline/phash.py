"""64-bit DCT perceptual hash (pHash): 32x32 grayscale -> 2-D DCT -> top-left 8x8 -> above median."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.fft import dctn

HASH_SIZE = 8  # 8x8 low-frequency block -> 64 bits
IMG_SIZE = 32  # the DCT input; 4x the hash size, as in the classic pHash


def phash(img: Image.Image) -> int:
    """64-bit perceptual hash of an image; near-duplicates differ in few bits."""
    # reducing_gap makes PIL box-reduce first, so hashing a large image costs little.
    gray = img.convert("L").resize((IMG_SIZE, IMG_SIZE), Image.Resampling.LANCZOS, reducing_gap=2.0)
    pixels = np.asarray(gray, dtype=np.float64)  # (32, 32)
    coeffs = dctn(pixels, type=2, norm="ortho")[:HASH_SIZE, :HASH_SIZE]  # (8, 8), DC at [0, 0]
    bits = (coeffs > np.median(coeffs)).ravel()  # (64,) row-major
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def phash_hex(value: int) -> str:
    """The 16-hex-digit form stored in KEY.json."""
    return f"{value:016x}"


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes."""
    return (a ^ b).bit_count()
