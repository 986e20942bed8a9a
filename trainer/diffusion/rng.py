"""Random draws of a training step, from one generator per batch or one per sample.

With one generator per sample (the loop seeds each by (seed, step, sample key)), a sample's timestep, noise
and condition dropout do not depend on which other samples share its micro-batch, its rank or the gradient
accumulation: 1 rank x micro-batch 16, 1 rank x 4 accumulated micro-batches of 4 and 2 ranks x 2 x 4 train on
the same draws. Draws are made on each generator's device, then moved.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

Gen = Union[torch.Generator, Sequence[torch.Generator], None]


def _device(gen: torch.Generator | None, fallback: torch.device) -> torch.device:
    return gen.device if gen is not None else fallback


def rand(n: int, gen: Gen, device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n,) uniform [0, 1) on ``device``."""
    if isinstance(gen, (list, tuple)):
        if len(gen) != n:
            raise ValueError(f"{len(gen)} generators for {n} samples")
        return torch.cat([torch.rand(1, generator=g, device=g.device, dtype=dtype) for g in gen]).to(device)
    return torch.rand(n, generator=gen, device=_device(gen, device), dtype=dtype).to(device)


def randn(shape: tuple, gen: Gen, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal of ``shape`` (first axis = samples) on ``device``."""
    if isinstance(gen, (list, tuple)):
        if len(gen) != shape[0]:
            raise ValueError(f"{len(gen)} generators for {shape[0]} samples")
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in gen]).to(device)
    return torch.randn(shape, generator=gen, device=_device(gen, device), dtype=dtype).to(device)
