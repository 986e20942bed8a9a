"""Within-run deduplication: exact (sha256) and near (64-bit pHash), decided once by the driver.

The decision is a pure function of the samples sorted by (partition index, position), so it does not
depend on which task finished first: a killed-and-resumed run drops exactly the same samples.

Near duplicates use band indexing instead of an O(N^2) scan: the 64-bit hash is split into
``max_distance + 1`` bands. Two hashes within Hamming distance ``d <= max_distance`` differ in at most
``d`` bits, which touch at most ``d`` bands, so (pigeonhole) at least one band is identical. Only
samples that share a band value are compared bit by bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(kw_only=True)
class DedupConfig:
    """Which within-run duplicate filters run, and how close a pHash must be to count as a near duplicate."""

    exact: bool = True
    near: bool = True
    phash_max_distance: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.phash_max_distance <= 31:
            raise ValueError(f"phash_max_distance must be in [0, 31], got {self.phash_max_distance}")


@dataclass(frozen=True)
class Candidate:
    """One written-so-far sample as the driver sees it: where it is and its two hashes."""

    partition: int
    position: int
    key: str
    sha256: str
    phash: int


def _hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def band_masks(max_distance: int, bits: int = 64) -> list[tuple[int, int]]:
    """(shift, mask) of ``max_distance + 1`` contiguous bands covering ``bits`` bits."""
    n = max_distance + 1
    edges = [round(i * bits / n) for i in range(n + 1)]
    return [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]


class NearIndex:
    """Kept pHashes indexed by band value, answering "is any kept hash within d bits?"."""

    def __init__(self, max_distance: int) -> None:
        self.max_distance = max_distance
        self.bands = band_masks(max_distance)
        self.tables: list[dict[int, list[tuple[int, str]]]] = [{} for _ in self.bands]

    def find(self, phash: int) -> str | None:
        """Key of the first kept hash within ``max_distance`` of ``phash``, else None."""
        for (shift, mask), table in zip(self.bands, self.tables):
            for other, key in table.get((phash >> shift) & mask, ()):
                if _hamming(phash, other) <= self.max_distance:
                    return key
        return None

    def add(self, phash: int, key: str) -> None:
        """Index a kept hash under each of its band values."""
        for (shift, mask), table in zip(self.bands, self.tables):
            table.setdefault((phash >> shift) & mask, []).append((phash, key))


def decide(candidates: Iterable[Candidate], cfg: DedupConfig) -> dict[tuple[int, int], tuple[str, str]]:
    """Map (partition, position) of every dropped sample to (reason, detail); the first occurrence wins."""
    drops: dict[tuple[int, int], tuple[str, str]] = {}
    by_sha: dict[str, str] = {}
    keys: set[str] = set()
    near = NearIndex(cfg.phash_max_distance) if cfg.near else None
    for c in sorted(candidates, key=lambda c: (c.partition, c.position)):
        where = (c.partition, c.position)
        if c.key in keys:
            # Keys come from source ids; two inputs with one id would collide inside the dataset.
            drops[where] = ("duplicate", f"same key as an earlier sample: {c.key}")
            continue
        if cfg.exact and c.sha256 in by_sha:
            drops[where] = ("duplicate", f"same sha256 as {by_sha[c.sha256]}")
            continue
        if near is not None:
            hit = near.find(c.phash)
            if hit is not None:
                drops[where] = ("near_duplicate", f"phash within {cfg.phash_max_distance} bits of {hit}")
                continue
            near.add(c.phash, c.key)
        by_sha.setdefault(c.sha256, c.key)
        keys.add(c.key)
    return drops
