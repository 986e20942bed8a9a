"""The one sampler every method shares: each step a Gaussian policy with its log-probability.

* DDPM models: DDIM with eta > 0 (DDPO, Black et al. 2023): mean sqrt(ab') x0 + sqrt(1 - ab' - s^2) eps,
  std s = eta * sqrt((1 - ab') / (1 - ab) * (1 - ab / ab')); the last step lands on alpha_bar_0 (Stable
  Diffusion's ``set_alpha_to_one=False``), so every step is stochastic.
* Flow models: Flow-GRPO's SDE (Liu et al. 2025) with the ODE's marginals, sigma_t = a * sqrt(t / (1 - t)):
  mean x (1 + sigma^2 dt / 2t) + v (1 + sigma^2 (1 - t) / 2t) dt, std sigma_t sqrt(-dt) (t = 1 uses the next
  level in the denominator, as flow_grpo does).

With eta = 0 (a = 0) the step is exactly DDIM (Euler): the deterministic sampler of reward backprop. A ``window``
[lo, hi) keeps the noise (and the log-probabilities) to those steps, the ODE elsewhere (MixGRPO, Flow-GRPO-Fast):
the late steps' per-pixel noise carries little of the reward and most of a policy gradient's variance.
Coefficients are looked up per row from a step index, so one forward can hold rows at different steps
(DDPO's per-sample timestep permutation) and a training forward recomputes a sampling step bit for bit.
The log-probability is the Gaussian density of x_next, in fp32, averaged over dimensions (both papers' code).
"""

from __future__ import annotations

import math

import torch

from tessera.trainer.diffusion import rng
from tessera.trainer.diffusion.guidance import guided_output
from tessera.trainer.diffusion.objectives import flow_velocity
from tessera.trainer.diffusion.samplers.discrete import spaced_timesteps
from tessera.trainer.diffusion.samplers.euler import FlowEulerSampler
from tessera.trainer.diffusion.schedules import alphas_cumprod

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _rows(table: torch.Tensor, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[idx] as (B, 1, 1, 1) in ``like``'s dtype and device."""
    return table[idx.cpu()].to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))


