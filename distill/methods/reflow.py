"""Reflow (Liu et al. 2022, "Flow Straight and Fast"; InstaFlow, Liu et al. 2023) for flow models.

The teacher's ODE couples each noise z with an image x1 = ODE(z) (its own sampler, steps and guidance: the
guidance is folded into the pairs). Retraining on the straight path x_t = (1 - t) x1 + t z with the constant
velocity z - x1 straightens the flow, so a few Euler steps (``euler_uniform``) follow it. The pairs are a cached
derived dataset (``distill/pairs.py``). With ``one_step_samples`` the last part of the run fits the one-step map
x1 ~ x0_hat(z, t = 1) (InstaFlow's distillation stage, with an L2 loss), and the student samples in one step.

``targets: trajectory`` keeps the teacher's path instead of straightening it: the pairs also hold the teacher's
states at the student's interior ``euler_uniform`` levels (linear between its own steps, as Euler draws the path),
and each of the student's k Euler steps is fit to the teacher's segment between the same two levels, from the
teacher's state (TRACT's one-phase form, Berthelot et al. 2023): a k-step student of the full-step teacher without
the error that compounds over progressive distillation's rounds.

A DDPM or EDM teacher has no straight path to retrain: the error names progressive and lcm.
"""

from __future__ import annotations

import hashlib

import torch

from tessera import storage
from tessera.config import to_dict
from tessera.trainer.diffusion import rng
from tessera.trainer.diffusion.objectives import FlowObjective, flow_velocity
from tessera.trainer.diffusion.samplers.euler_uniform import uniform_flow_sigmas
from tessera.trainer.diffusion.sampling import SamplerConfig
from tessera.trainer.engine import sample_generators

from tessera.distill import pairs
from tessera.distill.methods.base import METHODS, Context, Method, loader_config
from tessera.distill.student import teacher_digest


