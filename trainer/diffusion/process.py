"""The noising process of a DDPM or flow objective in one form, x_t = alpha_t x0 + sigma_t eps, with the network's
raw output turned into (x0_hat, eps_hat) per sample: what the few-step samplers (``samplers/lcm.py``) and the
distillation methods (``tessera.distill``) step with, whatever the objective and its prediction type.

Times are per sample, (B,) float64: a DDPM model's integer train timestep 0..T-1 (``CLEAN`` = -1 is the clean end,
alpha = 1, as DDIM's ``set_alpha_to_one``), a flow model's noise level t in [0, 1] (alpha = 1 - t, sigma = t).
A deterministic DDIM step from t to s, x_s = alpha_s x0_hat + sigma_s eps_hat, is the flow Euler step for flow
models, so one step serves both.
"""

from __future__ import annotations

import torch

from tessera.trainer.diffusion.objectives import ObjectiveConfig
from tessera.trainer.diffusion.schedules import alphas_cumprod

CLEAN = -1  # the DDPM "timestep" of clean data (alpha_bar = 1)


def _b(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) in x's dtype and device."""
    return v.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))


class Process:
    """alpha/sigma, the network timestep, and (x0, eps) from a raw output, for one DDPM or flow objective."""

    def __init__(self, objective: ObjectiveConfig) -> None:
        if objective.name not in ("ddpm", "flow"):
            raise ValueError(f"objective {objective.name!r}: few-step sampling and distillation support the ddpm and "
                             "flow objectives")
        self.objective = objective
        self.kind = objective.name
        self.cfg = getattr(objective, objective.name)
        if self.kind == "ddpm":
            self.alphas_cumprod = alphas_cumprod(self.cfg.schedule).double()  # (T,)
            self.prediction = self.cfg.prediction
        else:
            self.prediction = self.cfg.prediction  # velocity | sample

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t), each (B,) float64, at times ``t`` (B,)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.kind == "flow":
            return 1.0 - t, t
        ab = torch.where(t < 0, torch.ones_like(t), self.alphas_cumprod[t.clamp(min=0).long().cpu()].to(t.device))
        return ab.sqrt(), (1.0 - ab).clamp(min=0.0).sqrt()

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) float32: what the network saw in training at times ``t`` (t * timestep_scale for flow)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return (t * self.cfg.timestep_scale if self.kind == "flow" else t).float()

    def x0_eps(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) implied by the raw output ``out`` at ``x`` (B, C, H, W) and times ``t`` (B,)."""
        a, s = self.alpha_sigma(t)
        a, s, out = _b(a, x), _b(s, x), out.to(x.dtype)
        p = self.prediction
        if p == "eps":
            return (x - s * out) / a, out
        if p == "v":
            return a * x - s * out, a * out + s * x
        if p == "velocity":  # flow: v = eps - x0 and x = (1 - t) x0 + t eps
            return x - s * out, x + a * out
        # x0 / sample: eps from x = a x0 + s eps (s > 0 wherever a model is evaluated)
        return out, (x - a * out) / s

    def output_for(self, x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The raw output that would give ``x0`` at ``x`` and times ``t``: a target in the network's own terms."""
        a, s = self.alpha_sigma(t)
        a, s = _b(a, x), _b(s, x)
        eps = (x - a * x0) / s
        return {"eps": eps, "v": a * eps - s * x0, "velocity": eps - x0}.get(self.prediction, x0)

    def ddim(self, x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x_s = alpha_s x0 + sigma_s eps: the deterministic DDIM step (the Euler step of a flow) to times ``s``."""
        a, sig = self.alpha_sigma(s)
        return _b(a, x0) * x0 + _b(sig, x0) * eps

    def noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps."""
        return self.ddim(x0, eps, t)

    def level(self, t: float) -> float:
        """The noise level in [0, 1] of time ``t`` (samplers' ``noise_level`` scale): sigma / (alpha + sigma)."""
        a, s = (float(v) for v in self.alpha_sigma(torch.tensor([float(t)])))
        return s / (a + s) if a + s > 0 else 1.0
