"""The plan: which samples each reader turns into which batches, a pure function of (seed, epoch, manifest, layout).

A *reader* is one DataLoader worker of one rank (a rank without workers is one reader); readers are numbered
``rank * workers + worker``, so a node's readers are consecutive. Nothing here reads a shard: the manifest's
per-shard bucket counts are all the plan needs, because a sample is named by its *slot* ``(order_epoch, shard,
bucket, j)``: "the j-th sample of ``bucket`` in ``shard``, in the within-shard order seeded by ``order_epoch``".
The reader that holds the shard resolves a slot to a key (``shards.py``).

Work is described by *pieces* (JSON lists): ``[SPAN, oe, s, q0, q1]`` is positions ``q0..q1`` of shard ``s``'s
label stream under ``oe`` (a seeded interleaving of its bucket labels, how its samples arrive), ``[RUN, oe, s, k,
j0, j1]`` is samples ``j0..j1`` of bucket ``k`` of shard ``s``. A *segment* gives each reader a list of pieces:

* epoch ``e`` (gen 0): the readers' carried-in pieces (pinned to the reader that left them, whose node has those
  shards), then the *canonical order* -- every shard, permuted by (seed, e) -- cut into consecutive spans, one per
  reader in reader order, sized so that every reader holds the same number of samples. So each node reads one
  contiguous part of the shards, and only a shard on a boundary between two nodes is read by both;
* after an elastic resume (gen g > 0): what every old reader left unconsumed, cut the same way over the new readers.

A reader's stream (``stream.py``) forms one-bucket batches; every reader of a segment emits the same number of
batches (the readers' minimum), so ranks stay in lockstep; what a reader does not emit -- its partial buckets and
its surplus batches -- is carried into the next epoch (pinned to it) or dropped, counted either way.
Per process a segment costs O(shards x buckets) plus one label stream per cut shard: never O(samples).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import numpy as np

SPAN, RUN = 0, 1
CARRY, DROP = "carry", "drop"


def seed_int(*parts: object) -> int:
    """A 64-bit seed from any tuple of parts (stable across processes and PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) from a tuple of parts."""
    return seed_int(*parts) / 2.0**64


def shuffle_buffer(items: list, size: int, seed: int) -> list:
    """A seeded streaming shuffle buffer of ``size`` over ``items`` (size <= 1: unchanged order)."""
    if size <= 1:
        return list(items)
    rng = random.Random(seed)
    buf: list = []
    out: list = []
    for it in items:
        if len(buf) < size:
            buf.append(it)
            continue
        i = rng.randrange(len(buf))
        out.append(buf[i])
        buf[i] = it
    rng.shuffle(buf)
    return out + buf


@dataclass(frozen=True)
class Layout:
    """How the job is laid out: ranks, DataLoader workers per rank, ranks per node. The plan depends on the number
    of readers (``world * workers``) only; nodes decide which readers share a node-local shard cache."""

    world: int
    workers: int  # readers per rank: DataLoader workers, or 1 without workers
    ranks_per_node: int

    def __post_init__(self) -> None:
        if self.world < 1 or self.workers < 1 or self.ranks_per_node < 1:
            raise ValueError(f"bad layout {self}")
        if self.world % self.ranks_per_node:
            raise ValueError(f"{self.world} ranks do not split into nodes of {self.ranks_per_node} ranks "
                             "(data.ranks_per_node, LOCAL_WORLD_SIZE or SLURM_NTASKS_PER_NODE)")

    @property
    def readers(self) -> int:
        """Readers in the job."""
        return self.world * self.workers

    @property
    def nodes(self) -> int:
        """Nodes in the job."""
        return self.world // self.ranks_per_node

    def node(self, rank: int) -> int:
        """The node of a rank (torchrun and Slurm number a node's ranks consecutively)."""
        return rank // self.ranks_per_node

    def readers_of(self, rank: int) -> list[int]:
        """The readers of one rank, by worker."""
        return [rank * self.workers + w for w in range(self.workers)]


def ranks_per_node(configured: int | None, world: int) -> int:
    """Ranks per node: the config, else LOCAL_WORLD_SIZE (torchrun, --nproc, Ray Train), else Slurm's
    SLURM_NTASKS_PER_NODE, else every rank on one node."""
    if configured is not None:
        return configured
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(var, "").split("(")[0]  # Slurm may write "4(x2)"
        if value.isdigit() and int(value) > 0 and world % int(value) == 0:
            return int(value)
    return world


class Streams:
    """Per-shard label streams under (seed, order epoch), cached, and what they give per piece."""

    def __init__(self, counts: np.ndarray, seed: int, max_cached: int = 64) -> None:
        self.counts, self.seed, self.max_cached = counts, seed, max_cached
        self.sizes = counts.sum(1)
        self.computed = 0  # label streams built (a plan builds one per cut shard, not one per shard)
        self._cache: OrderedDict = OrderedDict()

    @property
    def buckets(self) -> int:
        """Number of buckets."""
        return int(self.counts.shape[1])

    def labels(self, oe: int, s: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard ``s``'s bucket labels in stream order under ``oe``, and each one's occurrence index j."""
        key = (oe, s)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        self.computed += 1
        labels = np.repeat(np.arange(self.buckets), self.counts[s])
        labels = np.random.default_rng(seed_int("labels", self.seed, oe, s)).permutation(labels)
        order = np.argsort(labels, kind="stable")
        first = np.searchsorted(labels[order], labels[order], side="left")
        j = np.empty_like(labels)
        j[order] = np.arange(labels.shape[0]) - first
        self._cache[key] = (labels, j)
        if len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return labels, j

    def size(self, p: list) -> int:
        """Samples in a piece."""
        return p[4] - p[3] if p[0] == SPAN else p[5] - p[4]

    def piece_counts(self, p: list) -> np.ndarray:
        """(K,) samples per bucket in a piece."""
        if p[0] == RUN:
            out = np.zeros(self.buckets, np.int64)
            out[p[3]] = p[5] - p[4]
            return out
        _, oe, s, q0, q1 = p
        if q0 == 0 and q1 == self.sizes[s]:
            return self.counts[s].astype(np.int64)
        return np.bincount(self.labels(oe, s)[0][q0:q1], minlength=self.buckets).astype(np.int64)

    def slots(self, p: list) -> np.ndarray:
        """(n, 4) slots (oe, shard, bucket, j) of a piece, in its stream order."""
        if p[0] == RUN:
            _, oe, s, k, j0, j1 = p
            n = j1 - j0
            return np.stack([np.full(n, oe), np.full(n, s), np.full(n, k), np.arange(j0, j1)], 1).astype(np.int64)
        _, oe, s, q0, q1 = p
        labels, j = self.labels(oe, s)
        n = q1 - q0
        return np.stack([np.full(n, oe), np.full(n, s), labels[q0:q1], j[q0:q1]], 1).astype(np.int64)

    def bucket_range(self, p: list, k: int) -> tuple[int, int]:
        """The j-range of bucket ``k`` in a piece (its samples of that bucket are j0..j1, in order)."""
        if p[0] == RUN:
            return (p[4], p[5]) if p[3] == k else (0, 0)
        _, oe, s, q0, q1 = p
        if q0 == 0 and q1 == self.sizes[s]:
            return 0, int(self.counts[s, k])
        labels = self.labels(oe, s)[0]
        j0 = int(np.count_nonzero(labels[:q0] == k))
        return j0, j0 + int(np.count_nonzero(labels[q0:q1] == k))


def cut(p: list, a: int) -> tuple[list, list]:
    """A piece split after its first ``a`` samples."""
    if p[0] == SPAN:
        return [SPAN, p[1], p[2], p[3], p[3] + a], [SPAN, p[1], p[2], p[3] + a, p[4]]
    return [RUN, *p[1:4], p[4], p[4] + a], [RUN, *p[1:4], p[4] + a, p[5]]


def balance(total: int, pinned: np.ndarray) -> np.ndarray:
    """Samples each reader takes from ``total`` so that pinned + taken is as even as it can be (water-filling)."""
    lo, hi = 0, int(pinned.max(initial=0)) + total + 1
    while lo < hi:  # the lowest level h with sum(max(0, h - pinned)) >= total
        h = (lo + hi) // 2
        if np.maximum(0, h - pinned).sum() >= total:
            hi = h
        else:
            lo = h + 1
    take = np.maximum(0, lo - pinned)
    extra = int(take.sum()) - total  # readers at the level give one back, the last ones first
    for x in np.nonzero(take > 0)[0][::-1][:extra]:
        take[x] -= 1
    return take


def split(streams: Streams, pieces: list[list], take: np.ndarray) -> list[list[list]]:
    """An ordered piece list cut into consecutive parts of ``take[x]`` samples, one per reader."""
    parts: list[list[list]] = [[] for _ in range(len(take))]
    queue = list(reversed(pieces))
    for x, want in enumerate(take.tolist()):
        while want > 0:
            p = queue.pop()
            n = streams.size(p)
            if n > want:
                p, rest = cut(p, want)
                queue.append(rest)
                n = want
            if n:
                parts[x].append(p)
            want -= n
    return parts


def quotas(counts: np.ndarray, batch_size: int) -> tuple[np.ndarray, int]:
    """(R, K) batches each reader emits per bucket, and their per-reader total: every reader emits the readers'
    minimum, taking its surplus off its largest buckets (which keeps its bucket mix)."""
    full = counts // batch_size
    n = int(full.sum(1).min()) if full.shape[0] else 0
    q = full.copy()
    for x in np.nonzero(full.sum(1) > n)[0]:
        f, excess = full[x], int(full[x].sum()) - n
        lo, hi = 0, int(f.max())
        while lo < hi:  # the lowest cap c with sum(max(0, f - c)) <= excess
            c = (lo + hi) // 2
            if np.maximum(0, f - c).sum() <= excess:
                hi = c
            else:
                lo = c + 1
        q[x] = np.minimum(f, lo)
        left = excess - int((f - q[x]).sum())
        for k in np.nonzero(q[x] == lo)[0][::-1][:left] if lo > 0 else []:
            q[x, k] -= 1
    return q, n


@dataclass
class Segment:
    """One epoch's plan (gen 0), or the rest of an epoch re-dealt after an elastic resume (gen > 0)."""

    epoch: int
    gen: int
    counts: np.ndarray  # (R, K) samples per reader per bucket
    pieces: dict[int, list[list]]  # reader -> pieces, for the readers this process needs
    batch_size: int
    window: int  # shuffle window in samples (see stream.py)
    seed: int

    @cached_property
    def _quotas(self) -> tuple[np.ndarray, int]:
        return quotas(self.counts, self.batch_size)

    @property
    def quota(self) -> np.ndarray:
        """(R, K) batches per reader per bucket."""
        return self._quotas[0]

    @property
    def batches(self) -> int:
        """Batches every reader emits in this segment."""
        return self._quotas[1]

    def seed_parts(self, reader: int) -> tuple:
        """What seeds a reader's window interleavings."""
        return ("window", self.seed, self.epoch, self.gen, reader)

    def leftover(self) -> tuple[np.ndarray, np.ndarray]:
        """Per reader: samples left in partial buckets, and samples of surplus batches (lockstep)."""
        partial = (self.counts % self.batch_size).sum(1)
        surplus = ((self.counts // self.batch_size - self.quota) * self.batch_size).sum(1)
        return partial, surplus
