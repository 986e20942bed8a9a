"""The sampling loop and sampler selection.

``sample(model_fn, sampler, shape, cond, uncond, cfg_scale, steps, generator)`` draws x_T from a CPU
generator (so a seed gives the same image on any device), runs the sampler with classifier-free guidance
(in every step, or only within ``guidance_interval``), and returns x_0 in float32.
``build_sampler(cfg, objective_cfg)`` makes a sampler whose schedule and parameterization match the objective
the model was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch

from tessera.trainer.diffusion.guidance import cat_cond, check_interval, guidance_on, guided_output
from tessera.trainer.diffusion.objectives import ObjectiveConfig
from tessera.trainer.diffusion.samplers import SAMPLERS, Sampler


@dataclass(kw_only=True)
class SamplerConfig:
    """Sampler name, step count, guidance, and the few knobs samplers expose."""

    # euler_uniform and lcm are the few-step samplers of distilled students (docs/distill.md)
    name: Literal["ddpm", "ddim", "dpmpp_2m", "euler", "euler_discrete", "edm_heun", "euler_uniform", "lcm"] = "euler"
    steps: int = 28
    cfg_scale: float = 4.5
    eta: float = 0.0  # ddim
    timestep_spacing: Literal["linspace", "leading", "trailing"] = "trailing"  # ddpm, ddim, euler_discrete
    sigma_min: float = 0.002  # edm_heun
    sigma_max: float = 80.0  # edm_heun
    rho: float = 7.0  # edm_heun
    lcm_origin_steps: int = 50  # lcm: the skipping-step grid the consistency model was distilled on
    # Guide only at noise levels in [lo, hi] (0 clean .. 1 pure noise, the flow time of the same signal-to-noise
    # ratio: sigma / (1 + sigma) in EDM's sigma); plain conditional steps elsewhere. None: every step.
    guidance_interval: list[float] | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        check_interval(self.guidance_interval)


def build_sampler(cfg: SamplerConfig, objective: ObjectiveConfig) -> Sampler:
    """A sampler for models trained with ``objective``; raises if the pair does not fit."""
    cls = SAMPLERS.get(cfg.name)
    obj_cfg = getattr(objective, objective.name)
    if cfg.name in ("dpmpp_2m", "lcm"):
        if objective.name == "edm":
            raise ValueError(f"sampler {cfg.name!r} supports ddpm and flow objectives, not edm")
        return cls(obj_cfg, origin_steps=cfg.lcm_origin_steps) if cfg.name == "lcm" else cls(obj_cfg)
    if cls.objective != objective.name:
        raise ValueError(f"sampler {cfg.name!r} samples {cls.objective!r} models, objective is {objective.name!r}")
    if cfg.name in ("ddpm", "euler_discrete"):
        return cls(obj_cfg, timestep_spacing=cfg.timestep_spacing)
    if cfg.name == "ddim":
        return cls(obj_cfg, eta=cfg.eta, timestep_spacing=cfg.timestep_spacing)
    if cfg.name == "edm_heun":
        return cls(obj_cfg, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, rho=cfg.rho)
    return cls(obj_cfg)


@torch.no_grad()
def sample(
    model_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    sampler: Sampler,
    shape: tuple[int, ...],
    cond: Any,
    uncond: Any | None = None,
    cfg_scale: float = 1.0,
    steps: int = 28,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    guidance_interval: Sequence[float] | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Generate a (B, C, H, W) batch; guidance runs cond and uncond in one forward when cfg_scale != 1, at every
    step or at the steps whose noise level lies in ``guidance_interval``. ``on_step(i, x)`` sees the state after
    step i (distillation records the teacher's path with it)."""
    sampler.set_timesteps(steps, image_shape=tuple(shape))
    gen_device = generator.device if generator is not None else torch.device("cpu")
    x = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)
    x = x * sampler.init_noise_sigma
    both = cat_cond(cond, uncond) if (uncond is not None and cfg_scale != 1.0) else None
    for i, t in enumerate(sampler.timesteps):
        x_in, t_model = sampler.model_input(x, t)
        timestep = torch.full((shape[0],), t_model, device=x.device, dtype=torch.float32)  # (B,)
        guide = both if both is not None and guidance_on(guidance_interval, sampler.noise_level(t)) else None
        out = guided_output(model_fn, x_in, timestep, cond, guide, cfg_scale)
        x = sampler.step(out, t, x, generator=generator)
        if on_step is not None:
            on_step(i, x)
    return x