@METHODS.register("reflow")
class Reflow(Method):
    """Straight-path retraining on teacher pairs, then (optionally) the one-step map."""

    name = "reflow"

    def __init__(self, section, job, teacher_job) -> None:
        super().__init__(section, job, teacher_job)
        self.phase = "reflow"
        self.flow = FlowObjective(teacher_job.objective.flow)

    def student_sampler(self) -> SamplerConfig:
        """``euler_uniform`` at ``reflow.sample_steps`` (1 once the one-step map is trained), cfg 1."""
        steps = 1 if self.section.one_step_samples > 0 else self.section.sample_steps
        return SamplerConfig(name="euler_uniform", steps=steps, cfg_scale=1.0)

    def pair_sampler(self, guidance) -> SamplerConfig:
        """The teacher's sampler as the pairs are drawn with: its own, at ``pair_steps``, with the folded guidance."""
        own = self.teacher_job.samples.sampler
        if own.name == "lcm":
            raise ValueError("reflow pairs need a deterministic teacher sampler (euler, euler_uniform, dpmpp_2m), "
                             "not 'lcm'")
        return SamplerConfig(**{**to_dict(own), "steps": self.section.pair_steps or own.steps,
                                "cfg_scale": guidance.cfg_scale, "guidance_interval": guidance.interval})

    def data(self, ctx: Context, rank: int, world: int, run):
        """Generate (or reuse) the pairs, then serve them."""
        from tessera.trainer.components import precomputed_ids
        from tessera.trainer.data import build_loader

        s, job = self.section, self.job
        cache = s.cache_dir or run.path("pairs")
        gen_cfg = loader_config(job.data, self.teacher_job.data)
        gen_cfg.batch_size = s.pair_batch
        ids = precomputed_ids(gen_cfg, self.teacher_job.text_encoder, self.teacher_job.autoencoder)
        # One reader over the whole data on every rank: chunk c is the c-th batch whatever the world size.
        loader = build_loader(gen_cfg, rank=0, world_size=1, **ids)
        sampler = self.pair_sampler(ctx.teacher.guidance)
        n_chunks = -(-s.pairs // s.pair_batch)

        def recipe() -> dict:
            return {"format": pairs.FORMAT, "teacher_sha256": teacher_digest(job.checkpoint, job.teacher_weights == "ema"),
                    "objective": to_dict(self.teacher_job.objective), "sampler": to_dict(sampler),
                    "text_encoder": to_dict(self.teacher_job.text_encoder),
                    "autoencoder": to_dict(self.teacher_job.autoencoder),
                    "data": [hashlib.sha256(storage.read_bytes(storage.join(p, "manifest.json"))).hexdigest()
                             for p in gen_cfg.path],
                    "caption_variants": gen_cfg.caption_variants, "data_seed": gen_cfg.seed,
                    "chunks": n_chunks, "pair_batch": s.pair_batch, "seed": job.train.seed,
                    **({"trajectory_steps": s.sample_steps} if s.targets == "trajectory" else {})}

        grid_of = None
        if s.targets == "trajectory":
            if sampler.name not in ("euler", "euler_uniform"):
                raise ValueError(f"reflow.targets=trajectory reads the teacher's path as Euler steps draw it; the "
                                 f"teacher samples with {sampler.name!r}: use euler or euler_uniform")
            grid_of = self.interior
        pairs.prepare(ctx, cache, recipe, n_chunks, loader, sampler, job.train.seed, rank, grid_of)
        return pairs.PairLoader(cache, job.data.batch_size, job.data.seed, rank, world)

    def grid(self, shape: tuple[int, ...]) -> torch.Tensor:
        """(k + 1,) the student's ``euler_uniform`` noise levels at ``sample_steps``, from 1 to 0."""
        return uniform_flow_sigmas(self.flow.cfg, self.section.sample_steps, shape)

    def interior(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The grid's levels strictly between the noise and the image: where the pairs store the teacher's states."""
        return self.grid(shape)[1:-1]

    def loss(self, ctx: Context, batch: dict, step: int) -> torch.Tensor:
        """Velocity MSE on the straight path (reflow), or x-space MSE of the one-step map."""
        z = batch["noise"].to(ctx.device)
        x1 = batch["latent"].to(ctx.device)
        c = batch["cond"]
        cond = type(c)(c.hidden.to(ctx.device, ctx.dtype), c.mask.to(ctx.device),
                       None if c.pooled is None else c.pooled.to(ctx.device, ctx.dtype))
        gens = sample_generators(ctx.seed, step, list(batch["key"]))
        b = z.shape[0]
        if self.phase == "reflow" and self.section.targets == "trajectory":
            return self.trajectory_loss(ctx, z, x1, batch["states"].to(ctx.device), cond, gens)
        if self.phase == "one_step":
            t = torch.ones(b, dtype=torch.float64, device=z.device)
        elif self.section.t_sampling == "teacher":
            t = self.flow.sample_t(b, tuple(z.shape), gens, z.device)
        else:
            t = rng.rand(b, gens, z.device)
        x_t = ctx.process.noise(x1, z, t)
        out = ctx.student(x_t, ctx.process.model_timestep(t), cond)
        if self.phase == "one_step":
            pred, target = ctx.process.x0_eps(out, x_t, t)[0], x1
        else:
            pred, target = flow_velocity(self.flow.cfg, out, x_t.to(out.dtype), t.to(out.dtype)), z - x1
        return (pred.float() - target.float()).pow(2).flatten(1).mean(1)

    def trajectory_loss(self, ctx: Context, z, x1, states, cond, gens) -> torch.Tensor:
        """Segment j ~ U{0..k-1} of the student's grid per sample: from the teacher's state at level t_j, one Euler
        step must land on its state at t_{j+1}; velocity MSE to (x_tj - x_tj+1) / (t_j - t_j+1)."""
        path = torch.cat([z[:, None], states, x1[:, None]], 1)  # (B, k + 1, C, h, w) from noise to image
        k = path.shape[1] - 1
        grid = self.grid(tuple(z.shape)).to(z.device)
        j = (rng.rand(z.shape[0], gens, z.device) * k).long().clamp_(max=k - 1)
        rows = torch.arange(z.shape[0], device=z.device)
        x_t, x_s, t, s = path[rows, j], path[rows, j + 1], grid[j], grid[j + 1]
        out = ctx.student(x_t, ctx.process.model_timestep(t), cond)
        v = flow_velocity(self.flow.cfg, out, x_t.to(out.dtype), t.to(out.dtype))
        target = (x_t - x_s) / (t - s).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        return (v.float() - target.float()).pow(2).flatten(1).mean(1)

    def after_step(self, ctx: Context, samples: int) -> dict:
        """Into the one-step phase for the run's last ``one_step_samples``."""
        s = self.section
        if s.one_step_samples and self.phase == "reflow" and samples >= self.job.train.total_samples - s.one_step_samples:
            self.phase = "one_step"
        return {"reflow/one_step": float(self.phase == "one_step")}

    def state_dict(self) -> dict:
        """The phase."""
        return {"phase": self.phase}

    def load_state_dict(self, state: dict) -> None:
        """Restore the phase."""
        self.phase = state.get("phase", "reflow")
