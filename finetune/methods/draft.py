"""Reward backprop through the sampler (differentiable rewards, ``score_tensor``).

* ``draft``: DRaFT-K (Clark et al. 2023): the deterministic sampler runs without grad to step n - K, the last K
  steps carry gradient; K = 1 is the paper's pick.
* ``alignprop``: AlignProp (Prabhudesai et al. 2023)'s randomized truncation: K ~ U{1..k} per update.
* ``refl``: ReFL (ImageReward, Xu et al. 2023): stop at a random step s in ``refl_steps`` (of 40, scaled to the
  run's steps) and score the one-step prediction x0_hat(x_s) with gradient.

The loss is -mean reward of the decoded images; activation checkpointing keeps the K steps' activations small.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from tessera.finetune.methods.base import METHODS, Batch, Context, Method, micro_steps
from tessera.finetune.policy import differentiable_decode
from tessera.finetune.rollout import initial_noise, policy_output


@METHODS.register("draft")
class DRaFT(Method):
    """DRaFT-K / AlignProp / ReFL."""

    def __init__(self, cfg, job) -> None:
        super().__init__(cfg, job)
        self.per_step = micro_steps(job.rollout.batches_per_update, cfg.steps_per_update, "draft")
        if cfg.k > job.rollout.steps:
            raise ValueError(f"draft.k ({cfg.k}) exceeds rollout.steps ({job.rollout.steps})")

    def backward_calls(self) -> int:
        """One backward per micro-batch."""
        return self.per_step

    def _window(self, ctx: Context, update: int) -> tuple[int, bool]:
        """(first step with gradient, stop there and predict x0); the same on every rank."""
        n, rnd = self.job.rollout.steps, random.Random(f"{ctx.seed}:{update}:draft")
        if self.cfg.mode == "draft":
            return n - self.cfg.k, False
        if self.cfg.mode == "alignprop":
            return n - rnd.randint(1, self.cfg.k), False
        lo, hi = (min(n - 1, s * n // 40) for s in self.cfg.refl_steps)
        return rnd.randint(lo, max(lo, hi - 1)), True

    def update(self, ctx: Context, batch: Batch) -> dict[str, float]:
        """One reward-backprop backward per micro-batch."""
        if not ctx.reward.differentiable:
            raise ValueError("draft needs differentiable rewards (score_tensor): colour_match, classifier, "
                             "aesthetic, preference, clip_score")
        prompts, keys = batch.prompts[batch.local], batch.keys[batch.local]
        b, start, refl = self.job.rollout.batch_size, *self._window(ctx, batch.update)
        scale, ode = self.job.rollout.cfg_scale, ctx.ode
        rewards, losses = [], []
        for i in range(0, len(prompts), b):
            p = prompts[i:i + b]
            cond, both = ctx.condition(p, scale)
            x = initial_noise(ctx.generators(batch.update, keys[i:i + b]), ctx.latent_shape, ctx.device)
            with torch.no_grad():
                for s in range(start):
                    idx = torch.full((len(p),), s, dtype=torch.long)
                    x = ode.step(policy_output(ctx.sample_fn, ode, x, idx, cond, both, scale), idx, x)[0]
            for s in range(start, start + 1 if refl else ode.n):
                idx = torch.full((len(p),), s, dtype=torch.long)
                out = policy_output(ctx.train_fn, ode, x, idx, cond, both, scale)
                x = ode.predict_x0(out, idx, x) if refl else ode.step(out, idx, x)[0]
            r = ctx.reward.score_tensor(differentiable_decode(ctx.autoencoder, x), p)  # (B,)
            loss = -r.mean()
            ctx.engine.backward(loss)
            ctx.engine.step()
            rewards.append(r.detach().double().cpu())
            losses.append(float(loss))
        r = torch.cat(rewards).numpy()
        return {"loss": float(np.mean(losses)), "reward_mean": float(r.mean()), "reward_std": float(r.std()),
                "grad_steps": float(1 if refl else ode.n - start)}
