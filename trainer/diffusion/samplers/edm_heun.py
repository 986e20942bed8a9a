"""EDM deterministic Heun sampler (Karras et al. 2022, Algorithm 1 with S_churn = 0) on Karras sigmas.

Heun needs two network evaluations per step, so ``timesteps`` lists every evaluation's sigma:
[s0, s1, s1, s2, ..., s_{n-1}] (2n - 1 entries; the last step to sigma = 0 is plain Euler), and ``step``
alternates between the Euler predictor and the trapezoidal corrector, as diffusers' HeunDiscreteScheduler.
"""

from __future__ import annotations

import torch

from tessera.trainer.diffusion.objectives import EDMObjective, EDMObjectiveConfig
from tessera.trainer.diffusion.samplers.base import SAMPLERS, Sampler, level_from_sigma
from tessera.trainer.diffusion.schedules import karras_sigmas


@SAMPLERS.register("edm_heun")
class EDMHeunSampler(Sampler):
    """Second-order ODE solver for dx/dsigma = (x - D(x; sigma)) / sigma."""

    objective = "edm"

    def __init__(
        self, cfg: EDMObjectiveConfig, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
    ) -> None:
        self.edm = EDMObjective(cfg)
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.init_noise_sigma = sigma_max
        self.set_timesteps(18)

    def set_timesteps(self, n: int, *, image_shape: tuple[int, ...] | None = None) -> None:
        """Karras sigmas (n + 1 with the final 0) and the interleaved per-evaluation table."""
        s = karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho)
        self.sigmas = torch.cat([s, s.new_zeros(1)])  # (n + 1,)
        self.timesteps = torch.cat([s[:1], s[1:].repeat_interleave(2)])  # (2n - 1,)
        self._k = 0  # index of the current sigma interval
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (x at s_k, d at s_k) awaiting correction

    def model_input(self, x, t):
        """c_in(sigma) x and c_noise(sigma) = ln(sigma) / 4."""
        _, _, c_in, c_noise = self.edm.precondition(torch.as_tensor(float(t), dtype=torch.float64))
        return x * float(c_in), float(c_noise)

    def noise_level(self, t):
        """The table value is sigma."""
        return level_from_sigma(float(t))

    def denoised(self, model_output: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """D(x; sigma) = c_skip x + c_out F from the raw network output F."""
        c_skip, c_out, _, _ = self.edm.precondition(torch.tensor(sigma, dtype=torch.float64))
        return float(c_skip) * x + float(c_out) * model_output

    def step(self, model_output, t, x, generator=None):
        """Predictor (Euler) on even calls, corrector (trapezoid) on odd ones."""
        sigma = float(t)
        d = (x - self.denoised(model_output, x, sigma)) / sigma
        s_cur, s_next = float(self.sigmas[self._k]), float(self.sigmas[self._k + 1])
        if self._pending is None:
            x_next = x + (s_next - s_cur) * d
            if s_next == 0.0:
                self._k += 1  # last step: Euler to sigma = 0
            else:
                self._pending = (x, d)
            return x_next
        x_cur, d_cur = self._pending
        self._pending = None
        self._k += 1
        return x_cur + (s_next - s_cur) * 0.5 * (d_cur + d)
