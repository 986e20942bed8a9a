"""Latent consistency distillation (Luo et al. 2023, Algorithm 1; diffusers' train_lcm_distill scripts), with the
teacher's guidance folded in at a fixed scale (``guidance``: the teacher's own cfg_scale and interval by default).

For data x0 and a grid index n of the skipping-step solver (k = T / N, ``lcm.origin_steps`` = N): z_t is x0 noised
to the grid time t, and the teacher's guided DDIM step over the skipping interval gives z_s at s = t - k. The
student's consistency function f(z_t, t) = c_skip(t) z_t + c_out(t) x0_hat(z_t, t) (``samplers/lcm.py``) is fit to
the target network's f(z_s, s) under a pseudo-Huber loss. The target network is the student's EMA (``ema``: the
shipped recipe uses LCM's 0.95), gathered to every rank each step, so the checkpoint's EMA is the target and a
resume restores it exactly. With ``lora.enabled`` this is LCM-LoRA: the teacher is the student with adapters off,
the target the base with the EMA of the adapters.
"""

from __future__ import annotations

import torch

from tessera.trainer.diffusion import rng
from tessera.trainer.diffusion.process import Process
from tessera.trainer.diffusion.samplers.lcm import lcm_boundary, lcm_origin_times
from tessera.trainer.diffusion.sampling import SamplerConfig

from tessera.distill.methods.base import METHODS, Context, Method, inputs
from tessera.distill.student import gather_all, load_params
from tessera.distill.teacher import call_net


def consistency(p: Process, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """f(z, t) = c_skip(t) z + c_out(t) x0_hat(out, z, t) per sample; exactly z at the clean end."""
    c_skip, c_out = lcm_boundary(p.model_timestep(t).double())
    shape = (-1, *([1] * (z.ndim - 1)))
    x0, _ = p.x0_eps(out, z, t)
    return c_skip.to(z.device, z.dtype).view(shape) * z + c_out.to(z.device, z.dtype).view(shape) * x0


@METHODS.register("lcm")
class LCM(Method):
    """Consistency distillation over the skipping-step grid."""

    name = "lcm"

    def student_sampler(self) -> SamplerConfig:
        """``lcm`` at ``lcm.sample_steps`` on the distillation grid, cfg 1 (guidance is in the weights)."""
        s = self.section
        return SamplerConfig(name="lcm", steps=s.sample_steps, cfg_scale=1.0, lcm_origin_steps=s.origin_steps)

    def times(self, p: Process, image_shape: tuple[int, ...], idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, s): the grid time of each index and the time one skipping interval cleaner (clamped at clean)."""
        cfg = getattr(p.objective, p.kind)
        origin = lcm_origin_times(cfg, self.section.origin_steps, image_shape).to(idx.device)
        t = origin[idx]
        if p.kind == "ddpm":
            return t, (t - cfg.schedule.num_train_timesteps // self.section.origin_steps).clamp(min=0)
        return t, torch.where(idx > 0, origin[(idx - 1).clamp(min=0)], torch.zeros_like(t))

    def loss(self, ctx: Context, batch: dict, step: int) -> torch.Tensor:
        """Pseudo-Huber (or L2) distance of f_student(z_t, t) to f_target(teacher step to s, s)."""
        x0, cond, gens = inputs(ctx, batch, step)
        n = self.section.origin_steps
        idx = (rng.rand(x0.shape[0], gens, x0.device) * n).long().clamp_(max=n - 1)
        t, s = self.times(ctx.process, tuple(x0.shape), idx)
        eps = rng.randn(tuple(x0.shape), gens, x0.device).to(x0.dtype)
        z = ctx.process.noise(x0, eps, t)
        with torch.no_grad():
            z_s = ctx.teacher.ddim(z, t, s, cond)
            with ctx.target.model() as net:
                out_s = call_net(net, ctx.dtype)(z_s, ctx.process.model_timestep(s), cond)
            target = consistency(ctx.process, out_s, z_s, s)
        pred = consistency(ctx.process, ctx.student(z, ctx.process.model_timestep(t), cond), z, t)
        d2 = (pred.float() - target.float()).pow(2)
        if self.section.loss == "huber":
            c = self.section.huber_c
            return ((d2 + c * c).sqrt() - c).flatten(1).mean(1)
        return d2.flatten(1).mean(1)

    def setup(self, ctx: Context) -> None:
        """The target starts as the EMA (the student's weights at the start)."""
        self.sync_target(ctx)

    def restore(self, ctx: Context, url: str) -> None:
        """The target is the restored EMA."""
        self.sync_target(ctx)

    def after_step(self, ctx: Context, samples: int) -> dict:
        """The target follows the EMA the loop has just updated."""
        self.sync_target(ctx)
        return {}

    @staticmethod
    def sync_target(ctx: Context) -> None:
        """Target network <- the EMA's full tensors (an all-reduce of the slices: collective)."""
        load_params(ctx.target.module, gather_all(ctx.frags, lambda f: ctx.ema.shadow[f.name]), complete=False)
