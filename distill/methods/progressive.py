"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): each round halves the sampling steps.

In a round whose teacher samples N steps, the student learns one DDIM step per two of the teacher's on the N-step
grid: from data x0 and noise, z_t = alpha_t x0 + sigma_t eps at a student grid time t; the teacher's two guided
DDIM steps t -> t' -> t'' give z''; the target is the x that one DDIM step t -> t'' must predict to land there,
x~ = (z'' - (sigma''/sigma_t) z_t) / (alpha'' - (sigma''/sigma_t) alpha_t); the loss is the x-space MSE with the
paper's truncated-SNR weight max(alpha_t^2 / sigma_t^2, 1). At the end of a round the student becomes the teacher
(its fp32 master weights, gathered to every rank) and the student's EMA restarts from it.

Grids are nested under halving: DDPM models use DDIM's ``trailing`` spacing (the student samples with ``ddim``),
flow models the uniform grid of ``euler_uniform`` (their DDIM step is the Euler step). Flow models need no
reparameterisation: x0_hat = x_t - t v (velocity) or the output itself (sample). An eps teacher's student is read
as v ("auto"): eps cannot express x0 at low SNR, where a few-step student has to, and the paper trains with v.
"""

from __future__ import annotations

import dataclasses

import torch

from tessera.trainer import checkpoint as C
from tessera import storage
from tessera.trainer.diffusion import rng
from tessera.trainer.diffusion.process import CLEAN
from tessera.trainer.diffusion.samplers.discrete import spaced_timesteps
from tessera.trainer.diffusion.samplers.euler_uniform import uniform_flow_sigmas
from tessera.trainer.diffusion.sampling import SamplerConfig

from tessera.distill.methods.base import METHODS, Context, Method, inputs
from tessera.distill.student import gather_all, load_params
from tessera.distill.teacher import Guidance

TEACHER_FILE = "distill_teacher.safetensors"


def step_grid(objective, n: int, image_shape: tuple[int, ...]) -> torch.Tensor:
    """(n + 1,) float64 times of an n-step sampler, noisy first, ending at the clean end."""
    if objective.name == "flow":
        return uniform_flow_sigmas(objective.flow, n, image_shape)
    ts = spaced_timesteps(objective.ddpm.schedule.num_train_timesteps, n, "trailing")
    return torch.tensor([*ts.tolist(), CLEAN], dtype=torch.float64)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1)))


@torch.no_grad()
def two_step_target(teacher, z: torch.Tensor, t: torch.Tensor, tm: torch.Tensor, s: torch.Tensor, cond) -> torch.Tensor:
    """The x a single DDIM step t -> s must predict to land where the teacher's two guided steps t -> tm -> s land:
    x~ = (z'' - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)."""
    p = teacher.process
    z2 = teacher.ddim(teacher.ddim(z, t, tm, cond), tm, s, cond)
    a_t, sig_t = p.alpha_sigma(t)
    a_s, sig_s = p.alpha_sigma(s)
    r = sig_s / sig_t
    return (z2 - _bcast(r, z) * z) / _bcast(a_s - r * a_t, z)


@METHODS.register("progressive")
class Progressive(Method):
    """Rounds of N -> N / 2 steps from ``start_steps`` down to ``final_steps``."""

    name = "progressive"

    def __init__(self, section, job, teacher_job) -> None:
        super().__init__(section, job, teacher_job)
        self.round = 0
        self.round_samples = job.train.total_samples // section.rounds

    @property
    def teacher_steps(self) -> int:
        """The current round's teacher steps."""
        return self.section.start_steps // 2 ** self.round

    def student_objective(self):
        """v for an eps DDPM teacher ("auto"/"v"), else the teacher's."""
        obj = self.teacher_job.objective
        if obj.name == "ddpm" and (self.section.student_prediction == "v" or (
                self.section.student_prediction == "auto" and obj.ddpm.prediction == "eps")):
            return dataclasses.replace(obj, ddpm=dataclasses.replace(obj.ddpm, prediction="v"))
        return obj

    def student_sampler(self) -> SamplerConfig:
        """ddim (trailing) or euler_uniform at the current student's steps, cfg 1."""
        steps = max(self.section.final_steps, self.teacher_steps // 2)
        name = "euler_uniform" if self.teacher_job.objective.name == "flow" else "ddim"
        return SamplerConfig(name=name, steps=steps, cfg_scale=1.0, eta=0.0, timestep_spacing="trailing")

    def loss(self, ctx: Context, batch: dict, step: int) -> torch.Tensor:
        """Truncated-SNR weighted x-space MSE to the target of two teacher DDIM steps."""
        x0, cond, gens = inputs(ctx, batch, step)
        grid = step_grid(self.teacher_job.objective, self.teacher_steps, tuple(x0.shape)).to(x0.device)
        n = self.teacher_steps // 2  # the student's steps
        i = (rng.rand(x0.shape[0], gens, x0.device) * n).long().clamp_(max=n - 1)  # (B,) student step index
        t, tm, s = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
        eps = rng.randn(tuple(x0.shape), gens, x0.device).to(x0.dtype)
        p = ctx.process
        z = p.noise(x0, eps, t)
        target = two_step_target(ctx.teacher, z, t, tm, s, cond)
        out = ctx.student(z, ctx.student_process.model_timestep(t), cond)
        x_hat, _ = ctx.student_process.x0_eps(out, z, t)
        a_t, sig_t = p.alpha_sigma(t)
        weight = (a_t**2 / sig_t**2).clamp(min=1.0).float().to(x0.device)  # truncated SNR, max(SNR, 1)
        return weight * (x_hat.float() - target.float()).pow(2).flatten(1).mean(1)

    def after_step(self, ctx: Context, samples: int) -> dict:
        """At a round's end: the student becomes the teacher and the EMA restarts from it."""
        due = min(samples // self.round_samples, self.section.rounds - 1)
        if due <= self.round:
            return {"progressive/teacher_steps": self.teacher_steps}
        load_params(self.teacher_net, gather_all(ctx.frags, lambda f: f.view()))
        if ctx.ema is not None:
            ctx.ema.load_slices({f.name: f.view() for f in ctx.frags})
        self.round = due
        self.student_as_teacher(ctx)
        return {"progressive/teacher_steps": self.teacher_steps, "progressive/round": self.round}

    def files(self) -> dict:
        """From the second round on, the round's teacher (it is no longer the base checkpoint)."""
        if self.round == 0:
            return {}
        net = self.teacher_net
        return {TEACHER_FILE: {n: p.detach().float().cpu().clone() for n, p in net.named_parameters()}}

    def setup(self, ctx: Context) -> None:
        """The teacher is the frozen copy of the student (``finetune.policy.Reference``)."""
        self.teacher_net = ctx.teacher.source.copy

    def restore(self, ctx: Context, url: str) -> None:
        """Reload the round's teacher saved with the checkpoint."""
        if self.round > 0:
            load_params(self.teacher_net, C.read_tensors(storage.join(url, TEACHER_FILE)))
            self.student_as_teacher(ctx)

    @staticmethod
    def student_as_teacher(ctx: Context) -> None:
        """From the second round on the teacher is a student: its outputs are read with the student's objective (v
        for an eps teacher), and it is called unguided (its guidance is folded in already)."""
        ctx.teacher.process = ctx.student_process
        ctx.teacher.guidance = Guidance(1.0, None)

    def state_dict(self) -> dict:
        """The round."""
        return {"round": self.round}

    def load_state_dict(self, state: dict) -> None:
        """Restore the round."""
        self.round = int(state.get("round", 0))
