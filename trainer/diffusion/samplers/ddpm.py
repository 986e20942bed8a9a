"""DDPM ancestral sampling (Ho et al. 2020) with the "fixed_small" posterior variance, as diffusers' DDPMScheduler."""

from __future__ import annotations

import torch

from tessera.trainer.diffusion.objectives import DDPMObjectiveConfig
from tessera.trainer.diffusion.samplers.base import SAMPLERS, Sampler, level_from_alpha_bar, step_noise
from tessera.trainer.diffusion.samplers.discrete import Spacing, spaced_timesteps, to_x0_eps
from tessera.trainer.diffusion.schedules import alphas_cumprod


@SAMPLERS.register("ddpm")
class DDPMSampler(Sampler):
    """x_{t'} ~ q(x_{t'} | x_t, x0_hat) for the next timestep t' of a (possibly strided) schedule."""

    objective = "ddpm"

    def __init__(
        self, cfg: DDPMObjectiveConfig, *, timestep_spacing: Spacing = "leading", clip_sample: float | None = None
    ) -> None:
        self.cfg = cfg
        self.spacing = timestep_spacing
        self.clip_sample = clip_sample  # clamp x0_hat to [-c, c]; pixel-space models only
        self.alphas_cumprod = alphas_cumprod(cfg.schedule).double()
        self.num_train = cfg.schedule.num_train_timesteps
        self.timesteps = torch.arange(self.num_train - 1, -1, -1)

    def set_timesteps(self, n: int, *, image_shape: tuple[int, ...] | None = None) -> None:
        """Use n of the T training timesteps, spaced by ``timestep_spacing``."""
        self.timesteps = torch.from_numpy(spaced_timesteps(self.num_train, n, self.spacing))

    def noise_level(self, t):
        """From alpha_bar at the integer timestep ``t``."""
        return level_from_alpha_bar(float(self.alphas_cumprod[int(t)]))

    def prev_timestep(self, t: int) -> int:
        """The next timestep in the table after t, or -1 after the last one."""
        idx = (self.timesteps == t).nonzero()
        if len(idx) == 0:
            raise ValueError(f"timestep {t} is not in the schedule")
        i = int(idx[0, 0]) + 1
        return int(self.timesteps[i]) if i < len(self.timesteps) else -1

    def step(self, model_output, t, x, generator=None):
        """Posterior mean from x0_hat plus sqrt(posterior variance) noise (none at t = 0)."""
        t = int(t)
        prev = self.prev_timestep(t)
        ab_t = float(self.alphas_cumprod[t])
        ab_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else 1.0
        beta = 1 - ab_t / ab_prev  # effective beta of the strided step
        x0, _ = to_x0_eps(self.cfg.prediction, model_output, x, ab_t)
        if self.clip_sample is not None:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
        # Posterior q(x_prev | x_t, x0) mean, Ho et al. eq. (7).
        mean = (ab_prev**0.5 * beta / (1 - ab_t)) * x0 + ((1 - beta) ** 0.5 * (1 - ab_prev) / (1 - ab_t)) * x
        if t == 0:
            return mean
        var = max((1 - ab_prev) / (1 - ab_t) * beta, 1e-20)
        return mean + var**0.5 * step_noise(x, generator)
