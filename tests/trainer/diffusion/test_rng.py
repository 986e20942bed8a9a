"""The trainer's counter-based per-sample streams: exact integer hashing, a sample's draws independent of its batch,
and the statistics diffusion noise needs (uniform and normal marginals, no correlation across values or samples)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy import stats

from tessera.trainer.diffusion import rng
from tessera.trainer.diffusion.rng import KeyedRNG, _mix32, _mul32, key_of


def _mix32_ref(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_the_32_bit_arithmetic_is_exact():
    r = random.Random(0)
    xs = [r.getrandbits(32) for _ in range(2000)] + [0, 1, 0xFFFFFFFF, 0x80000000]
    t = torch.tensor(xs, dtype=torch.int64)
    for c in (0x7FEB352D, 0x846CA68B, 0xFFFFFFFF, 3):
        assert _mul32(t, c).tolist() == [(x * c) & 0xFFFFFFFF for x in xs]
    assert _mix32(t).tolist() == [_mix32_ref(x) for x in xs]


def test_a_samples_draws_do_not_depend_on_its_batch():
    keys = ["a", "b", "c", "d"]
    whole = KeyedRNG.for_samples(0, 7, keys)
    t, noise, drop = rng.rand(4, whole, "cpu"), rng.randn((4, 3, 8, 8), whole, "cpu"), rng.rand(4, whole, "cpu")
    for i, k in enumerate(keys):  # the same sample alone, or second in another batch: the same values, bit for bit
        for batch, row in (([k], 0), (["z", k], 1)):
            g = KeyedRNG.for_samples(0, 7, batch)
            assert torch.equal(rng.rand(len(batch), g, "cpu")[row], t[i])
            assert torch.equal(rng.randn((len(batch), 3, 8, 8), g, "cpu")[row], noise[i])
            assert torch.equal(rng.rand(len(batch), g, "cpu")[row], drop[i])
    other = KeyedRNG.for_samples(0, 8, keys)  # the next step draws anew
    assert not torch.equal(rng.rand(4, other, "cpu"), t)
    assert key_of(0, 7, "a") == key_of(0, 7, "a") != key_of(1, 7, "a")


def test_uniform_and_normal_marginals():
    g = KeyedRNG.for_samples(3, 0, [f"s{i}" for i in range(64)])
    u = g.uniform(4096).flatten().numpy()  # 262,144 values
    assert 0 < u.min() and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    u64 = g.uniform(512, torch.float64).flatten().numpy()
    assert stats.kstest(u64, "uniform").pvalue > 1e-3 and len(np.unique(u64)) == len(u64)
    z = g.normal(4096).flatten().double().numpy()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(stats.kurtosis(z)) < 0.05 and abs(stats.skew(z)) < 0.03
    assert stats.kstest(z, "norm").pvalue > 1e-3


def test_no_correlation_between_neighbouring_values_or_samples():
    g = KeyedRNG.for_samples(0, 0, [f"k{i}" for i in range(256)])
    z = g.normal(1024).double()  # (256, 1024)
    lag1 = torch.corrcoef(torch.stack([z[:, :-1].flatten(), z[:, 1:].flatten()]))[0, 1]
    across = torch.corrcoef(torch.stack([z[:-1].flatten(), z[1:].flatten()]))[0, 1]
    n = z.numel()
    assert abs(float(lag1)) < 4 / n**0.5 and abs(float(across)) < 4 / n**0.5
    # Streams of consecutive steps of one sample are unrelated too.
    a = KeyedRNG.for_samples(0, 1, ["k0"]).normal(100_000).flatten().double()
    b = KeyedRNG.for_samples(0, 2, ["k0"]).normal(100_000).flatten().double()
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 4 / 100_000**0.5


def test_wrong_stream_count_is_an_error():
    with pytest.raises(ValueError, match="3 sample streams for 2 samples"):
        rng.randn((2, 4), KeyedRNG.for_samples(0, 0, ["a", "b", "c"]), "cpu")
