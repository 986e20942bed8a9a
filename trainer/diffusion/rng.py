"""Random draws of a training step: one stream per sample, drawn where the batch lives.

Every draw of a step (timestep, noise, condition dropout) comes from its sample's own stream, keyed by (seed,
optimizer step, sample key): a sample's draws do not depend on which other samples share its micro-batch, its
rank or the gradient accumulation, so 1 rank x micro-batch 16, 1 rank x 4 accumulated micro-batches of 4 and
2 ranks x 2 x 4 train on the same draws, and a resumed run replays the uninterrupted one.

Two kinds of stream share one interface (``rand``, ``randn``):

* ``KeyedRNG`` (the trainer's): counter-based, vectorised and on the batch's device. Element ``i`` of a sample's
  ``c``-th draw is a hash of (sample key, counter), computed with integer tensor ops, so the whole batch's noise
  is a handful of kernels on the GPU: no per-sample generator, no host-to-device copy, no host sync. The bits are
  the same on every device (exact integer arithmetic; the float transforms differ by rounding only).
* a list of ``torch.Generator`` (fine-tuning's rollouts, tests): one generator per sample, drawn on its device.

Why a hash and not torch's Philox: torch exposes Philox only as a per-generator stream (one generator, one
offset), not as "the n-th number of key k" over a batch of keys. The hash is Wellons' ``lowbias32`` finaliser
applied in a counter-mode chain (key halves and counter mixed in turn); its outputs pass the uniformity and
independence checks of tests/trainer/diffusion/test_rng.py, and diffusion noise needs no more than that.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence, Union

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 ``x`` in [0, 2^32), with no int64 overflow (split into 16-bit halves)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * (c & 0xFFFF)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32: a bijective 32-bit finaliser with near-ideal avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def key_of(seed: int, step: int, key: str) -> int:
    """A sample's 63-bit stream key from (seed, optimizer step, sample key): stable across processes."""
    h = hashlib.sha256(f"{seed}:{step}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class KeyedRNG:
    """Counter-based per-sample streams for a batch: ``keys`` (B,) int64 on the batch's device.

    Each draw advances the stream by the number of values it took per sample, identically for every sample, so
    a sample's n-th value is the same whatever batch it is drawn in."""

    def __init__(self, keys: torch.Tensor) -> None:
        self.keys = keys.to(torch.int64)
        self._hi, self._lo = (self.keys >> 32) & _M32, self.keys & _M32  # (B,) each
        self.counter = 0  # values drawn per sample so far

    @classmethod
    def for_samples(cls, seed: int, step: int, keys: Sequence[str], device: torch.device | str = "cpu") -> KeyedRNG:
        """The streams of ``keys`` at optimizer ``step``; the key tensor is copied to ``device`` without a sync."""
        host = torch.tensor([key_of(seed, step, k) for k in keys], dtype=torch.int64)
        if torch.device(device).type == "cuda":
            host = host.pin_memory()
        return cls(host.to(device, non_blocking=True))

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @property
    def device(self) -> torch.device:
        """Where the draws are made."""
        return self.keys.device

    def bits(self, n: int) -> torch.Tensor:
        """(B, n) int64 in [0, 2^32): the next ``n`` 32-bit words of every sample's stream."""
        ctr = torch.arange(self.counter, self.counter + n, device=self.device, dtype=torch.int64)  # (n,)
        self.counter += n
        h = _mix32((ctr[None, :] & _M32) ^ _mix32(self._lo[:, None] ^ 0x9E3779B9))  # (B, n)
        h = _mix32(h ^ self._hi[:, None])
        return _mix32(h ^ ((ctr[None, :] >> 32) + 0x632BE5AB))

    def uniform(self, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, n) uniform in (0, 1): 32 random bits per value (53 for float64, from two words)."""
        if dtype == torch.float64:
            w = self.bits(2 * n).view(-1, n, 2)
            return (((w[..., 0] >> 5) * 67108864 + (w[..., 1] >> 6)).to(torch.float64) + 0.5) / 2.0**53
        return ((self.bits(n) >> 8).to(torch.float32) + 0.5) / 2.0**24

    def normal(self, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, n) standard normal (Box-Muller over pairs of uniforms)."""
        half = (n + 1) // 2
        u = self.uniform(2 * half, torch.float64 if dtype == torch.float64 else torch.float32).view(-1, half, 2)
        r = torch.sqrt(-2.0 * torch.log(u[..., 0]))
        theta = 2.0 * math.pi * u[..., 1]
        z = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=-1).view(-1, 2 * half)  # (B, 2 half)
        return z[:, :n].to(dtype)


Gen = Union[KeyedRNG, torch.Generator, Sequence[torch.Generator], None]


def _device(gen: torch.Generator | None, fallback: torch.device) -> torch.device:
    return gen.device if gen is not None else fallback


def _check(gen, n: int) -> None:
    if len(gen) != n:
        raise ValueError(f"{len(gen)} sample streams for {n} samples")


def rand(n: int, gen: Gen, device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n,) uniform [0, 1) on ``device``."""
    if isinstance(gen, KeyedRNG):
        _check(gen, n)
        return gen.uniform(1, dtype)[:, 0].to(device)
    if isinstance(gen, (list, tuple)):
        _check(gen, n)
        return torch.cat([torch.rand(1, generator=g, device=g.device, dtype=dtype) for g in gen]).to(device)
    return torch.rand(n, generator=gen, device=_device(gen, device), dtype=dtype).to(device)


def randn(shape: tuple, gen: Gen, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal of ``shape`` (first axis = samples) on ``device``."""
    if isinstance(gen, KeyedRNG):
        _check(gen, shape[0])
        per = math.prod(shape[1:])
        return gen.normal(per, dtype).view(shape).to(device)
    if isinstance(gen, (list, tuple)):
        _check(gen, shape[0])
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in gen]).to(device)
    return torch.randn(shape, generator=gen, device=_device(gen, device), dtype=dtype).to(device)
