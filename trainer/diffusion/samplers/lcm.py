"""Multistep latent-consistency sampling (Luo et al. 2023), as diffusers' LCMScheduler (DDPM models) and
FlowMatchLCMScheduler (flow models).

A consistency model maps any x_t straight to x0: f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t), with the
boundary scalings of LCM (sigma_data 0.5, timestep x 10, so f(x, 0) = x and f is x0_hat a few timesteps above 0).
n-step sampling takes n times out of the ``origin_steps``-point grid the model was distilled on (evenly spaced by
index, from the noisy end), jumps to f at each, and re-noises to the next time with fresh noise from the image's
generator; the last jump is the image. One step is a single call of f.
"""

from __future__ import annotations

import numpy as np
import torch

from tessera.trainer.diffusion.objectives import DDPMObjectiveConfig, FlowObjective, FlowObjectiveConfig, ObjectiveConfig
from tessera.trainer.diffusion.process import Process
from tessera.trainer.diffusion.samplers.base import SAMPLERS, Sampler, step_noise

SIGMA_DATA, TIMESTEP_SCALING = 0.5, 10.0  # LCM's (diffusers LCMScheduler defaults)


def lcm_boundary(timestep: torch.Tensor, scaling: float = TIMESTEP_SCALING) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at network timesteps (B,) (DDPM: the integer timestep; flow: t * 1000)."""
    st = torch.as_tensor(timestep, dtype=torch.float64) * scaling
    return SIGMA_DATA**2 / (st**2 + SIGMA_DATA**2), st / (st**2 + SIGMA_DATA**2).sqrt()


def lcm_origin_times(cfg: DDPMObjectiveConfig | FlowObjectiveConfig, n_origin: int,
                     image_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The ``n_origin`` skipping-step times the model is distilled on, ascending (float64): DDPM
    ``k * (1..N) - 1`` with k = T // N (diffusers' DDIMSolver and LCMScheduler); flow the shifted levels i / N."""
    if isinstance(cfg, FlowObjectiveConfig):
        u = torch.arange(1, n_origin + 1, dtype=torch.float64) / n_origin
        return FlowObjective(cfg).shift_t(u, tuple(image_shape or (1, 1, 64, 64)))
    big_t = cfg.schedule.num_train_timesteps
    if not 1 <= n_origin <= big_t:
        raise ValueError(f"lcm_origin_steps must be in 1..{big_t}, got {n_origin}")
    return torch.arange(1, n_origin + 1, dtype=torch.float64) * (big_t // n_origin) - 1


def lcm_inference_times(origin: torch.Tensor, n: int) -> torch.Tensor:
    """n of the origin times, from the noisy end, evenly spaced by index (LCMScheduler.set_timesteps)."""
    if not 1 <= n <= len(origin):
        raise ValueError(f"an LCM samples 1..{len(origin)} steps (sampler.lcm_origin_steps), got {n}")
    desc = origin.flip(0)
    idx = np.floor(np.linspace(0, len(desc), num=n, endpoint=False)).astype(np.int64)
    return desc[torch.from_numpy(idx)]


@SAMPLERS.register("lcm")
class LCMSampler(Sampler):
    """x <- alpha_next f(x, t) + sigma_next z at each chosen time; the last f is the sample."""

    def __init__(self, cfg: DDPMObjectiveConfig | FlowObjectiveConfig, *, origin_steps: int = 50) -> None:
        self.cfg = cfg
        flow = isinstance(cfg, FlowObjectiveConfig)
        self.objective = "flow" if flow else "ddpm"
        self.process = Process(ObjectiveConfig(name=self.objective, **{self.objective: cfg}))
        self.origin_steps = origin_steps
        self.set_timesteps(min(4, origin_steps), image_shape=(1, 1, 64, 64))

    def set_timesteps(self, n: int, *, image_shape: tuple[int, ...] | None = None) -> None:
        """n times out of the distillation grid (``timesteps`` holds what the network sees)."""
        if self.objective == "flow" and self.cfg.dynamic_shift and image_shape is None:
            raise ValueError("a dynamic-shift flow model needs image_shape")
        self.times = lcm_inference_times(lcm_origin_times(self.cfg, self.origin_steps, image_shape), n)
        self.timesteps = self.process.model_timestep(self.times).double()
        self._i = 0

    def model_input(self, x, t):
        """The input as is, at the network timestep."""
        return x, float(t)

    def noise_level(self, t):
        """Of the current time (one scale for every objective)."""
        return self.process.level(float(self.times[self._i]))

    def step(self, model_output, t, x, generator=None):
        """f(x, t) = c_skip x + c_out x0_hat, then re-noised to the next time (fresh noise), or returned."""
        cur = self.times[self._i: self._i + 1]  # (1,)
        x0, _ = self.process.x0_eps(model_output.float(), x.float(), cur.expand(x.shape[0]))
        c_skip, c_out = lcm_boundary(self.process.model_timestep(cur).double())
        denoised = float(c_out) * x0 + float(c_skip) * x.float()
        self._i += 1
        if self._i == len(self.times):
            return denoised
        nxt = self.times[self._i: self._i + 1].expand(x.shape[0])
        return self.process.noise(denoised, step_noise(denoised, generator), nxt)
