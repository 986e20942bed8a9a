"""Training objectives: DDPM (eps | v | x0), rectified flow, EDM. One small class per objective.

Call contract (what the trainer does each step)::

    objective = build_objective(cfg.objective)          # or OBJECTIVES.get(name)(sub_config)
    loss, t = objective.loss(model_fn, x0, cond, generator)
    loss.mean().backward()                             # or weight per sample first

* ``x0``: (B, C, H, W) clean latents (any H, W; one resolution per batch), any float dtype/device.
* ``cond``: passed through untouched to ``model_fn`` (e.g. text hidden states + mask).
* ``model_fn(x_t, timestep, cond) -> prediction``, ``prediction.shape == x_t.shape``. ``timestep`` is a
  (B,) float32 tensor on ``x0.device``:
    - ddpm: the integer train timestep 0..T-1 as float;
    - flow: t * ``timestep_scale`` (1000), with t the noise level in [0, 1] (as SD3 does);
    - edm: c_noise = ln(sigma) / 4.
* ``generator``: an optional ``torch.Generator``; all randomness (t, noise) is drawn from it on its own
  device and moved to ``x0.device``, so a seeded generator makes the step reproducible (a CPU generator
  gives the same draws whatever device the model runs on).
* The loss is computed in float32 whatever the model's output dtype (e.g. bf16 under autocast).
* Returns ``loss`` (B,) float32 (per-sample weighted MSE over C, H, W) and ``t`` (B,) in [0, 1] for
  logging: ddpm t/(T-1); flow the noise level t; edm sigma^2 / (sigma^2 + sigma_data^2).

Each objective also exposes ``noise(x0, eps, ...)`` and ``target(x0, eps, ...)`` so the math is testable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from tessera.registry import Registry
from tessera.trainer.diffusion import rng, schedules
from tessera.trainer.diffusion.schedules import BetaScheduleConfig
from tessera.trainer.diffusion.weighting import min_snr_weight

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
OBJECTIVES: Registry[type] = Registry("objective")


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) in x's dtype/device, for per-sample coefficients."""
    return v.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))


def _randn(shape: tuple, generator: rng.Gen, like: torch.Tensor) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device (seeded), then moved next to ``like``."""
    return rng.randn(shape, generator, like.device).to(like.dtype)


def _rand(n: int, generator: rng.Gen, device: torch.device) -> torch.Tensor:
    """(n,) uniform [0, 1) float64 from the generator(s), on ``device``."""
    return rng.rand(n, generator, device)


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error in float32, (B,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


# --------------------------------------------------------------------------- DDPM


@dataclass(kw_only=True)
class DDPMObjectiveConfig:
    """Discrete-time DDPM with a beta schedule and a prediction target."""

    schedule: BetaScheduleConfig = field(default_factory=BetaScheduleConfig)
    prediction: Literal["eps", "v", "x0"] = "eps"
    min_snr_gamma: float | None = None  # e.g. 5.0; None disables the weighting


@OBJECTIVES.register("ddpm")
class DDPMObjective:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t ~ U{0..T-1}; regress eps, v or x0."""

    def __init__(self, cfg: DDPMObjectiveConfig) -> None:
        self.cfg = cfg
        self.alphas_cumprod = schedules.alphas_cumprod(cfg.schedule).double()  # (T,)
        self.num_timesteps = cfg.schedule.num_train_timesteps
        self._on: dict[torch.device, torch.Tensor] = {}

    def _table(self, device: torch.device) -> torch.Tensor:
        """The schedule on ``device``, copied once (a copy per step would be a host sync on CUDA)."""
        if device not in self._on:
            self._on[device] = self.alphas_cumprod.to(device)
        return self._on[device]

    def _coefs(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ab = self._table(t.device)[t]
        return _bcast(ab.sqrt(), x), _bcast((1 - ab).sqrt(), x)

    def noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x0) at integer timesteps t (B,)."""
        a, s = self._coefs(t, x0)
        return a * x0 + s * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Regression target for the configured prediction type (v = a*eps - s*x0)."""
        if self.cfg.prediction == "eps":
            return eps
        if self.cfg.prediction == "x0":
            return x0
        a, s = self._coefs(t, x0)
        return a * eps - s * x0

    def loss(self, model_fn: ModelFn, x0: torch.Tensor, cond: Any, generator: rng.Gen = None):
        """Per-sample (optionally min-SNR weighted) MSE and t/(T-1), both (B,)."""
        b = x0.shape[0]
        t = (_rand(b, generator, x0.device) * self.num_timesteps).long().clamp_(max=self.num_timesteps - 1)
        eps = _randn(tuple(x0.shape), generator, x0)
        pred = model_fn(self.noise(x0, eps, t), t.float(), cond)
        loss = _mse(pred, self.target(x0, eps, t))
        if self.cfg.min_snr_gamma is not None:
            snr = schedules.snr(self._table(t.device)[t])
            loss = loss * min_snr_weight(snr, self.cfg.min_snr_gamma, self.cfg.prediction).float()
        return loss, t.float() / (self.num_timesteps - 1)


