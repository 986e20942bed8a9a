"""Benchmark: our symmetric-eigen Fréchet distance vs pytorch-fid's ``calculate_frechet_distance``.

Statistics come from N random 2048-d "features" with an Inception-like spectrum (power-law
variances in a random rotation, non-negative after a ReLU, like pool features), two sets with a
small shift. Both implementations run in the same process on the same statistics; the script
prints both times, the ratio and the absolute and relative difference.

    OMP_NUM_THREADS=2 .venv/bin/python bench/frechet.py [--dim 2048] [--samples 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_features(rng: np.random.Generator, n: int, d: int, q: np.ndarray, shift: float) -> np.ndarray:
    """(n, d) non-negative features whose covariance spectrum decays like k^-1.2."""
    scales = np.arange(1, d + 1, dtype=np.float64) ** -0.6  # std per principal axis
    z = rng.standard_normal((n, d)) * scales  # (n, d)
    x = z @ q.T + 0.3 + shift  # rotate and offset so the ReLU keeps most mass
    return np.maximum(x, 0.0)


def stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and unbiased covariance."""
    return x.mean(axis=0), np.cov(x, rowvar=False)


def best_time(fn, repeats: int) -> tuple[float, float]:
    """(best wall time over repeats, value)."""
    best, value = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return best, float(value)


def main() -> int:
    """Run the benchmark and print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from pytorch_fid.fid_score import calculate_frechet_distance

    from tessera.evaluation.fid import frechet_distance

    rng = np.random.default_rng(args.seed)
    q, _ = np.linalg.qr(rng.standard_normal((args.dim, args.dim)))  # random rotation
    mu1, s1 = stats(make_features(rng, args.samples, args.dim, q, 0.0))
    mu2, s2 = stats(make_features(rng, args.samples, args.dim, q, 0.02))

    t_ref, v_ref = best_time(lambda: calculate_frechet_distance(mu1, s1, mu2, s2), args.repeats)
    t_ours, v_ours = best_time(lambda: frechet_distance(mu1, s1, mu2, s2), args.repeats)
    diff = abs(v_ours - v_ref)
    print(f"dim={args.dim} samples={args.samples} repeats={args.repeats} (best of)")
    print(f"pytorch-fid calculate_frechet_distance: {t_ref:8.3f} s  value {v_ref:.10f}")
    print(f"tessera frechet_distance (eigvalsh):    {t_ours:8.3f} s  value {v_ours:.10f}")
    print(f"speed-up {t_ref / t_ours:.2f}x   abs diff {diff:.3e}   rel diff {diff / abs(v_ref):.3e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
