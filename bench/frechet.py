"""Benchmark: Tessera's Fréchet distance vs pytorch-fid's ``calculate_frechet_distance``.

Statistics come from N random 2048-d "features" with an Inception-like spectrum (power-law
variances in a random rotation, non-negative after a ReLU, like pool features), two sets with a
small shift. Both implementations run in this process on the same statistics, alternating
(pytorch-fid, tessera, ...) through ``bench/harness.py``; the values must agree to 1e-6 relative.

    OMP_NUM_THREADS=2 .venv/bin/python bench/frechet.py [--dim 2048] [--samples 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Comparison, Report  # noqa: E402


def make_features(rng: np.random.Generator, n: int, d: int, q: np.ndarray, shift: float) -> np.ndarray:
    """(n, d) non-negative features whose covariance spectrum decays like k^-1.2."""
    scales = np.arange(1, d + 1, dtype=np.float64) ** -0.6  # std per principal axis
    z = rng.standard_normal((n, d)) * scales  # (n, d)
    x = z @ q.T + 0.3 + shift  # rotate and offset so the ReLU keeps most mass
    return np.maximum(x, 0.0)


def stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and unbiased covariance."""
    return x.mean(axis=0), np.cov(x, rowvar=False)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, value) of one call."""
    t = time.perf_counter()
    value = float(fn())
    return time.perf_counter() - t, value


def main(argv: list[str] | None = None) -> int:
    """Build the statistics, compare the two implementations, write bench/results/frechet.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from pytorch_fid.fid_score import calculate_frechet_distance

    from tessera.evaluation.fid import frechet_distance

    report = Report("frechet", vars(args), ["numpy", "scipy", "torch", "pytorch-fid"])
    rng = np.random.default_rng(args.seed)
    q, _ = np.linalg.qr(rng.standard_normal((args.dim, args.dim)))  # random rotation
    mu1, s1 = stats(make_features(rng, args.samples, args.dim, q, 0.0))
    mu2, s2 = stats(make_features(rng, args.samples, args.dim, q, 0.02))

    values: dict[str, list[float]] = {"pytorch-fid": [], "tessera": []}

    def run(name: str, fn):
        def go() -> tuple[float, dict]:
            secs, value = timed(lambda: fn(mu1, s1, mu2, s2))
            values[name].append(value)
            return secs, {"value": value}
        return go

    cmp = Comparison(name=f"Fréchet distance, {args.dim}-d, stats of {args.samples} samples", metric="s",
                     higher_is_better=False, peer="pytorch-fid")
    report.compare(cmp, run("pytorch-fid", calculate_frechet_distance), run("tessera", frechet_distance),
                   repeats=args.repeats)
    ref, ours = values["pytorch-fid"][0], values["tessera"][0]
    rel = abs(ours - ref) / abs(ref)
    report.note("value", {"pytorch-fid": ref, "tessera": ours, "abs_diff": abs(ours - ref), "rel_diff": rel})
    report.write()
    if rel > 1e-6:
        print(f"ERROR: values differ by {rel:.3e} relative (> 1e-6)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
