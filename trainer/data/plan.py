"""The global batch plan: a pure function of (seed, epoch, manifest, carried-in slots).

Nothing here reads a shard. The manifest gives each shard's sample count per bucket, which is all the
plan needs, because a sample is named by its *slot* ``(order_epoch, shard, bucket, j)``: "the j-th
sample of ``bucket`` in ``shard``, in the within-shard order seeded by ``order_epoch``". The worker that
reads the shard resolves a slot to a real sample (see ``shards.py``).

Per epoch ``e``:
1. shard permutation from (seed, e);
2. per shard, a seeded interleaving of its bucket labels (how the shard's samples arrive in the stream);
3. the stream is carried-in slots first, then the shards in permuted order;
4. bucketed batching: each slot joins its bucket's buffer and a batch is emitted when the buffer holds
   ``batch_size`` slots, so batches come out in the order they fill (rare buckets are emitted as soon as
   they fill, never starved); what is left in the buffers at the end is carried or dropped.

The epochs' batches, concatenated, form one infinite *global stream*; ``g`` indexes it. See
``loader.py`` for how ranks and workers take batches from it and how resume works.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

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


@dataclass
class EpochPlan:
    """One epoch's batches, as rows of stream positions into the slot arrays."""

    epoch: int
    start: int  # global index g of this epoch's first batch
    order_epoch: np.ndarray  # (T,) int64 slot arrays over the stream
    shard: np.ndarray  # (T,)
    bucket: np.ndarray  # (T,)
    j: np.ndarray  # (T,)
    batches: np.ndarray  # (n, B) stream positions, in emission order
    batch_bucket: np.ndarray  # (n,)
    leftover: np.ndarray  # (M,) stream positions left in partial buckets at the end
    carry_in: np.ndarray  # (M0, 4) slots this epoch started with

    @property
    def num_batches(self) -> int:
        """Number of full batches in this epoch."""
        return int(self.batches.shape[0])

    def slots(self, b: int) -> np.ndarray:
        """Batch ``b``'s slots as (B, 4) rows of (order_epoch, shard, bucket, j)."""
        pos = self.batches[b]
        return np.stack([self.order_epoch[pos], self.shard[pos], self.bucket[pos], self.j[pos]], axis=1)

    def leftover_slots(self) -> np.ndarray:
        """The partial buckets' slots, (M, 4)."""
        pos = self.leftover
        return np.stack([self.order_epoch[pos], self.shard[pos], self.bucket[pos], self.j[pos]], axis=1)


