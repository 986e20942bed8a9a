"""The plan: pure, spans per reader (contiguous per node), lockstep, one-bucket batches that cover every sample
once with the leftovers, cuts and tails that agree with the simulation, O(shards) per process."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from tessera.trainer.data.plan import RUN, SPAN, Layout, Streams, balance, quotas, shuffle_buffer
from tessera.trainer.data.segments import Planner
from tessera.trainer.data.stream import emitted, reader_batches, tail

# (shards, buckets): bucket 2 is rare, shard sizes differ
COUNTS = np.array([[10, 3, 1], [7, 5, 0], [12, 0, 2], [9, 4, 1], [11, 2, 0], [6, 6, 1], [8, 1, 1], [10, 4, 0]])


def _planner(world: int = 2, workers: int = 2, b: int = 3, window: int = 1, partial: str = "carry",
             counts: np.ndarray = COUNTS, per_node: int | None = None) -> Planner:
    return Planner(streams=Streams(counts, 7), seed=7, batch_size=b, window=window, partial_buckets=partial,
                   layout=Layout(world, workers, per_node or world))


def _all(p: Planner, epoch: int = 0):
    return p.fresh(epoch, None, {}, list(range(p.layout.readers)))


def _slots(p: Planner, pieces: list) -> list[tuple]:
    return [tuple(s) for q in pieces for s in p.streams.slots(q)]


def _batches(p: Planner, seg, x: int) -> list[tuple[int, np.ndarray]]:
    return [(k, sl) for _, k, sl, _ in reader_batches(p.streams, seg, x)]


def test_plan_is_pure_and_epoch_dependent() -> None:
    a, b, c = _all(_planner()), _all(_planner()), _all(_planner(), 1)
    assert a.pieces == b.pieces and np.array_equal(a.counts, b.counts)
    assert a.pieces != c.pieces
    ba = [[sl.tolist() for _, sl in _batches(_planner(), a, x)] for x in range(4)]
    bb = [[sl.tolist() for _, sl in _batches(_planner(), b, x)] for x in range(4)]
    assert ba == bb


def test_spans_are_balanced_contiguous_and_each_shard_is_read_by_few_readers() -> None:
    p = _planner(world=4, workers=2, per_node=2)  # 8 readers on 2 nodes
    seg = _all(p)
    sizes = seg.counts.sum(1)
    assert sizes.sum() == COUNTS.sum() and sizes.max() - sizes.min() <= 1
    order = [q[2] for x in range(8) for q in seg.pieces[x]]  # shards in reader order: the permuted shard list
    assert [s for i, s in enumerate(order) if i == 0 or order[i - 1] != s] == list(dict.fromkeys(order))
    readers_of = Counter(s for x in range(8) for s in {q[2] for q in seg.pieces[x]})
    assert max(readers_of.values()) <= 3 and sum(readers_of.values()) <= len(COUNTS) + 7  # only boundaries shared
    node_shards = [{q[2] for x in range(4 * n, 4 * n + 4) for q in seg.pieces[x]} for n in (0, 1)]
    assert len(node_shards[0] & node_shards[1]) <= 1  # one shard at most straddles the two nodes


def test_every_reader_emits_the_same_number_of_one_bucket_batches_and_the_rest_is_leftover() -> None:
    p = _planner(world=3, workers=2)
    seg = _all(p)
    epoch_slots = Counter(s for x in range(6) for s in _slots(p, seg.pieces[x]))
    assert sum(epoch_slots.values()) == COUNTS.sum() and max(epoch_slots.values()) == 1
    used = Counter()
    for x in range(6):
        got = _batches(p, seg, x)
        assert len(got) == seg.batches > 0
        for k, sl in got:
            assert sl.shape == (3, 4) and set(sl[:, 2].tolist()) == {k}
            used.update(tuple(s) for s in sl.tolist())
        used.update(_slots(p, tail(p.streams, seg, x, seg.quota[x] * seg.batch_size)))
    assert used == epoch_slots  # batches and leftovers: every sample once
    partial, surplus = seg.leftover()
    assert (partial + surplus).sum() + 6 * seg.batches * 3 == COUNTS.sum()


def test_cut_and_tail_agree_with_the_simulation() -> None:
    """emitted/tail (counts plus one simulated window) give exactly what the first c batches leave, also in an
    epoch that starts with carried runs."""
    for window, epoch in ((1, 0), (20, 0), (20, 1)):
        p = _planner(world=2, workers=1, window=window)
        seg = _all(p)
        if epoch:
            seg = p.advance(seg, [0, 1])
            assert seg.pieces[0][0][0] == RUN
        for x in range(2):
            batches = _batches(p, seg, x)
            mine = _slots(p, seg.pieces[x])
            for c in range(len(batches) + 1):
                done = Counter(k for k, _ in batches[:c])
                assert emitted(p.streams, seg, x, c).tolist() == [done[k] for k in range(3)]
                consumed = {tuple(s) for _, sl in batches[:c] for s in sl.tolist()}
                rest = _slots(p, p.remaining(seg, x, c))
                assert len(rest) == len(set(rest)) and set(rest) == set(mine) - consumed, (window, epoch, x, c)


def test_a_shuffle_window_mixes_shards_within_batches() -> None:
    """Shuffle quality: with a window of several shards a batch draws from several shards, as a webdataset
    shuffle buffer of that size does; with a window of one shard it draws from one (or two at a boundary)."""
    counts = np.full((24, 1), 40)

    def shards_per_batch(window: int) -> float:
        p = _planner(world=1, workers=1, b=8, window=window, counts=counts)
        seg = _all(p)
        return float(np.mean([len(set(sl[:, 1].tolist())) for _, sl in _batches(p, seg, 0)]))

    assert shards_per_batch(1) < 1.3
    assert shards_per_batch(160) > 3.0  # 4 shards of 40 interleaved: ~3.6 distinct shards per batch of 8


def test_rare_bucket_is_emitted_when_full_not_at_the_end() -> None:
    counts = np.array([[40, 2]] * 10)  # bucket 1 is 5% of the data
    p = _planner(world=1, workers=1, b=4, counts=counts)
    ks = [k for k, _ in _batches(p, _all(p), 0)]
    rare = [i for i, k in enumerate(ks) if k == 1]
    assert len(rare) == 5 and rare[0] < len(ks) // 2  # interleaved, not starved to the end


def test_carry_pins_leftovers_to_their_reader_and_drop_counts_them() -> None:
    p = _planner(world=2, workers=2)
    e0 = _all(p)
    e1 = p.advance(e0, list(range(4)))
    assert e1.epoch == 1 and e1.counts.sum() == COUNTS.sum() + (e0.counts - e0.quota * 3).sum()
    for x in range(4):
        left = tail(p.streams, e0, x, e0.quota[x] * 3)
        assert left and e1.pieces[x][: len(left)] == left  # first in the reader's next epoch
    drop = _planner(world=2, workers=2, partial="drop")
    assert drop.advance(_all(drop), [0]).counts.sum() == COUNTS.sum()


def test_quotas_and_balance() -> None:
    counts = np.array([[30, 3, 0], [12, 12, 9], [5, 0, 40]])
    q, n = quotas(counts, 4)
    assert n == 7 and (q.sum(1) == n).all() and (q <= counts // 4).all()
    assert q.tolist() == [[7, 0, 0], [3, 2, 2], [1, 0, 6]]  # the surplus comes off the largest buckets
    take = balance(100, np.array([0, 10, 30, 0]))
    assert take.sum() == 100 and take.tolist() == [35, 25, 5, 35]


def test_shuffle_buffer_is_seeded_permutation() -> None:
    items = list(range(50))
    a, b, c = shuffle_buffer(items, 8, 1), shuffle_buffer(items, 8, 1), shuffle_buffer(items, 8, 2)
    assert sorted(a) == items and a == b and a != c and a != items
    assert shuffle_buffer(items, 1, 1) == items


def test_a_segment_costs_o_shards_not_o_samples() -> None:
    """100,000 shards of 10,000 samples (1e9 samples) over 512 readers: the plan builds label streams only for the
    shards cut between two readers, never one per sample of the epoch."""
    counts = np.full((100_000, 3), [6000, 3000, 1000])
    p = _planner(world=64, workers=8, b=32, window=1000, counts=counts)
    seg = p.fresh(0, None, {}, [5])
    assert seg.counts.sum() == 10**9 and p.streams.computed <= 2 * 512
    assert all(q[0] == SPAN for q in seg.pieces[5]) and seg.batches > 0


@pytest.mark.parametrize("workers", [1, 3])
def test_node_count_does_not_change_the_plan(workers: int) -> None:
    one = _all(_planner(world=4, workers=workers, per_node=4))
    two = _all(_planner(world=4, workers=workers, per_node=2))
    assert one.pieces == two.pieces