class GaussianPolicy:
    """A ``steps``-step stochastic sampler of a DDPM or flow model whose every step is a Gaussian policy."""

    def __init__(self, objective, steps: int, *, eta: float = 1.0, noise_level: float = 0.7,
                 image_shape: tuple[int, ...] = (1, 3, 32, 32), spacing: str = "trailing",
                 window: list[int] | None = None) -> None:
        self.kind, self.cfg, self.n = objective.name, getattr(objective, objective.name), steps
        if self.kind == "ddpm":
            ac = alphas_cumprod(self.cfg.schedule).double()  # (T,)
            ts = torch.from_numpy(spaced_timesteps(len(ac), steps, spacing))  # (n,) descending
            ab = ac[ts]
            ab_prev = torch.cat([ac[ts[1:]], ac[:1]])  # the last step lands on alpha_bar_0
            var = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
            self.ab, self.ab_prev, self.std = ab, ab_prev, eta * var.sqrt()  # (n,) float64 each
            self.model_t = ts.float()
        elif self.kind == "flow":
            smp = FlowEulerSampler(self.cfg)
            smp.set_timesteps(steps, image_shape=image_shape)
            s = smp.sigmas  # (n + 1,) float64, s[0] = 1, s[n] = 0
            s_max = float(s[1]) if steps > 1 else 0.5
            sig = noise_level * (s[:-1] / (1 - torch.where(s[:-1] == 1, torch.full_like(s[:-1], s_max), s[:-1]))).sqrt()
            self.s, self.dt, self.sig = s[:-1], s[1:] - s[:-1], sig  # (n,) each; dt < 0
            self.std = sig * (-self.dt).sqrt()
            self.model_t = (s[:-1] * self.cfg.timestep_scale).float()
        else:
            raise ValueError(f"fine-tuning samples DDPM and flow models, not {self.kind!r} ones")
        if window is not None:  # stochastic only in steps [lo, hi): the ODE elsewhere (MixGRPO, Flow-GRPO-Fast)
            keep = torch.zeros(steps, dtype=torch.bool)
            keep[window[0]:window[1]] = True
            self.std = torch.where(keep, self.std, torch.zeros_like(self.std))
            if self.kind == "flow":
                self.sig = torch.where(keep, self.sig, torch.zeros_like(self.sig))
        self.train_steps = [i for i in range(steps) if float(self.std[i]) > 0]  # steps with a log-probability
        self.stochastic = bool(self.train_steps)

    def timestep(self, idx: torch.Tensor, device) -> torch.Tensor:
        """(B,) float32: what the network sees as the timestep of each row's step."""
        return self.model_t[idx.cpu()].to(device)

    def predict_x0(self, out: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The clean sample the network output implies at each row's step."""
        if self.kind == "flow":
            s = _rows(self.s, idx, x)
            return x - s * flow_velocity(self.cfg, out, x, s.flatten(), exact=True)
        return self._x0_eps(out, idx, x)[0]

    def _x0_eps(self, out: torch.Tensor, idx: torch.Tensor, x: torch.Tensor):
        a, s = _rows(self.ab, idx, x).sqrt(), (1 - _rows(self.ab, idx, x)).sqrt()
        p = self.cfg.prediction
        if p == "eps":
            return (x - s * out) / a, out
        if p == "x0":
            return out, (x - a * out) / s
        return a * x - s * out, a * out + s * x  # v

    def mean_std(self, out: torch.Tensor, idx: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean of x_next, its std (B, 1, 1, 1)) for each row at its step, in fp32."""
        out, x = out.float(), x.float()
        std = _rows(self.std, idx, x)
        if self.kind == "ddpm":
            x0, eps = self._x0_eps(out, idx, x)
            ab_prev = _rows(self.ab_prev, idx, x)
            return ab_prev.sqrt() * x0 + (1 - ab_prev - std**2).clamp_min(0).sqrt() * eps, std
        s, dt, sig = _rows(self.s, idx, x), _rows(self.dt, idx, x), _rows(self.sig, idx, x)
        v = flow_velocity(self.cfg, out, x, s.flatten(), exact=True)
        return x * (1 + sig**2 / (2 * s) * dt) + v * (1 + sig**2 * (1 - s) / (2 * s)) * dt, std

    def kl_scale(self, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, 1) the sigma a KL penalty divides by: flow_grpo's sigma_t (no sqrt(dt)), DDIM's step std."""
        return _rows(self.sig if self.kind == "flow" else self.std, idx, like)

    def step(self, out: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, *, generators=None,
             prev: torch.Tensor | None = None):
        """(x_next, log p(x_next) (B,) or None, mean, std): draws x_next (one generator per row) unless ``prev``
        gives it; a deterministic step (std 0) returns the mean and no log-probability."""
        mean, std = self.mean_std(out, idx, x)
        if not bool((std > 0).all()):
            return mean, None, mean, std
        if prev is None:
            prev = mean + std * rng.randn(tuple(mean.shape), generators, mean.device)
        logp = -((prev.detach() - mean) ** 2) / (2 * std**2) - std.log() - _LOG_SQRT_2PI
        return prev, logp.flatten(1).mean(1), mean, std


def step_kl(policy: GaussianPolicy, mean: torch.Tensor, mean_ref: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B,) KL of each row's policy step to the reference's, per dimension, in flow_grpo's units:
    |mu - mu_ref|^2 / (2 sigma_t^2) averaged over dimensions, sigma_t = ``policy.kl_scale`` at the row's step.

    One formula for GRPO's penalty and the held-out guard, so ``kl`` (training) and ``heldout/kl`` read alike."""
    return ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * policy.kl_scale(idx, mean).flatten() ** 2)


def model_fn_of(module, dtype: torch.dtype = torch.float32):
    """``model_fn(x, t, cond)`` over a denoiser (or DeepSpeed engine) taking (x, t, hidden, mask, pooled)."""
    def model_fn(x, t, c):
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return module(x.to(dtype), t, c.hidden.to(dtype), c.mask,
                          None if c.pooled is None else c.pooled.to(dtype)).float()
    return model_fn


def initial_noise(generators: list[torch.Generator], latent_shape: tuple[int, ...], device) -> torch.Tensor:
    """x_T (B, C, h, w): each row from its own generator (the first draw of each sample)."""
    return torch.cat([torch.randn((1, *latent_shape), generator=g) for g in generators]).to(device)


def policy_output(model_fn, policy: GaussianPolicy, x, idx, cond, both, cfg_scale: float) -> torch.Tensor:
    """The (guided) network output at each row's step."""
    return guided_output(model_fn, x, policy.timestep(idx, x.device), cond, both, cfg_scale)


@torch.no_grad()
def sample_trajectories(model_fn, policy: GaussianPolicy, cond, both, cfg_scale: float, generators,
                        latent_shape: tuple[int, ...], device, x_t: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (B, n + 1, C, h, w) from x_T to the sample, log-probs (B, n) of each step, 0 where deterministic).
    x_T is ``x_t`` when given, else each row's generator's first draw."""
    x = initial_noise(generators, latent_shape, device) if x_t is None else x_t
    xs, logps = [x], []
    for i in range(policy.n):
        idx = torch.full((x.shape[0],), i, dtype=torch.long)
        out = policy_output(model_fn, policy, x, idx, cond, both, cfg_scale)
        x, logp, _, _ = policy.step(out, idx, x, generators=generators)
        xs.append(x)
        logps.append(logp if logp is not None else torch.zeros(x.shape[0], device=x.device))
    return torch.stack(xs, 1), torch.stack(logps, 1)
