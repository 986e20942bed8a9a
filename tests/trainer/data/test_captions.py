"""Training never sees an empty caption: an uncaptioned image kept for re-captioning (empty ``alt`` and ``KEY.txt``)
falls back to another variant, counted, or is skipped, counted as ``empty_caption``."""

from __future__ import annotations

from pathlib import Path

from tessera.trainer.data import LoaderConfig, build_loader
from tessera.trainer.data.samples import choose_variant
from tests.trainer.data.dataset_factory import write_dataset


def _cfg(path: str, **kw) -> LoaderConfig:
    base = dict(path=path, batch_size=1, num_workers=0, seed=5, shuffle_buffer=1, epochs=1, partial_buckets="drop")
    return LoaderConfig(**{**base, **kw})


def _dataset(root: Path, **kw):
    probe = write_dataset(str(root / "probe"), shards=2, per_shard=12, seed=8)
    blank = set(probe.keys[2:8])
    return write_dataset(str(root / "ds"), shards=2, per_shard=12, seed=8, blank_alt=blank, **kw), blank


def test_blank_alt_falls_back_to_a_recaptioned_variant(tmp_path: Path) -> None:
    ds, blank = _dataset(tmp_path)  # every sample has vlm_short
    loader = build_loader(_cfg(ds.root, caption_variants={"alt": 0.5, "vlm_short": 0.5}), 0, 1)
    got = {k: (v, c) for b in loader for k, v, c in zip(b["key"], b["variant"], b["caption"])}
    assert set(got) == set(ds.keys) and all(c.strip() for _, c in got.values())
    assert all(got[k][0] == "vlm_short" for k in blank)
    fell_back = [k for k in blank if choose_variant(loader.spec, 0, k) == "alt"]
    assert fell_back and loader.stats()["variant_fallbacks"] == len(fell_back)
    assert loader.stats()["skipped_total"] == 0


def test_blank_alt_without_another_variant_is_skipped_and_counted(tmp_path: Path) -> None:
    ds, blank = _dataset(tmp_path)
    loader = build_loader(_cfg(ds.root, caption_variants={"alt": 1.0}), 0, 1)  # KEY.txt is blank too
    keys = {k for b in loader for k in b["key"]}
    assert keys == set(ds.keys) - blank
    assert loader.stats()["skipped_samples"] == {"empty_caption": len(blank)}


def test_with_precomputed_embeddings_a_blank_caption_is_never_used(tmp_path: Path) -> None:
    ds, blank = _dataset(tmp_path, emb={"tiny-enc": (4, 8)}, variants={"alt": 1.0})
    loader = build_loader(_cfg(ds.root, text_encoder_id="tiny-enc"), 0, 1)
    keys = {k for b in loader for k in b["key"]}
    assert keys == set(ds.keys) - blank
    assert loader.stats()["skipped_samples"] == {"empty_caption": len(blank)}
