"""Statistics cache: hit/miss, key sensitivity to source, preprocessing and network; pickle-free files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tessera.evaluation.fid import PREPROCESS, compute_fid_stats
from tessera.evaluation.inception import FIDInception
from tessera.evaluation.stats_cache import StatsCache, cache_key


def fake_net(sha: str, seed: int = 0) -> FIDInception:
    """A cheap stand-in with the FID network's contract: (N, 3, 299, 299) -> (N, 2048)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 2048), nn.ReLU()).eval()
    return FIDInception(net, kind="test", path=Path("fake.pt"), sha256=sha, device=torch.device("cpu"))


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return d


def test_hit_miss_and_roundtrip(tmp_path, folder):
    cache = StatsCache(tmp_path / "c")
    net = fake_net("a" * 64)
    mu, sigma, meta = compute_fid_stats(folder, net, batch_size=4, cache=cache)
    assert meta["cache"] == "miss" and cache.misses == 1 and meta["n"] == 6
    mu2, sigma2, meta2 = compute_fid_stats(folder, net, batch_size=4, cache=cache)
    assert meta2["cache"] == "hit" and cache.hits == 1
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    assert meta2["key"] == meta["key"] and meta2["network"]["sha256"] == "a" * 64
    # The file is a plain npz: loads without pickle support.
    with np.load(cache.path(meta["key"]), allow_pickle=False) as z:
        assert set(z.files) == {"mu", "sigma", "meta_json"} and z["sigma"].dtype == np.float64


def test_key_changes_with_source_network_and_preprocessing(tmp_path, folder):
    cache = StatsCache(tmp_path / "c")
    _, _, m1 = compute_fid_stats(folder, fake_net("a" * 64), batch_size=8, cache=cache)
    _, _, m2 = compute_fid_stats(folder, fake_net("b" * 64), batch_size=8, cache=cache)  # other network
    assert m2["cache"] == "miss" and m1["key"] != m2["key"]
    # Touching a file (size/mtime) changes the source identity.
    p = folder / "0.png"
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 1_000_000_000))
    _, _, m3 = compute_fid_stats(folder, fake_net("a" * 64), batch_size=8, cache=cache)
    assert m3["cache"] == "miss" and m3["key"] != m1["key"]
    ident = m1["source"]
    assert cache_key(ident, dict(PREPROCESS, version=2), "a" * 64) != cache_key(ident, PREPROCESS, "a" * 64)
    assert cache_key(ident, PREPROCESS, "a" * 64) == m1["key"]


def test_keep_features_recomputes_when_cache_lacks_them(tmp_path, folder):
    cache = StatsCache(tmp_path / "c")
    net = fake_net("c" * 64)
    compute_fid_stats(folder, net, cache=cache)  # stats only
    _, _, meta = compute_fid_stats(folder, net, cache=cache, keep_features=True)
    assert meta["cache"] == "miss" and meta["features"].shape == (6, 2048)
    _, _, meta = compute_fid_stats(folder, net, cache=cache, keep_features=True)
    assert meta["cache"] == "hit" and meta["features"].shape == (6, 2048)


def test_pil_list_source_and_failures_reported(tmp_path, folder):
    imgs = [Image.open(p).copy() for p in sorted(folder.iterdir())]
    _, _, meta = compute_fid_stats(imgs, fake_net("d" * 64), cache=None)
    assert meta["cache"] == "off" and meta["source"]["kind"] == "pil"
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    _, _, meta = compute_fid_stats(folder, fake_net("d" * 64), cache=None)
    assert meta["n"] == 6 and sum(meta["failures"].values()) == 1


def test_default_cache_dir_is_under_home():
    assert StatsCache().root == Path(os.path.expanduser("~/.cache/tessera/fid_stats"))
