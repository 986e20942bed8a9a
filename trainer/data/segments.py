"""Segments in sequence: an epoch's plan, the next epoch's (with what each reader carries), and the rest of an
epoch re-dealt over another layout after an elastic resume. See ``plan.py`` for the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tessera.trainer.data.plan import CARRY, SPAN, Layout, Segment, Streams, balance, seed_int, split
from tessera.trainer.data.stream import emitted, tail


@dataclass
class Planner:
    """Builds the segments of one layout from the manifest's counts; pure, shared by a rank and its workers."""

    streams: Streams
    seed: int
    batch_size: int
    window: int  # shuffle window in samples
    partial_buckets: str  # "carry" | "drop"
    layout: Layout

    def _segment(self, epoch: int, gen: int, counts: np.ndarray, pieces: dict) -> Segment:
        return Segment(epoch=epoch, gen=gen, counts=counts, pieces=pieces, batch_size=self.batch_size,
                       window=self.window, seed=self.seed)

    def _deal(self, order: list[list], pinned_counts: np.ndarray) -> tuple[list[list[list]], np.ndarray]:
        """Cut an ordered piece list over every reader so that pinned + dealt is even; (parts, (R, K) counts)."""
        total = sum(self.streams.size(p) for p in order)
        parts = split(self.streams, order, balance(total, pinned_counts.sum(1)))
        counts = pinned_counts.copy()
        for x, part in enumerate(parts):
            for p in part:
                counts[x] += self.streams.piece_counts(p)
        return parts, counts

    def fresh(self, epoch: int, pinned_counts: np.ndarray | None, pinned: dict[int, list], readers: list[int]
              ) -> Segment:
        """Epoch ``epoch``: each reader's carried pieces, then its span of the permuted shards."""
        k = self.streams.buckets
        pinned_counts = np.zeros((self.layout.readers, k), np.int64) if pinned_counts is None else pinned_counts
        perm = np.random.default_rng(seed_int("shards", self.seed, epoch)).permutation(len(self.streams.sizes))
        order = [[SPAN, epoch, int(s), 0, int(self.streams.sizes[s])] for s in perm if self.streams.sizes[s] > 0]
        parts, counts = self._deal(order, pinned_counts)
        return self._segment(epoch, 0, counts, {x: list(pinned.get(x, [])) + parts[x] for x in readers})

    def check(self, seg: Segment) -> Segment:
        """An epoch's plan must give every reader a batch, or training could never make progress."""
        if seg.gen == 0 and seg.batches == 0:
            raise ValueError(f"epoch {seg.epoch}: some of the {self.layout.readers} readers (ranks x workers) get no "
                             f"full batch of {self.batch_size} samples of one bucket; lower data.batch_size or "
                             "data.num_workers, or use more data")
        return seg

    def resumed(self, epoch: int, gen: int, remaining: list[list], readers: list[int]) -> Segment:
        """The rest of epoch ``epoch`` (pieces in the old readers' order), dealt over this layout's readers."""
        parts, counts = self._deal(remaining, np.zeros((self.layout.readers, self.streams.buckets), np.int64))
        return self._segment(epoch, gen, counts, {x: parts[x] for x in readers})

    def advance(self, seg: Segment, readers: list[int]) -> Segment:
        """The next epoch's segment: carried leftovers stay pinned to their readers (or are dropped)."""
        if self.partial_buckets != CARRY:
            return self.fresh(seg.epoch + 1, None, {}, readers)
        left = seg.counts - seg.quota * seg.batch_size
        pinned = {x: tail(self.streams, seg, x, seg.quota[x] * seg.batch_size) for x in readers}
        return self.fresh(seg.epoch + 1, left, pinned, readers)

    def remaining(self, seg: Segment, reader: int, consumed: int) -> list[list]:
        """The reader's pieces not in its first ``consumed`` batches (its would-be leftover included)."""
        return tail(self.streams, seg, reader, emitted(self.streams, seg, reader, consumed) * seg.batch_size)


def worker_batches_consumed(rank_items: int, workers: int, w: int) -> int:
    """Batches of a rank's reader ``w`` among the rank's first ``rank_items`` batches (item i is reader i % W's)."""
    return max(0, (rank_items - w + workers - 1) // workers)
