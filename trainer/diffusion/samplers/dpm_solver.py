"""DPM-Solver++(2M) (Lu et al. 2022): multistep, data prediction, midpoint form, lower order at the end.

Matches diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace"). Works on DDPM models
(eps | v | x0) and on rectified-flow models (velocity; diffusers' ``use_flow_sigmas``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tessera.trainer.diffusion.objectives import DDPMObjectiveConfig, FlowObjectiveConfig, flow_mu
from tessera.trainer.diffusion.samplers.base import SAMPLERS, Sampler, level_from_sigma
from tessera.trainer.diffusion.schedules import alphas_cumprod, ddpm_sigmas


@SAMPLERS.register("dpmpp_2m")
class DPMSolverSampler(Sampler):
    """Second-order multistep solver of the diffusion ODE in log-SNR time lambda = log(alpha / sigma)."""

    def __init__(self, cfg: DDPMObjectiveConfig | FlowObjectiveConfig, *, flow_shift: float | None = None) -> None:
        self.cfg = cfg
        self.flow = isinstance(cfg, FlowObjectiveConfig)
        self.objective = "flow" if self.flow else "ddpm"
        if self.flow:
            self.num_train = 1000
            self.flow_shift = cfg.shift if flow_shift is None else flow_shift
        else:
            self.num_train = cfg.schedule.num_train_timesteps
            ac = alphas_cumprod(cfg.schedule)
            self.table = ddpm_sigmas(ac, cfg.schedule.zero_terminal_snr).double()  # (T,) VE sigmas
        self.set_timesteps(self.num_train, image_shape=(1, 1, 64, 64))

    def set_timesteps(self, n: int, *, image_shape: tuple[int, ...] | None = None) -> None:
        """n timesteps; ``sigmas`` has n + 1 entries ending in 0, where the last step returns x0_hat."""
        if self.flow:
            shift = self.flow_shift
            if self.cfg.dynamic_shift:  # diffusers: flow_shift = e^mu, the same curve as time_shift(mu, .)
                if image_shape is None:
                    raise ValueError("a dynamic-shift flow model needs image_shape")
                shift = math.exp(flow_mu(self.cfg, image_shape))
            s = 1.0 - np.linspace(1, 1 / self.num_train, n + 1)
            s = np.flip(shift * s / (1 + (shift - 1) * s))[:-1].copy()
            sigmas = torch.from_numpy(s).float().double()
            self.timesteps = sigmas * self.cfg.timestep_scale  # what the flow model saw in training; kept fractional
        else:
            ts = np.linspace(0, self.num_train - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
            self.timesteps = torch.from_numpy(ts)
            sigmas = self.table[self.timesteps]
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        self._i = 0
        self._prev_x0: torch.Tensor | None = None

    def noise_level(self, t):
        """The flow time for flow models; from the VE sigma of the integer timestep for DDPM ones."""
        if self.flow:
            return float(t) / self.cfg.timestep_scale
        return level_from_sigma(float(self.table[int(t)]))

    def alpha_sigma(self, s: float) -> tuple[float, float]:
        """(alpha_t, sigma_t) of the VP/flow process at table noise level s."""
        if self.flow:
            return 1.0 - s, s
        a = 1.0 / math.sqrt(s * s + 1.0)
        return a, s * a

    def data_prediction(self, out: torch.Tensor, x: torch.Tensor, s: float) -> torch.Tensor:
        """x0_hat from the raw model output."""
        a, sig = self.alpha_sigma(s)
        if self.flow:
            return out if self.cfg.prediction == "sample" else x - s * out
        pred = self.cfg.prediction
        if pred == "eps":
            return (x - sig * out) / a
        if pred == "v":
            return a * x - sig * out
        return out

    def step(self, model_output, t, x, generator=None):
        """First order on the first and last step, second-order multistep (2M) in between."""
        i = self._i
        s0, s_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        x0 = self.data_prediction(model_output, x, s0)
        prev_x0, self._prev_x0 = self._prev_x0, x0
        self._i += 1
        if s_next == 0.0:
            return x0  # the solver's limit at sigma -> 0 (h -> inf): exactly the data prediction
        a_t, sig_t = self.alpha_sigma(s_next)
        a_0, sig_0 = self.alpha_sigma(s0)
        lam_t, lam_0 = math.log(a_t / sig_t), math.log(a_0 / sig_0)
        h = lam_t - lam_0
        phi = math.expm1(-h)  # exp(-h) - 1
        x_next = (sig_t / sig_0) * x - (a_t * phi) * x0
        if prev_x0 is not None:
            a_1, sig_1 = self.alpha_sigma(float(self.sigmas[i - 1]))
            r0 = (lam_0 - math.log(a_1 / sig_1)) / h
            x_next = x_next - (0.5 * a_t * phi / r0) * (x0 - prev_x0)  # midpoint correction, D1 = (m0 - m1)/r0
        return x_next