# --------------------------------------------------------------------------- rectified flow


@dataclass(kw_only=True)
class FlowObjectiveConfig:
    """Rectified flow (SD3/FLUX): x_t = (1-t) x0 + t eps, target eps - x0."""

    t_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # Share of the noise levels drawn uniformly in [0, 1] instead of logit-normal: a mixture that keeps some training
    # at the ends a shifted logit-normal all but skips (at logit_mean 1.5, 0.2% of draws land below t = 0.2).
    uniform_mix: float = 0.0
    shift: float = 1.0  # SD3 static shift (3.0 for SD3 at 1024px); ignored if dynamic_shift
    dynamic_shift: bool = False  # FLUX-style mu from the image token count
    patch_size: int = 2  # to count image tokens for the dynamic shift: (H/p) * (W/p)
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    timestep_scale: float = 1000.0  # the model sees t * timestep_scale
    # What the network outputs. "velocity": v = eps - x0 directly (SD3/FLUX). "sample": the clean image x0, turned
    # into v = (x_t - x0_hat) / t for the loss and the samplers (x-prediction, Li & He 2025, "Back to Basics: Let
    # Denoising Generative Models Denoise"). A pixel-space DiT with large patches learns x0, which lies on the
    # data manifold, far faster than v, which makes the network carry the input noise through every block.
    prediction: Literal["velocity", "sample"] = "velocity"
    t_min: float = 0.05  # "sample": the 1/t of the conversion is capped at 1/t_min near the clean end

    def __post_init__(self) -> None:
        if self.logit_std <= 0 or self.shift <= 0:
            raise ValueError("logit_std and shift must be > 0")
        if not 0.0 <= self.uniform_mix < 1.0:
            raise ValueError(f"uniform_mix must be in [0, 1), got {self.uniform_mix}")
        if not 0.0 < self.t_min < 1.0:
            raise ValueError(f"t_min must be in (0, 1), got {self.t_min}")


def flow_velocity(cfg: FlowObjectiveConfig, out: torch.Tensor, x_t: torch.Tensor, t, *, exact: bool = False
                  ) -> torch.Tensor:
    """The velocity eps - x0 from a flow model's raw output at noise level ``t`` (float or (B,) tensor).

    The loss caps 1/t at 1/t_min; samplers pass ``exact=True`` (t > 0 there), so an Euler step to t = 0 lands
    exactly on the predicted image."""
    if cfg.prediction == "velocity":
        return out
    t = _bcast(t, x_t) if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=x_t.dtype)
    return (x_t - out.to(x_t.dtype)) / (t if exact else t.clamp(min=cfg.t_min))


