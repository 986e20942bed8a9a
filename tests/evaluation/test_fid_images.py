"""FID/KID on real images with the real network, over folder, PIL-list and Tessera-shard sources."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest

from tessera.evaluation.fid import compute_fid_stats, frechet_distance
from tessera.evaluation.images import FolderSource, as_source, shard_source
from tessera.evaluation.kid import kid
from tessera.evaluation.stats_cache import StatsCache


def write_dataset(root, images) -> None:
    """A minimal tessera-shards/1 dataset: one tar with image, caption, json and a non-image member."""
    (root / "shards").mkdir(parents=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, img in enumerate(images):
            data = io.BytesIO()
            img.save(data, format="PNG")
            key = f"{i:05d}"
            members = [(f"{key}.png", data.getvalue()), (f"{key}.txt", b"a caption"),
                       (f"{key}.json", json.dumps({"key": key}).encode()),
                       (f"{key}.emb.x.y.safetensors", b"not an image, never decoded")]
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    raw = buf.getvalue()
    (root / "shards" / "00000.tar").write_bytes(raw)
    manifest = {"format": "tessera-shards/1", "shards": [
        {"name": "shards/00000.tar", "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw),
         "samples": len(images)}]}
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
@pytest.mark.long
def test_fid_orders_emoji_vs_clipart(tmp_path, inception, emoji_images, clipart_images):
    emoji_a, emoji_b = emoji_images[0::2], emoji_images[1::2]  # interleaved halves: same distribution
    folder = tmp_path / "emoji_a"
    folder.mkdir()
    for i, img in enumerate(emoji_a):
        img.save(folder / f"{i:03d}.png")
    write_dataset(tmp_path / "clipart_ds", clipart_images)
    cache = StatsCache(tmp_path / "cache")

    mu_a, s_a, meta_a = compute_fid_stats(folder, inception, batch_size=20, cache=cache, keep_features=True)
    mu_b, s_b, meta_b = compute_fid_stats(emoji_b, inception, batch_size=20, keep_features=True)
    mu_c, s_c, meta_c = compute_fid_stats(str(tmp_path / "clipart_ds"), inception, batch_size=20,
                                          keep_features=True)
    assert meta_a["n"] == len(emoji_a) and meta_b["n"] == len(emoji_b) and meta_c["n"] == len(clipart_images)
    assert meta_c["source"]["kind"] == "tessera-shards" and meta_c["failures"] == {}
    assert meta_a["cache"] == "miss" and meta_b["cache"] == "off"
    assert mu_a.dtype == s_a.dtype == np.float64 and s_a.shape == (2048, 2048)

    fid_same = frechet_distance(mu_a, s_a, mu_b, s_b)
    fid_diff = frechet_distance(mu_a, s_a, mu_c, s_c)
    print(f"FID emoji/emoji {fid_same:.1f}  emoji/openclipart {fid_diff:.1f}")
    assert 0 < fid_same and fid_diff > 2 * fid_same

    kid_same, _ = kid(meta_a["features"], meta_b["features"], n_subsets=20, subset_size=30)
    kid_diff, _ = kid(meta_a["features"], meta_c["features"], n_subsets=20, subset_size=30)
    assert kid_diff > 3 * max(kid_same, 1e-3)

    # A second run reads the cached statistics (and features) instead of running the network.
    mu_a2, s_a2, meta_a2 = compute_fid_stats(folder, inception, cache=cache, keep_features=True)
    assert meta_a2["cache"] == "hit" and cache.hits == 1
    np.testing.assert_array_equal(mu_a2, mu_a)
    np.testing.assert_array_equal(s_a2, s_a)
    np.testing.assert_array_equal(meta_a2["features"], meta_a["features"])


def test_shard_source_reads_only_images(tmp_path, emoji_images):
    write_dataset(tmp_path / "ds", emoji_images[:3])
    src = as_source(str(tmp_path / "ds"))
    imgs = list(src)
    assert len(imgs) == 3 and src.failures == {}
    assert np.array_equal(np.asarray(imgs[1].convert("RGB")), np.asarray(emoji_images[1]))
    ident = src.identity()
    assert ident["kind"] == "tessera-shards" and len(ident["manifest_sha256"]) == 64
    assert shard_source(str(tmp_path / "ds")).identity() == ident


def test_folder_source_counts_corrupt_files(tmp_path, emoji_images):
    emoji_images[0].save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("ignored")
    src = FolderSource(tmp_path)
    assert len(src) == 2
    assert len(list(src)) == 1
    assert sum(src.failures.values()) == 1 and next(iter(src.failures)).startswith("decode_error")
