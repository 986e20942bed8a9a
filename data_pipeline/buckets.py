"""Aspect-ratio buckets (PixArt/SDXL-style): a table of (H, W) near base_resolution**2 in area."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

# Height/width ratios of PixArt-alpha's ASPECT_RATIO_* tables (0.25 .. 4.0). At a small base and a
# coarse multiple several collapse onto the same (H, W); the table is de-duplicated after rounding.
DEFAULT_RATIOS: list[float] = [
    0.25, 0.28, 0.32, 0.35, 0.4, 0.42, 0.48, 0.5, 0.52, 0.57, 0.6, 0.68, 0.72, 0.78, 0.82, 0.88, 0.94,
    1.0, 1.07, 1.13, 1.21, 1.29, 1.38, 1.46, 1.67, 1.75, 2.0, 2.09, 2.4, 2.5, 2.89, 3.0, 3.11, 3.62,
    3.75, 3.88, 4.0,
]  # fmt: skip


@dataclass(kw_only=True)
class BucketConfig:
    """Bucket table: ratios (H/W) at a base resolution, sides rounded to a multiple of 16 or 32."""

    base_resolution: int = 256
    multiple: Literal[16, 32] = 32
    ratios: list[float] | None = None  # H/W; None -> DEFAULT_RATIOS
    max_ratio: float = 4.0  # ratios beyond max(r, 1/r) > max_ratio are dropped from the table

    def __post_init__(self) -> None:
        if self.base_resolution < 2 * self.multiple:
            raise ValueError(f"base_resolution must be >= 2 * multiple, got {self.base_resolution}")
        if self.ratios is not None and (not self.ratios or any(r <= 0 for r in self.ratios)):
            raise ValueError("ratios must be a non-empty list of positive H/W ratios")
        if self.max_ratio < 1.0:
            raise ValueError(f"max_ratio must be >= 1, got {self.max_ratio}")


def _round_bucket(ratio: float, base: int, m: int) -> tuple[int, int]:
    """The (H, W), multiples of m, closest to ratio H/W with area closest to base**2."""
    h0, w0 = base * math.sqrt(ratio), base / math.sqrt(ratio)
    best, best_err = (m, m), math.inf
    for h in {max(m, math.floor(h0 / m) * m), max(m, math.ceil(h0 / m) * m)}:
        for w in {max(m, math.floor(w0 / m) * m), max(m, math.ceil(w0 / m) * m)}:
            err = abs(math.log(h * w / base**2)) + abs(math.log(h / w / ratio))
            if err < best_err - 1e-12 or (abs(err - best_err) <= 1e-12 and (h, w) < best):
                best, best_err = (h, w), err
    return best


def bucket_table(cfg: BucketConfig) -> list[tuple[int, int]]:
    """Sorted, de-duplicated list of (H, W) buckets for a config (ascending H/W)."""
    ratios = DEFAULT_RATIOS if cfg.ratios is None else cfg.ratios
    out = set()
    for r in ratios:
        if max(r, 1 / r) <= cfg.max_ratio + 1e-9:
            out.add(_round_bucket(r, cfg.base_resolution, cfg.multiple))
    if not out:
        raise ValueError(f"no bucket ratio within max_ratio={cfg.max_ratio}")
    return sorted(out, key=lambda hw: (hw[0] / hw[1], hw))


def assign_bucket(width: int, height: int, table: list[tuple[int, int]]) -> tuple[int, int]:
    """The (H, W) bucket whose log aspect ratio is closest to the image's (ties: first in table)."""
    target = math.log(height / width)
    return min(table, key=lambda hw: abs(math.log(hw[0] / hw[1]) - target))


def bucket_name(hw: tuple[int, int]) -> str:
    """Bucket label "HxW" as stored in shards and manifests."""
    return f"{hw[0]}x{hw[1]}"