def _shard_stream(counts: np.ndarray, seed: int, epoch: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket labels of shard ``s`` in stream order, and each one's occurrence index j."""
    labels = np.repeat(np.arange(counts.shape[0]), counts)
    rng = np.random.default_rng(seed_int("labels", seed, epoch, s))
    labels = rng.permutation(labels)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")
    j = np.empty_like(labels)
    j[order] = np.arange(labels.shape[0]) - first
    return labels, j


def build_epoch(counts: np.ndarray, *, seed: int, epoch: int, start: int, batch_size: int,
                carry_in: np.ndarray) -> EpochPlan:
    """The plan of one epoch from per-shard bucket counts (S, K) and carried-in slots (M, 4)."""
    num_shards = counts.shape[0]
    perm = np.random.default_rng(seed_int("shards", seed, epoch)).permutation(num_shards)
    parts = [carry_in.astype(np.int64).reshape(-1, 4)]
    for s in perm:
        labels, j = _shard_stream(counts[s], seed, epoch, int(s))
        n = labels.shape[0]
        parts.append(np.stack([np.full(n, epoch), np.full(n, s), labels, j], axis=1).astype(np.int64))
    stream = np.concatenate(parts, axis=0)  # (T, 4)
    rows, emit, bucket_of, left = [], [], [], []
    for k in np.unique(stream[:, 2]) if stream.shape[0] else []:
        idx = np.nonzero(stream[:, 2] == k)[0]
        nfull = idx.shape[0] // batch_size
        if nfull:
            full = idx[: nfull * batch_size].reshape(nfull, batch_size)
            rows.append(full)
            emit.append(full[:, -1])  # a batch is emitted when its last slot arrives
            bucket_of.append(np.full(nfull, k))
        left.append(idx[nfull * batch_size:])
    if rows:
        batches, emit_at, bb = np.concatenate(rows), np.concatenate(emit), np.concatenate(bucket_of)
        order = np.argsort(emit_at, kind="stable")
        batches, bb = batches[order], bb[order]
    else:
        batches, bb = np.zeros((0, batch_size), np.int64), np.zeros(0, np.int64)
    leftover = np.concatenate(left) if left else np.zeros(0, np.int64)
    return EpochPlan(epoch=epoch, start=start, order_epoch=stream[:, 0], shard=stream[:, 1],
                     bucket=stream[:, 2], j=stream[:, 3], batches=batches, batch_bucket=bb,
                     leftover=leftover, carry_in=carry_in.astype(np.int64).reshape(-1, 4))


@dataclass
class Planner:
    """Epoch plans in sequence from a base epoch, cached; carry-out of e is carry-in of e + 1."""

    counts: np.ndarray  # (S, K) samples per shard per bucket
    seed: int
    batch_size: int
    partial_buckets: str
    base_epoch: int = 0
    base_start: int = 0
    base_carry: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    max_cached: int = 3
    _cache: dict[int, EpochPlan] = field(default_factory=dict)

    def epoch(self, e: int) -> EpochPlan:
        """The plan of epoch ``e`` (>= base_epoch)."""
        if e < self.base_epoch:
            raise ValueError(f"epoch {e} is before the plan's base epoch {self.base_epoch}")
        if e in self._cache:
            return self._cache[e]
        done = [k for k in self._cache if k < e]
        prev = self._cache[max(done)] if done else None
        cur = prev.epoch + 1 if prev else self.base_epoch
        start = prev.start + prev.num_batches if prev else self.base_start
        carry = self.carry_out(prev) if prev else self.base_carry
        while True:
            plan = build_epoch(self.counts, seed=self.seed, epoch=cur, start=start,
                               batch_size=self.batch_size, carry_in=carry)
            if plan.num_batches == 0 and (self.partial_buckets == DROP or carry.shape[0] == plan.leftover.shape[0]):
                raise ValueError(f"epoch {cur} has no full batch of {self.batch_size} samples in any bucket")
            self._cache[cur] = plan
            for old in sorted(self._cache)[: -self.max_cached]:
                del self._cache[old]
            if cur == e:
                return plan
            cur, start, carry = cur + 1, start + plan.num_batches, self.carry_out(plan)

    def carry_out(self, plan: EpochPlan) -> np.ndarray:
        """Slots carried from ``plan`` into the next epoch (none when dropping)."""
        if self.partial_buckets == DROP:
            return np.zeros((0, 4), np.int64)
        return plan.leftover_slots()

    def epoch_of(self, g: int) -> EpochPlan:
        """The plan of the epoch that holds global batch ``g``."""
        e = self.base_epoch
        while True:
            plan = self.epoch(e)
            if g < plan.start + plan.num_batches:
                if g < plan.start:
                    raise ValueError(f"global batch {g} is before the plan's base {self.base_start}")
                return plan
            e += 1


def rank_stream(planner: Planner, *, pos: int, skip: set[int], world: int, rank: int, first: int,
                stride: int, end_epoch: int | None) -> Iterator[tuple[int, EpochPlan, int]]:
    """Global batches (g, plan, b) taken by a rank: the m-th unconsumed batch from ``pos`` (not in
    ``skip``) goes to rank m % world; of the rank's list, yield items first, first+stride, ..."""
    q0 = rank + first * world  # index in the unconsumed stream of the first item
    step = stride * world
    q = 0  # unconsumed batches seen before the current epoch
    e = planner.epoch_of(pos).epoch
    while end_epoch is None or e < end_epoch:
        plan = planner.epoch(e)
        g = np.arange(max(pos, plan.start), plan.start + plan.num_batches)
        if skip:
            g = g[~np.isin(g, np.fromiter(skip, np.int64))]
        qs = q + np.arange(g.shape[0])
        take = (qs >= q0) & ((qs - q0) % step == 0)
        for gi in g[take]:
            yield int(gi), plan, int(gi) - plan.start
        q += g.shape[0]
        e += 1


def consumed_by(pos: int, skip: set[int], world: int, rank: int, count: int) -> list[int]:
    """Global indices of the first ``count`` batches of ``rank`` in a segment (pure integer math)."""
    out, q, g = [], 0, pos
    want = {rank + m * world for m in range(count)}
    last = rank + (count - 1) * world if count else -1
    while q <= last:
        if g not in skip:
            if q in want:
                out.append(g)
            q += 1
        g += 1
    return out
