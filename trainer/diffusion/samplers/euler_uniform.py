"""Flow Euler on the uniform grid 1, (n-1)/n, ..., 1/n (shifted as in training), then 0: FLUX's few-step grid.

The stock ``euler`` grid (diffusers' FlowMatchEulerDiscreteScheduler) is ``linspace(1, 1/T, n)``: at 2 steps it
is 1 -> 0.001 -> 0, one real step. This grid spreads n steps evenly, and the n-step grid is every other point of
the 2n-step one, which progressive distillation needs (a student's step is two of its teacher's). Reflow and
progressive students of flow models sample with it.
"""

from __future__ import annotations

import torch

from tessera.trainer.diffusion.objectives import FlowObjective, FlowObjectiveConfig
from tessera.trainer.diffusion.samplers.base import SAMPLERS
from tessera.trainer.diffusion.samplers.euler import FlowEulerSampler


def uniform_flow_sigmas(cfg: FlowObjectiveConfig, n: int, image_shape: tuple[int, ...] | None) -> torch.Tensor:
    """(n + 1,) float64 noise levels: (n - i) / n for i < n, shifted like the training draws, then 0."""
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    if cfg.dynamic_shift and image_shape is None:
        raise ValueError("a dynamic-shift flow model needs image_shape")
    u = torch.arange(n, 0, -1, dtype=torch.float64) / n
    s = FlowObjective(cfg).shift_t(u, tuple(image_shape or (1, 1, 64, 64)))
    return torch.cat([s, s.new_zeros(1)])


@SAMPLERS.register("euler_uniform")
class FlowEulerUniformSampler(FlowEulerSampler):
    """``euler`` stepping on the uniform grid of ``uniform_flow_sigmas``."""

    def set_timesteps(self, n: int, *, image_shape: tuple[int, ...] | None = None, mu: float | None = None) -> None:
        """n evenly spaced (then shifted) noise levels from 1, then 0."""
        self.sigmas = uniform_flow_sigmas(self.cfg, n, image_shape)
        self.timesteps = self.sigmas[:-1] * self.cfg.timestep_scale
        self._i = 0
