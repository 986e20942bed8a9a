"""Euler samplers: rectified-flow Euler (diffusers' FlowMatchEulerDiscreteScheduler) and the k-diffusion
Euler on a DDPM model's sigmas (diffusers' EulerDiscreteScheduler, no Karras sigmas, no churn)."""

from __future__ import annotations

import numpy as np
import torch

from tessera.trainer.diffusion import schedules
from tessera.trainer.diffusion.objectives import DDPMObjectiveConfig, FlowObjectiveConfig, flow_mu, flow_velocity
from tessera.trainer.diffusion.samplers.base import SAMPLERS, Sampler, level_from_sigma
from tessera.trainer.diffusion.samplers.discrete import Spacing
from tessera.trainer.diffusion.schedules import alphas_cumprod, ddpm_sigmas


@SAMPLERS.register("euler")
class FlowEulerSampler(Sampler):
    """x_{t'} = x_t + (t' - t) v(x_t, t) on the straight path x_t = (1 - t) x0 + t eps."""

    objective = "flow"

    def __init__(self, cfg: FlowObjectiveConfig, *, num_train_timesteps: int = 1000) -> None:
        self.cfg = cfg
        self.num_train = num_train_timesteps
        self.set_timesteps(num_train_timesteps, image_shape=(1, 1, 64, 64))

    def mu(self, image_shape: tuple[int, ...]) -> float:
        """Resolution-dependent shift parameter from the image token count of a (B, C, H, W) shape."""
        return flow_mu(self.cfg, image_shape)

    def set_timesteps(self, n: int, *, image_shape: tuple[int, ...] | None = None, mu: float | None = None) -> None:
        """n noise levels from 1 down to ~1/T, shifted (static, or by ``mu`` / the image shape), then 0."""
        c, big_t = self.cfg, self.num_train
        if c.dynamic_shift:
            if mu is None:
                if image_shape is None:
                    raise ValueError("dynamic_shift needs image_shape or mu")
                mu = self.mu(image_shape)
            s_min = 1.0 / big_t
        else:
            # diffusers' sigma_min is the already-shifted 1/T, which set_timesteps shifts once more; kept for parity.
            s_min = float(schedules.shift_sigmas(torch.tensor(1.0 / big_t, dtype=torch.float64), c.shift))
        s = torch.from_numpy(np.linspace(big_t, s_min * big_t, n) / big_t)
        s = schedules.time_shift(mu, s) if c.dynamic_shift else schedules.shift_sigmas(s, c.shift)
        self.sigmas = torch.cat([s, s.new_zeros(1)])  # (n + 1,) float64
        self.timesteps = s * c.timestep_scale
        self._i = 0

    def step(self, model_output, t, x, generator=None):
        """One explicit Euler step of the flow ODE."""
        s, s_next = float(self.sigmas[self._i]), float(self.sigmas[self._i + 1])
        self._i += 1
        return x + (s_next - s) * flow_velocity(self.cfg, model_output, x, s, exact=True)

    def noise_level(self, t):
        """The flow time itself."""
        return float(t) / self.cfg.timestep_scale


@SAMPLERS.register("euler_discrete")
class EulerDiscreteSampler(Sampler):
    """Euler on the VE-form ODE dx/dsigma = (x - x0_hat) / sigma with x = x_t / sqrt(alpha_bar)."""

    objective = "ddpm"

    def __init__(self, cfg: DDPMObjectiveConfig, *, timestep_spacing: Spacing = "linspace") -> None:
        self.cfg = cfg
        self.spacing = timestep_spacing
        self.num_train = cfg.schedule.num_train_timesteps
        self.table = ddpm_sigmas(alphas_cumprod(cfg.schedule), cfg.schedule.zero_terminal_snr)  # float32 like diffusers
        self.set_timesteps(self.num_train)

    def set_timesteps(self, n: int, *, image_shape: tuple[int, ...] | None = None) -> None:
        """n (fractional) timesteps and their sigmas, linearly interpolated in t, then sigma 0."""
        big_t = self.num_train
        if self.spacing == "linspace":
            ts = np.linspace(0, big_t - 1, n, dtype=np.float32)[::-1].copy()
        elif self.spacing == "leading":
            ts = (np.arange(0, n) * (big_t // n)).round()[::-1].copy().astype(np.float32)
        else:
            ts = np.arange(big_t, 0, -big_t / n).round().astype(np.float32) - 1
        s = np.interp(ts, np.arange(big_t), self.table.numpy())
        self.sigmas = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32)).double()
        self.timesteps = torch.from_numpy(ts)
        s_max = float(self.sigmas.max())
        # x_T ~ N(0, sigma_max^2 + 1) in VE form; diffusers uses sigma_max alone unless spacing is leading.
        self.init_noise_sigma = s_max if self.spacing != "leading" else (s_max**2 + 1) ** 0.5
        self._i = 0

    def model_input(self, x, t):
        """x / sqrt(sigma^2 + 1) (back to VP scale) and the fractional train timestep."""
        s = float(self.sigmas[self._i])
        return x / (s * s + 1) ** 0.5, float(t)

    def step(self, model_output, t, x, generator=None):
        """One Euler step in sigma."""
        s, s_next = float(self.sigmas[self._i]), float(self.sigmas[self._i + 1])
        self._i += 1
        pred = self.cfg.prediction
        if pred == "eps":
            x0 = x - s * model_output
        elif pred == "v":
            x0 = model_output * (-s / (s * s + 1) ** 0.5) + x / (s * s + 1)
        else:
            x0 = model_output
        return x + (x - x0) / s * (s_next - s)

    def noise_level(self, t):
        """From the VE sigma at the fractional timestep ``t``."""
        return level_from_sigma(float(np.interp(float(t), np.arange(self.num_train), self.table.numpy())))