def flow_mu(cfg: FlowObjectiveConfig, image_shape: tuple[int, ...]) -> float:
    """Resolution-dependent shift mu for a (..., H, W) latent shape: linear in its (H/p)*(W/p) token count."""
    n_tok = (image_shape[-2] // cfg.patch_size) * (image_shape[-1] // cfg.patch_size)
    return schedules.calculate_shift(n_tok, cfg.base_seq_len, cfg.max_seq_len, cfg.base_shift, cfg.max_shift)


@OBJECTIVES.register("flow")
class FlowObjective:
    """Conditional flow matching on the straight path between data and Gaussian noise."""

    def __init__(self, cfg: FlowObjectiveConfig) -> None:
        self.cfg = cfg

    def shift_t(self, u: torch.Tensor, image_shape: tuple[int, ...]) -> torch.Tensor:
        """Apply the static or resolution-dependent shift to t in [0, 1]."""
        c = self.cfg
        if c.dynamic_shift:
            return schedules.time_shift(flow_mu(c, image_shape), u)
        return schedules.shift_sigmas(u, c.shift) if c.shift != 1.0 else u

    def sample_t(self, n: int, image_shape: tuple[int, ...], generator: rng.Gen, device) -> torch.Tensor:
        """(n,) float64 noise levels: uniform or logit-normal (or their mixture), then shifted for this latent shape."""
        c = self.cfg
        u = _rand(n, generator, device)
        if c.t_sampling == "logit_normal":
            # Inverse-CDF of the normal from the same uniform draws keeps one RNG stream per step. With uniform_mix p,
            # u < p picks the uniform component and u / p is its draw; otherwise (u - p) / (1 - p) feeds the
            # logit-normal: both are uniform on [0, 1) given the branch, so one draw per sample still suffices.
            p = c.uniform_mix
            uni = u < p
            v = torch.where(uni, u / p, (u - p) / (1 - p)) if p > 0 else u
            z = math.sqrt(2.0) * torch.erfinv(2 * v.clamp(1e-12, 1 - 1e-12) - 1)
            ln = torch.sigmoid(c.logit_mean + c.logit_std * z)
            u = torch.where(uni, v, ln) if p > 0 else ln
        return self.shift_t(u, image_shape)

    def noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x0 + t eps for t (B,) in [0, 1]."""
        tb = _bcast(t, x0)
        return (1 - tb) * x0 + tb * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity d x_t / d t = eps - x0."""
        return eps - x0

    def loss(self, model_fn: ModelFn, x0: torch.Tensor, cond: Any, generator: rng.Gen = None):
        """Per-sample MSE to the velocity and t, both (B,)."""
        t = self.sample_t(x0.shape[0], tuple(x0.shape), generator, x0.device)
        eps = _randn(tuple(x0.shape), generator, x0)
        x_t = self.noise(x0, eps, t)
        out = model_fn(x_t, (t * self.cfg.timestep_scale).float(), cond)
        # "sample": the v-loss of the converted x0 prediction (JiT's best variant): |x0 - x0_hat|^2 / max(t, t_min)^2
        pred = flow_velocity(self.cfg, out, x_t.to(out.dtype), t.to(out.dtype))
        return _mse(pred, self.target(x0, eps)), t.float()


# --------------------------------------------------------------------------- EDM


@dataclass(kw_only=True)
class EDMObjectiveConfig:
    """Karras et al. 2022 preconditioning and log-normal sigma sampling."""

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5


@OBJECTIVES.register("edm")
class EDMObjective:
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise); loss lambda(sigma) |D - x0|^2."""

    def __init__(self, cfg: EDMObjectiveConfig) -> None:
        self.cfg = cfg

    def precondition(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) for sigma (B,), EDM Table 1."""
        sd2 = self.cfg.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.cfg.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def denoise(self, model_fn: ModelFn, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """The preconditioned denoiser D(x; sigma) around the raw network ``model_fn``."""
        c_skip, c_out, c_in, c_noise = self.precondition(sigma)
        f = model_fn(_bcast(c_in, x) * x, c_noise.float(), cond)
        return _bcast(c_skip, x) * x + _bcast(c_out, x) * f.to(x.dtype)

    def noise(self, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x = x0 + sigma * eps (variance-exploding)."""
        return x0 + _bcast(sigma, x0) * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The raw network's effective target (x0 - c_skip x) / c_out; its loss weight is then exactly 1."""
        c_skip, c_out, _, _ = self.precondition(sigma)
        x = self.noise(x0, eps, sigma)
        return (x0 - _bcast(c_skip, x0) * x) / _bcast(c_out, x0)

    def sample_sigma(self, n: int, generator: rng.Gen, device) -> torch.Tensor:
        """(n,) float64 sigma = exp(P_mean + P_std * N(0, 1))."""
        z = rng.randn((n,), generator, device, torch.float64)
        return (self.cfg.p_mean + self.cfg.p_std * z).exp()

    def loss(self, model_fn: ModelFn, x0: torch.Tensor, cond: Any, generator: rng.Gen = None):
        """Per-sample lambda(sigma)-weighted MSE of the denoiser and sigma^2/(sigma^2+sigma_data^2)."""
        sigma = self.sample_sigma(x0.shape[0], generator, x0.device)
        eps = _randn(tuple(x0.shape), generator, x0)
        _, _, c_in, c_noise = self.precondition(sigma)
        x = self.noise(x0, eps, sigma)
        f = model_fn(_bcast(c_in, x) * x, c_noise.float(), cond)
        # lambda * |D - x0|^2 == |F - target|^2 exactly (lambda * c_out^2 = 1); the F-space form avoids
        # the float32 cancellation in D - x0 at small sigma, where lambda ~ 1/sigma^2 is huge.
        return _mse(f, self.target(x0, eps, sigma)), (sigma**2 / (sigma**2 + self.cfg.sigma_data**2)).float()


# --------------------------------------------------------------------------- selection


@dataclass(kw_only=True)
class ObjectiveConfig:
    """Which objective to train with, plus each objective's own section (only the named one is used)."""

    name: Literal["ddpm", "flow", "edm"] = "flow"
    ddpm: DDPMObjectiveConfig = field(default_factory=DDPMObjectiveConfig)
    flow: FlowObjectiveConfig = field(default_factory=FlowObjectiveConfig)
    edm: EDMObjectiveConfig = field(default_factory=EDMObjectiveConfig)


def build_objective(cfg: ObjectiveConfig):
    """Instantiate the objective named by ``cfg.name`` with its own sub-config."""
    return OBJECTIVES.get(cfg.name)(getattr(cfg, cfg.name))
