"""Exact resume: same world size batch-by-batch; another world size covers exactly what is left.

Runs use 2 DataLoader workers per rank, 2 epochs, and carried partial buckets.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from itertools import islice

import pytest

from tests.trainer.data.dataset_factory import DatasetInfo
from tessera.trainer.data import LoaderConfig, TrainLoader, build_loader, merge_rank_states

EPOCHS = 2


def _loader(ds: DatasetInfo, rank: int, world: int, state: dict | None = None) -> TrainLoader:
    cfg = LoaderConfig(path=ds.root, batch_size=4, num_workers=2, seed=11, shuffle_buffer=5, epochs=EPOCHS,
                       partial_buckets="carry", caption_variants={"alt": 0.7, "vlm_short": 0.3})
    loader = build_loader(cfg, rank, world)
    if state is not None:
        loader.load_state_dict(json.loads(json.dumps(state)))  # through JSON, as the checkpoint stores it
    return loader


def _take(loader: TrainLoader, n: int | None = None) -> list[tuple]:
    it = iter(loader)
    out = [(b["epoch"], b["index"], tuple(b["key"]), tuple(b["variant"])) for b in islice(it, n)]
    it.close()  # shut the DataLoader workers down now
    return out


def _per_epoch(batches: list[tuple]) -> dict[int, Counter]:
    out: dict[int, Counter] = {}
    for epoch, _, keys, _ in batches:
        out.setdefault(epoch, Counter()).update(keys)
    return out


@pytest.fixture(scope="module")
def full(local_ds: DatasetInfo) -> dict[int, list[tuple]]:
    """Uninterrupted runs: world 1 (rank 0) and world 2 (ranks 0 and 1)."""
    return {"w1": _take(_loader(local_ds, 0, 1)), "w2r0": _take(_loader(local_ds, 0, 2)),
            "w2r1": _take(_loader(local_ds, 1, 2))}


def test_uninterrupted_runs_cover_each_epoch_the_same_way(full: dict, local_ds: DatasetInfo) -> None:
    one = _per_epoch(full["w1"])
    assert sorted(one) == [0, 1]
    assert _per_epoch(full["w2r0"] + full["w2r1"]) == one
    # every sample once per epoch, except partial buckets carried from epoch 0 into epoch 1
    assert max(one[0].values()) == 1 and set(one[0]) <= set(local_ds.keys)
    assert sum(one[0].values()) + sum(one[1].values()) <= 2 * len(local_ds.keys)
    assert [i for _, i, _, _ in full["w1"]] == list(range(len(full["w1"])))


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
    k = 7
    for r in (0, 1):
        first = _loader(local_ds, r, 2)
        head = _take(first, k)
        assert head + _take(_loader(local_ds, r, 2, first.state_dict())) == full[f"w2r{r}"]


@pytest.mark.parametrize("steps", [(5, 5), (9, 8)])
def test_resume_two_ranks_into_one_consumes_exactly_the_rest(full: dict, local_ds: DatasetInfo, steps: tuple) -> None:
    ranks = [_loader(local_ds, r, 2) for r in (0, 1)]
    heads = [_take(ld, k) for ld, k in zip(ranks, steps)]  # (9, 8): rank 0 one batch ahead
    merged = merge_rank_states([ld.state_dict() for ld in ranks])
    rest = _take(_loader(local_ds, 0, 1, merged))
    assert _per_epoch(heads[0] + heads[1] + rest) == _per_epoch(full["w1"])
    done = {b[1] for h in heads for b in h}
    assert [b[1] for b in rest] == [b[1] for b in full["w1"] if b[1] not in done]


def test_resume_one_rank_into_two_consumes_exactly_the_rest(full: dict, local_ds: DatasetInfo) -> None:
    single = _loader(local_ds, 0, 1)
    head = _take(single, 13)
    merged = merge_rank_states([single.state_dict()])
    rest = [_take(_loader(local_ds, r, 2, merged)) for r in (0, 1)]
    assert _per_epoch(head + rest[0] + rest[1]) == _per_epoch(full["w1"])
    assert abs(len(rest[0]) - len(rest[1])) <= 1
    # and the two new ranks resume batch-exactly again from their own states
    again = _loader(local_ds, 1, 2, merged)
    part = _take(again, 3)
    assert part + _take(_loader(local_ds, 1, 2, again.state_dict())) == rest[1]
