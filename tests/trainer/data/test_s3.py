"""The loader on the loopback S3 server: same batches as from local disk, integrity, elastic resume."""

from __future__ import annotations

from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from tests.trainer.data.dataset_factory import corrupt_shard, write_dataset
from tessera.trainer.data import LoaderConfig, build_loader, merge_rank_states

pytestmark = pytest.mark.s3


def _cfg(path: str) -> LoaderConfig:
    return LoaderConfig(path=path, batch_size=4, num_workers=2, seed=5, shuffle_buffer=4, epochs=1,
                        partial_buckets="drop", s3_cache_shards=2)


def _keys(loader, n: int | None = None) -> list[tuple]:
    it = iter(loader)
    out = [tuple(b["key"]) for b in islice(it, n)]  # islice pulls exactly n: the state counts what was yielded
    it.close()
    return out


def test_s3_matches_local_and_resumes_across_world_sizes(s3_bucket: str, tmp_path: Path) -> None:
    s3 = write_dataset(f"{s3_bucket}/ds", shards=3, per_shard=16, seed=8)
    local = write_dataset(str(tmp_path), shards=3, per_shard=16, seed=8)
    full = _keys(build_loader(_cfg(s3.root), 0, 1))
    assert full == _keys(build_loader(_cfg(local.root), 0, 1)) and len(full) >= 8
    ranks = [build_loader(_cfg(s3.root), r, 2) for r in (0, 1)]
    head = [k for ld in ranks for k in _keys(ld, 3)]
    rest = _keys(_resumed(ranks))
    assert Counter(k for b in head + rest for k in b) == Counter(k for b in full for k in b)


def _resumed(ranks):
    """A world-size-1 loader resumed from the merged states of two ranks."""
    one = build_loader(ranks[0].cfg, 0, 1)
    one.load_state_dict(merge_rank_states([ld.state_dict() for ld in ranks]))
    return one


def test_s3_corrupt_shard_is_counted_and_skipped(s3_bucket: str) -> None:
    ds = write_dataset(f"{s3_bucket}/bad", shards=3, per_shard=12, seed=9)
    corrupt_shard(ds, 0)
    loader = build_loader(_cfg(ds.root), 0, 1)
    keys = {k for b in _keys(loader) for k in b}
    assert keys and not keys & set(ds.shard_keys[0])
    assert loader.stats()["corrupt_shard_names"] == ["0:shards/00000.tar"]
