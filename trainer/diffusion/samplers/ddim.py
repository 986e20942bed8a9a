"""DDIM (Song et al. 2021): deterministic at eta = 0, DDPM-like at eta = 1; as diffusers' DDIMScheduler."""

from __future__ import annotations

import torch

from tessera.trainer.diffusion.objectives import DDPMObjectiveConfig
from tessera.trainer.diffusion.samplers.base import SAMPLERS, Sampler, level_from_alpha_bar, step_noise
from tessera.trainer.diffusion.samplers.discrete import Spacing, spaced_timesteps, to_x0_eps
from tessera.trainer.diffusion.schedules import alphas_cumprod


@SAMPLERS.register("ddim")
class DDIMSampler(Sampler):
    """x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - s^2) eps_hat + s z, s = eta * posterior std."""

    objective = "ddpm"

    def __init__(
        self,
        cfg: DDPMObjectiveConfig,
        *,
        eta: float = 0.0,
        timestep_spacing: Spacing = "trailing",
        set_alpha_to_one: bool = True,
        clip_sample: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.eta = eta
        self.spacing = timestep_spacing
        self.clip_sample = clip_sample
        self.alphas_cumprod = alphas_cumprod(cfg.schedule).double()
        # After the last step we land on alpha_bar = 1 (clean data), or on alpha_bar_0 if not set_alpha_to_one.
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.num_train = cfg.schedule.num_train_timesteps
        self.timesteps = torch.arange(self.num_train - 1, -1, -1)

    def set_timesteps(self, n: int, *, image_shape: tuple[int, ...] | None = None) -> None:
        """Use n of the T training timesteps, spaced by ``timestep_spacing``."""
        self.timesteps = torch.from_numpy(spaced_timesteps(self.num_train, n, self.spacing))

    def noise_level(self, t):
        """From alpha_bar at the integer timestep ``t``."""
        return level_from_alpha_bar(float(self.alphas_cumprod[int(t)]))

    def prev_timestep(self, t: int) -> int:
        """The next timestep in the table after t, or -1 after the last one.

        diffusers uses t - T // n, which is the same whenever n divides T; the table is right otherwise.
        """
        i = int((self.timesteps == t).nonzero()[0, 0]) + 1
        return int(self.timesteps[i]) if i < len(self.timesteps) else -1

    def step(self, model_output, t, x, generator=None):
        """One DDIM update (Song et al. eq. 12)."""
        t = int(t)
        prev = self.prev_timestep(t)
        ab_t = float(self.alphas_cumprod[t])
        ab_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else self.final_alpha_cumprod
        x0, eps = to_x0_eps(self.cfg.prediction, model_output, x, ab_t)
        if self.clip_sample is not None:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
        var = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
        std = self.eta * var**0.5
        x_prev = ab_prev**0.5 * x0 + max(1 - ab_prev - std**2, 0.0) ** 0.5 * eps
        if self.eta > 0:
            x_prev = x_prev + std * step_noise(x, generator)
        return x_prev
