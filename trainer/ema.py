"""Exponential moving average of the fp32 master weights, correct under every ZeRO stage.

The EMA reads the real full-precision weights: under ZeRO-3 or bf16 the module's own parameters are
partitions or low-precision copies, so the update gathers the fp32 master weights through DeepSpeed
(``checkpoint.full_fp32_params``, a collective). Every rank keeps the same full EMA, so sampling and
saving need no further communication. ``update_every`` trades EMA resolution for that all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(kw_only=True)
class EMAConfig:
    """EMA decay with an optional warmup (diffusers' ``1 - (1 + step/inv_gamma)^-power`` ramp)."""

    enabled: bool = True
    decay: float = 0.9999
    warmup: bool = True
    inv_gamma: float = 1.0
    power: float = 2 / 3
    update_every: int = 1

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


class EMA:
    """Full fp32 EMA weights by parameter name."""

    def __init__(self, cfg: EMAConfig, weights: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        self.shadow = {k: v.detach().to(torch.float32).clone() for k, v in weights.items()}

    @torch.no_grad()
    def update(self, weights: dict[str, torch.Tensor], step: int) -> float:
        """shadow <- d * shadow + (1 - d) * weights; returns d."""
        d = ema_decay(self.cfg, step)
        for k, v in weights.items():
            self.shadow[k].lerp_(v.to(torch.float32), 1.0 - d)
        return d

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA tensors (for safetensors)."""
        return self.shadow

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Replace the EMA tensors."""
        missing = set(self.shadow) - set(sd)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        self.shadow = {k: sd[k].to(torch.float32).clone() for k in self.shadow}
