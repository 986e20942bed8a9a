"""Loader batches from local shards: contents, variants, precomputed inputs, integrity counters."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.trainer.data.dataset_factory import DatasetInfo, corrupt_shard, write_dataset
from tessera.trainer.data import LoaderConfig, build_loader
from tessera.trainer.data.samples import choose_variant


def _cfg(path: str, **kw) -> LoaderConfig:
    base = dict(path=path, batch_size=4, num_workers=0, seed=3, shuffle_buffer=6, epochs=1, partial_buckets="drop")
    return LoaderConfig(**{**base, **kw})


def test_batches_have_one_bucket_images_in_range_and_lineage(local_ds: DatasetInfo) -> None:
    loader = build_loader(_cfg(local_ds.root, caption_variants={"alt": 0.5, "vlm_short": 0.5}), 0, 1)
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys))  # each sample at most once per epoch
    assert len(keys) == loader.stats()["samples"] > 0.8 * len(local_ds.keys)
    assert len(local_ds.keys) - len(keys) == loader.stats()["partial_bucket_samples_dropped"]
    for b in batches:
        h, w = (int(x) for x in b["bucket"].split("x"))
        assert b["image"].shape == (len(b["key"]), 3, h, w) and b["image"].dtype == torch.float32
        assert -1.0 <= float(b["image"].min()) and float(b["image"].max()) <= 1.0
        assert {local_ds.bucket_of[k] for k in b["key"]} == {b["bucket"]}
        for k, v, c in zip(b["key"], b["variant"], b["caption"]):
            assert v == choose_variant(loader.spec, 0, k) and c == local_ds.captions[k][v]
    assert set(loader.stats()["variants"]) == {"alt", "vlm_short"}
    # a second epoch under another seed comes out in another order
    other = [k for b in build_loader(_cfg(local_ds.root, seed=4), 0, 1) for k in b["key"]]
    assert other != keys


def test_variant_fallback_is_counted(tmp_path: Path) -> None:
    ds = write_dataset(str(tmp_path), shards=2, per_shard=16, missing_variant={"vlm_short": 0.5}, seed=2)
    cfg = _cfg(ds.root, caption_variants={"vlm_short": 1.0}, variant_fallback_order=["alt"], batch_size=2)
    loader = build_loader(cfg, 0, 1)
    batches = list(loader)
    got = {k: v for b in batches for k, v in zip(b["key"], b["variant"])}
    missing = {k for k in got if "vlm_short" not in ds.captions[k]}
    assert missing and all(got[k] == "alt" for k in missing)
    assert all(v == "vlm_short" for k, v in got.items() if k not in missing)
    assert loader.stats()["variant_fallbacks"] == len(missing)


def test_precomputed_latents_and_text_embeddings(tmp_path: Path) -> None:
    ds = write_dataset(str(tmp_path), shards=2, per_shard=12, emb={"tiny-enc": (5, 8)}, latent={"tiny-ae": (4, 2, 2)})
    cfg = _cfg(ds.root, text_encoder_id="tiny-enc", autoencoder_id="tiny-ae", batch_size=3)
    batch = next(iter(build_loader(cfg, 0, 1)))
    n = len(batch["key"])
    assert "image" not in batch and batch["latent"].shape == (n, 4, 2, 2)
    assert batch["text_hidden"].shape == (n, 5, 8) and batch["text_mask"].shape == (n, 5)
    assert batch["text_pooled"].shape == (n, 8) and batch["text_mask"].dtype == torch.int8
    off = next(iter(build_loader(_cfg(ds.root, text_encoder_id="tiny-enc", use_precomputed=False, batch_size=3), 0, 1)))
    assert "image" in off and "text_hidden" not in off


def test_corrupt_shard_is_skipped_counted_and_never_trained_on(tmp_path: Path) -> None:
    ds = write_dataset(str(tmp_path), shards=4, per_shard=16, seed=5)
    corrupt_shard(ds, 2)
    loader = build_loader(_cfg(ds.root, num_workers=2), 0, 1)
    keys = {k for b in loader for k in b["key"]}
    st = loader.stats()
    assert not keys & set(ds.shard_keys[2])
    assert st["corrupt_shards"] == 1 and st["corrupt_shard_names"] == ["0:shards/00002.tar"]
    assert st["skipped_samples"]["corrupt_shard"] > 0
    assert st["samples"] + st["skipped_total"] == st["batches"] * 4
    # verify="never" reads the same shard without checking: only a full hash catches flipped bytes
    never = build_loader(_cfg(ds.root, verify="never"), 0, 1)
    list(never)
    assert never.stats()["corrupt_shards"] == 0


def test_bad_samples_are_skipped_and_counted_by_reason(tmp_path: Path) -> None:
    ds0 = write_dataset(str(tmp_path / "probe"), shards=2, per_shard=12, seed=6)
    bad, nocap = set(ds0.keys[:3]), set(ds0.keys[5:7])
    ds = write_dataset(str(tmp_path / "ds"), shards=2, per_shard=12, seed=6, bad_image=bad, no_caption=nocap)
    loader = build_loader(_cfg(ds.root, batch_size=1), 0, 1)  # batch 1: no partial bucket, every slot used
    keys = {k for b in loader for k in b["key"]}
    assert keys == set(ds.keys) - bad - nocap
    st = loader.stats()
    assert st["skipped_samples"] == {"undecodable_image": 3, "missing_caption": 2}
    assert st["empty_batches"] == 5  # a batch of one bad sample is counted and not yielded
    strict = build_loader(_cfg(ds.root, batch_size=2, drop_invalid=False), 0, 1)
    with pytest.raises(RuntimeError, match="invalid sample"):
        list(strict)


def test_state_is_json_and_checks_the_dataset(local_ds: DatasetInfo, tmp_path: Path) -> None:
    loader = build_loader(_cfg(local_ds.root), 0, 1)
    it = iter(loader)
    next(it), next(it)
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["consumed"] == 2
    other = write_dataset(str(tmp_path), shards=1, per_shard=8)
    with pytest.raises(ValueError, match="fingerprint"):
        build_loader(_cfg(other.root), 0, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="merge_rank_states"):
        build_loader(_cfg(local_ds.root), 0, 2).load_state_dict(state)
    counts = Counter(loader.stats()["variants"])
    assert sum(counts.values()) == 8


def test_too_few_samples_for_every_reader_is_a_clear_error(tmp_path: Path) -> None:
    ds = write_dataset(str(tmp_path), shards=2, per_shard=6, seed=3, buckets={"16x16": 1.0})
    with pytest.raises(ValueError, match="8 readers .* no full batch of 4 samples"):
        build_loader(_cfg(ds.root, num_workers=2), 0, 4)  # 12 samples over 4 ranks x 2 workers
    assert len(list(build_loader(_cfg(ds.root, num_workers=0), 0, 3))) == 1  # 4 samples each: one batch
