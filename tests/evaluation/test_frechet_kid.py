"""Fréchet distance parity with pytorch-fid, streamed statistics, and KID against references."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance

from tessera.evaluation.fid import _MomentAccumulator, frechet_distance, stats_from_features
from tessera.evaluation.kid import kid, mmd2_unbiased


def realistic_stats(rng, n: int, d: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Stats of non-negative features with a power-law spectrum in a random rotation (Inception-like)."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    z = rng.standard_normal((n, d)) * np.arange(1, d + 1) ** -0.6
    x = np.maximum(z @ q.T + 0.3 + shift, 0.0)
    return stats_from_features(x)


@pytest.mark.parametrize("d,n", [(256, 2000), pytest.param(2048, 2500, marks=[pytest.mark.slow, pytest.mark.long])])
def test_frechet_matches_pytorch_fid(d, n):
    rng = np.random.default_rng(d)
    mu1, s1 = realistic_stats(rng, n, d, 0.0)
    mu2, s2 = realistic_stats(rng, n, d, 0.05)
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = calculate_frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-6)
    assert ours > 0


def test_frechet_singular_covariance_matches_reference():
    # Fewer samples than dimensions: S1 is singular, the Cholesky path falls back to eigh.
    rng = np.random.default_rng(1)
    mu1, s1 = stats_from_features(rng.random((40, 64)))
    mu2, s2 = stats_from_features(rng.random((400, 64)) + 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = calculate_frechet_distance(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)


def test_frechet_basic_properties():
    rng = np.random.default_rng(2)
    mu, s = stats_from_features(rng.random((500, 32)))
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9
    # Equal covariances: the distance is the squared mean difference.
    assert frechet_distance(mu, s, mu + 0.5, s) == pytest.approx(32 * 0.25, rel=1e-9)
    # Known closed form for diagonal covariances: sum (sqrt(a) - sqrt(b))^2.
    a, b = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    assert frechet_distance(np.zeros(3), a, np.zeros(3), b) == pytest.approx(1 + 0 + 4)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu, s, mu[:3], s[:3, :3])


def test_streamed_moments_equal_np_cov():
    rng = np.random.default_rng(3)
    x = rng.random((257, 48)).astype(np.float32) * 5 + 100  # large offset: tests the shifted sums
    acc = _MomentAccumulator()
    for i in range(0, len(x), 64):
        acc.add(x[i:i + 64])
    mu, sigma = acc.result()
    ref_mu, ref_sigma = stats_from_features(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-9, atol=1e-12)


def reference_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Straightforward unbiased MMD^2 with k = (x.y/d + 1)^3, by explicit double loops over pairs."""
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_mmd_matches_loop_reference():
    rng = np.random.default_rng(4)
    x, y = rng.random((20, 8)), rng.random((20, 8)) + 0.2
    ours = mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y))
    assert ours == pytest.approx(reference_mmd2(x, y), rel=1e-10)
    # Full-set "subset" = one deterministic MMD
    mean, std = kid(x, y, n_subsets=3, subset_size=20)
    assert mean == pytest.approx(ours, rel=1e-10) and std == pytest.approx(0.0, abs=1e-12)


def test_kid_matches_torchmetrics_with_same_seed():
    from torch import nn
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(5)
    real, fake = rng.random((120, 16)), rng.random((100, 16)) * 1.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = KernelInceptionDistance(feature=nn.Identity(), subsets=7, subset_size=50)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    torch.manual_seed(11)
    tm_mean, tm_std = metric.compute()
    mean, std = kid(real, fake, n_subsets=7, subset_size=50, seed=11)
    assert mean == pytest.approx(tm_mean.item(), rel=1e-9)
    assert std == pytest.approx(tm_std.item(), rel=1e-9)
    assert kid(real, fake, n_subsets=7, subset_size=50, seed=11) == (mean, std)  # seeded


def test_kid_orders_and_validates():
    rng = np.random.default_rng(6)
    a, b, c = rng.random((200, 16)), rng.random((200, 16)), rng.random((200, 16)) + 0.3
    same, _ = kid(a, b, n_subsets=20, subset_size=100)
    diff, _ = kid(a, c, n_subsets=20, subset_size=100)
    assert diff > 10 * abs(same)
    with pytest.raises(ValueError, match="subset_size 300 exceeds"):
        kid(a, b, subset_size=300)
