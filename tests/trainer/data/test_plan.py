"""The global batch plan: pure, bucket-homogeneous, covering, interleaved; resume arithmetic."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from tessera.trainer.data.loader import merge_rank_states
from tessera.trainer.data.plan import Planner, build_epoch, consumed_by, rank_stream, shuffle_buffer

COUNTS = np.array([[10, 3, 1], [7, 5, 0], [12, 0, 2], [9, 4, 1]])  # (shards, buckets); bucket 2 is rare


def _plan(epoch: int = 0, carry: np.ndarray | None = None, b: int = 4):
    return build_epoch(COUNTS, seed=7, epoch=epoch, start=0, batch_size=b,
                       carry_in=np.zeros((0, 4), np.int64) if carry is None else carry)


def test_plan_is_pure_and_epoch_dependent() -> None:
    a, b, c = _plan(0), _plan(0), _plan(1)
    assert np.array_equal(a.batches, b.batches) and np.array_equal(a.shard, b.shard)
    assert not np.array_equal(a.slots(0), c.slots(0)) or not np.array_equal(a.shard, c.shard)


def test_batches_are_one_bucket_and_cover_every_slot_once() -> None:
    p = _plan()
    slots = [tuple(s) for b in range(p.num_batches) for s in p.slots(b)] + [tuple(s) for s in p.leftover_slots()]
    assert len(slots) == len(set(slots)) == COUNTS.sum()
    for b in range(p.num_batches):
        assert len(set(p.slots(b)[:, 2])) == 1 and p.slots(b)[0, 2] == p.batch_bucket[b]
    per_bucket = Counter(int(x) for x in p.batch_bucket)
    assert per_bucket == {k: int(COUNTS[:, k].sum()) // 4 for k in range(3) if COUNTS[:, k].sum() >= 4}


def test_rare_bucket_is_emitted_when_full_not_at_the_end() -> None:
    counts = np.array([[40, 2]] * 10)  # bucket 1 is 5% of the data
    p = build_epoch(counts, seed=0, epoch=0, start=0, batch_size=4, carry_in=np.zeros((0, 4), np.int64))
    rare = np.nonzero(p.batch_bucket == 1)[0]
    assert len(rare) == 5 and rare[0] < p.num_batches // 2  # interleaved, not starved to the end
    emit = p.batches[:, -1]
    assert np.all(np.diff(emit) > 0)  # emitted in fill order


def test_carry_moves_partial_buckets_to_next_epoch() -> None:
    planner = Planner(counts=COUNTS, seed=7, batch_size=4, partial_buckets="carry")
    e0, e1 = planner.epoch(0), planner.epoch(1)
    assert e1.start == e0.num_batches
    carried = {tuple(s) for s in e0.leftover_slots()}
    used1 = {tuple(s) for b in range(e1.num_batches) for s in e1.slots(b)} | {tuple(s) for s in e1.leftover_slots()}
    assert carried and carried <= used1
    drop = Planner(counts=COUNTS, seed=7, batch_size=4, partial_buckets="drop")
    assert drop.epoch(1).carry_in.shape[0] == 0


def test_shuffle_buffer_is_seeded_permutation() -> None:
    items = list(range(50))
    a, b, c = shuffle_buffer(items, 8, 1), shuffle_buffer(items, 8, 1), shuffle_buffer(items, 8, 2)
    assert sorted(a) == items and a == b and a != c and a != items
    assert shuffle_buffer(items, 1, 1) == items


def test_rank_streams_partition_the_global_stream() -> None:
    planner = Planner(counts=COUNTS, seed=7, batch_size=2, partial_buckets="carry")
    end = 3
    total = sum(planner.epoch(e).num_batches for e in range(end))
    got = []
    for r in range(3):
        got += [g for g, _, _ in rank_stream(planner, pos=0, skip=set(), world=3, rank=r, first=0, stride=1, end_epoch=end)]
    assert sorted(got) == list(range(total))
    # worker d of W takes every W-th item of the rank's list
    rank1 = [g for g, _, _ in rank_stream(planner, pos=0, skip=set(), world=3, rank=1, first=0, stride=1, end_epoch=end)]
    w1 = [g for g, _, _ in rank_stream(planner, pos=0, skip=set(), world=3, rank=1, first=1, stride=2, end_epoch=end)]
    assert w1 == rank1[1::2]


@pytest.mark.parametrize("counts", [[5, 5], [6, 5], [0, 3]])
def test_merge_unions_uneven_rank_progress(counts: list[int]) -> None:
    base = {"format": "tessera-loader/1", "fingerprint": "f", "seed": 0, "batch_size": 2, "partial_buckets": "carry",
            "base": {"epoch": 0, "start": 0, "carry": []}, "pos": 3, "skip": [4, 9], "world_size": 2}
    states = [dict(base, rank=r, consumed=c) for r, c in enumerate(counts)]
    merged = merge_rank_states(states)
    done = {4, 9}  # the segment already skipped these
    for r, c in enumerate(counts):
        done |= set(consumed_by(3, {4, 9}, 2, r, c))
    remaining_from_merge = [g for g in range(merged["pos"], 40) if g not in set(merged["skip"])]
    assert sorted(set(range(3, 40)) - done) == remaining_from_merge
    with pytest.raises(ValueError, match="one state per rank"):
        merge_rank_states(states[:1])
