"""Resume: same world size batch-by-batch; another world size or node count consumes exactly the rest of the epoch.

Runs use 2 DataLoader workers per rank. Exact resumes run 2 epochs with carried partial buckets; elastic ones run
one epoch with dropped leftovers, so "nothing repeated, nothing skipped" reads: every key seen at most once, and
the keys never seen are exactly as many as the loaders counted as dropped leftovers of the epoch's last segment.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from tests.trainer.data.dataset_factory import DatasetInfo, write_dataset
from tessera.trainer.data import LoaderConfig, TrainLoader, build_loader, merge_rank_states


def _loader(ds: DatasetInfo, rank: int, world: int, state: dict | None = None, **kw) -> TrainLoader:
    base = dict(path=ds.root, batch_size=4, num_workers=2, seed=11, shuffle_buffer=30, epochs=2,
                partial_buckets="carry", caption_variants={"alt": 0.7, "vlm_short": 0.3})
    loader = build_loader(LoaderConfig(**{**base, **kw}), rank, world)
    if state is not None:
        loader.load_state_dict(json.loads(json.dumps(state)))  # through JSON, as the checkpoint stores it
    return loader


def _take(loader: TrainLoader, n: int | None = None) -> list[tuple]:
    it = iter(loader)
    out = [(b["epoch"], b["gen"], b["reader"], b["index"], tuple(b["key"]), tuple(b["variant"]))
           for b in islice(it, n)]
    it.close()  # shut the DataLoader workers down now
    return out


@pytest.fixture(scope="module")
def full(local_ds: DatasetInfo) -> dict[str, list[tuple]]:
    """Uninterrupted runs: world 1 (rank 0) and world 2 (ranks 0 and 1)."""
    return {"w1": _take(_loader(local_ds, 0, 1)), "w2r0": _take(_loader(local_ds, 0, 2)),
            "w2r1": _take(_loader(local_ds, 1, 2))}


def test_uninterrupted_ranks_stay_in_lockstep_and_see_each_sample_once_per_epoch(full: dict,
                                                                                  local_ds: DatasetInfo) -> None:
    for e in (0, 1):
        r0, r1 = ([b for b in full[k] if b[0] == e] for k in ("w2r0", "w2r1"))
        assert len(r0) == len(r1) > 0  # every rank yields the same number of batches per epoch
    epoch0 = [k for k in ("w2r0", "w2r1") for b in full[k] if b[0] == 0 for k in b[4]]
    assert len(epoch0) == len(set(epoch0)) and set(epoch0) <= set(local_ds.keys)


def test_resume_at_five_random_steps_same_world_size_is_batch_exact(full: dict, local_ds: DatasetInfo) -> None:
    n = len(full["w1"])
    cuts = sorted(random.Random(0).sample(range(1, n - 1), 5))
    got, state, prev = [], None, 0
    for cut in cuts + [None]:  # one run interrupted 5 times, each resume from the last state
        loader = _loader(local_ds, 0, 1, state)
        got += _take(loader, None if cut is None else cut - prev)
        state, prev = loader.state_dict(), cut
    assert got == full["w1"]


def test_resume_two_ranks_same_world_size_is_batch_exact(full: dict, local_ds: DatasetInfo) -> None:
    for r in (0, 1):
        first = _loader(local_ds, r, 2)
        head = _take(first, 7)
        assert head + _take(_loader(local_ds, r, 2, first.state_dict())) == full[f"w2r{r}"]


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> DatasetInfo:
    """10 shards x 30 samples, two buckets: enough for 8 readers of a few batches each."""
    return write_dataset(str(tmp_path_factory.mktemp("big")), shards=10, per_shard=30, seed=4,
                         buckets={"16x16": 0.7, "16x32": 0.3})


def _elastic(ds: DatasetInfo, old: tuple[int, int], heads: list[int], new: tuple[int, int]) -> None:
    """``old`` = (ranks, ranks per node) run ``heads[r]`` batches each; ``new`` ranks resume from the merge."""
    kw = dict(batch_size=3, epochs=1, partial_buckets="drop")
    ranks = [_loader(ds, r, old[0], ranks_per_node=old[1], **kw) for r in range(old[0])]
    seen = [k for ld, n in zip(ranks, heads) for b in _take(ld, n) for k in b[4]]
    merged = json.loads(json.dumps(merge_rank_states([ld.state_dict() for ld in ranks])))
    resumed = [_loader(ds, r, new[0], merged, ranks_per_node=new[1], **kw) for r in range(new[0])]
    rests = [_take(ld) for ld in resumed]
    assert len({len(r) for r in rests}) == 1  # the new ranks stay in lockstep too
    assert all(b[1] == 1 for r in rests for b in r)  # the rest of epoch 0, re-dealt
    seen += [k for r in rests for b in r for k in b[4]]
    dropped = sum(ld.stats()["partial_bucket_samples_dropped"] + ld.stats()["lockstep_samples_dropped"]
                  for ld in resumed)
    assert len(seen) == len(set(seen)), "a sample was repeated"
    assert set(seen) <= set(ds.keys) and len(ds.keys) - len(seen) == dropped, "a sample was skipped"
    assert len(seen) > 0.8 * len(ds.keys)


@pytest.mark.parametrize("heads", [[5, 5], [6, 5]])
def test_two_ranks_into_one(big: DatasetInfo, heads: list[int]) -> None:
    _elastic(big, (2, 2), heads, (1, 1))


def test_one_rank_into_three(big: DatasetInfo) -> None:
    _elastic(big, (1, 1), [7], (3, 3))


def test_four_ranks_into_three(big: DatasetInfo) -> None:
    _elastic(big, (4, 4), [3, 3, 3, 3], (3, 3))


def test_one_node_into_two_nodes(big: DatasetInfo) -> None:
    _elastic(big, (2, 2), [4, 4], (4, 2))  # 1 node of 2 ranks -> 2 nodes of 2 ranks


def test_same_world_size_on_two_nodes_resumes_exactly(big: DatasetInfo) -> None:
    """The plan depends on ranks x workers, not on nodes: 2 ranks on one node resume batch-exactly as 2 nodes."""
    one = [_take(_loader(big, r, 2, ranks_per_node=2, epochs=1)) for r in (0, 1)]
    for r in (0, 1):
        head_loader = _loader(big, r, 2, ranks_per_node=2, epochs=1)
        head = _take(head_loader, 4)
        state = head_loader.state_dict()
        on_two = _loader(big, r, 2, ranks_per_node=1, epochs=1)
        assert on_two.resumes_exactly(state)
        on_two.load_state_dict(state)
        assert head + _take(on_two) == one[r]


def test_a_merged_resume_resumes_exactly_again(big: DatasetInfo) -> None:
    kw = dict(batch_size=3, epochs=2)
    ranks = [_loader(big, r, 2, **kw) for r in (0, 1)]
    for ld in ranks:
        _take(ld, 3)
    merged = merge_rank_states([ld.state_dict() for ld in ranks])
    whole = _take(_loader(big, 0, 1, merged, **kw))
    part_loader = _loader(big, 0, 1, merged, **kw)
    part = _take(part_loader, 5)
    assert part + _take(_loader(big, 0, 1, part_loader.state_dict(), **kw)) == whole
    assert {b[0] for b in whole} == {0, 1}  # and it goes on into the next epoch


def test_states_of_another_layout_need_a_merge(big: DatasetInfo, tmp_path: Path) -> None:
    state = _loader(big, 0, 2).state_dict()
    other = _loader(big, 0, 1)
    assert not other.resumes_exactly(state)
    with pytest.raises(ValueError, match="merge_rank_states"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="one state per rank"):
        merge_rank_states([state])
    both = [_loader(big, r, 2).state_dict() for r in (0, 1)]
    other.load_rank_states(both)  # picks the merge itself
    assert other.seg.gen == 1


def test_ranks_an_epoch_apart_merge_too(big: DatasetInfo) -> None:
    """A rank that skipped batches of holes runs ahead: here rank 0 is 2 batches into epoch 1 while rank 1 is 3
    batches into epoch 0. Over both epochs each sample is still used at most twice (once per epoch), and the
    samples used plus the counted dropped leftovers make two full epochs."""
    kw = dict(batch_size=3, epochs=2, partial_buckets="drop")
    ranks = [_loader(big, r, 2, **kw) for r in (0, 1)]
    heads = [_take(ranks[0], 2 * ranks[0].seg.batches + 2), _take(ranks[1], 3)]
    assert {b[0] for b in heads[0]} == {0, 1} and {b[0] for b in heads[1]} == {0}
    merged = merge_rank_states([ld.state_dict() for ld in ranks])
    one = _loader(big, 0, 1, merged, **kw)
    seen = Counter(k for b in heads[0] + heads[1] + _take(one) for k in b[4])
    st = one.stats()  # merged counters (rank 0's epoch-0 leftovers) plus this run's
    dropped = st["partial_bucket_samples_dropped"] + st["lockstep_samples_dropped"]
    assert max(seen.values()) <= 2 and set(seen) <= set(big.keys)
    assert sum(seen.values()) + dropped == 2 * len(big.keys)
