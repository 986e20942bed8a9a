"""Exponential moving average of the fp32 master weights, kept on each rank's own ZeRO slice.

Each rank averages only the slice of the master weights it owns (``zero_state.Fragment``), on the device
where DeepSpeed keeps it: an update is one fused lerp over local tensors, with no communication and 1/world
of the memory. Each rank checkpoints its own slices; the full EMA is assembled only to sample from it: on every
rank for the sharded grids and in-training evaluation (``gather_all``), on rank 0 for tools (``gather``). Slices
are elementwise, so the result is bitwise the EMA of the full parameters (tests/trainer/test_zero_state.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera.trainer.zero_state import Fragment, gather_to_all, gather_to_rank0


@dataclass(kw_only=True)
class EMAConfig:
    """EMA decay with an optional warmup (diffusers' ``1 - (1 + step/inv_gamma)^-power`` ramp)."""

    enabled: bool = True
    decay: float = 0.9999
    warmup: bool = True
    inv_gamma: float = 1.0
    power: float = 2 / 3
    update_every: int = 1  # optimizer steps between updates

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {self.decay}")
        if self.update_every < 1:
            raise ValueError(f"ema.update_every must be >= 1, got {self.update_every}")


def ema_decay(cfg: EMAConfig, step: int) -> float:
    """Decay used at optimizer step ``step`` (1-based)."""
    if not cfg.warmup:
        return cfg.decay
    ramp = 1.0 - (1.0 + step / cfg.inv_gamma) ** -cfg.power
    return float(min(cfg.decay, max(0.0, ramp)))


class ShardedEMA:
    """The EMA of this rank's slices of the master weights."""

    def __init__(self, cfg: EMAConfig, frags: list[Fragment]) -> None:
        self.cfg, self.frags = cfg, frags
        self.shadow = {f.name: f.view().detach().clone() for f in frags}  # name -> (numel,) fp32, device

    @torch.no_grad()
    def update(self, step: int) -> float:
        """shadow <- d * shadow + (1 - d) * master, on every local slice; returns d."""
        d = ema_decay(self.cfg, step)
        torch._foreach_lerp_(list(self.shadow.values()), [f.view() for f in self.frags], 1.0 - d)
        return d

    def gather(self) -> dict[str, torch.Tensor]:
        """Full EMA tensors on rank 0 ({} elsewhere); collective."""
        return gather_to_rank0(self.frags, lambda f: self.shadow[f.name])

    def gather_all(self) -> dict[str, torch.Tensor]:
        """Full EMA tensors on every rank (CPU), for sharded sampling; collective."""
        return gather_to_all(self.frags, lambda f: self.shadow[f.name])

    @torch.no_grad()
    def load_slices(self, slices: dict[str, torch.Tensor]) -> None:
        """Take this rank's slices (by parameter name, as a checkpoint holds them)."""
        for name, t in self.shadow.items():
            if t.numel():
                t.copy_(slices[name])
