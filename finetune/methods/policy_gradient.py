"""DDPO-IS and Flow-GRPO: PPO's clipped importance ratio on each step of sampled trajectories.

Per update: sample ``batches_per_update`` micro-batches of trajectories (recording every step's log-prob),
score them, gather the rewards over the ranks for the advantages (DDPO: per-prompt running stats; GRPO: the
prompt's group of G images), and keep this rank's rows. Then, per inner epoch, each trajectory's steps are
visited in a per-sample random order (DDPO) or in order (Flow-GRPO), ``timestep_fraction`` of them; every
(micro-batch, step) is one backward,
accumulated into ``steps_per_update`` optimizer steps:

    ratio = exp(log p_theta(x_{t-1} | x_t) - log p_old), loss = mean(max(-A ratio, -A clip(ratio, 1 -+ eps)))

GRPO adds beta * KL to the reference policy (adapters off): |mu_theta - mu_ref|^2 / (2 sigma_t^2) per dimension,
sigma_t as flow_grpo's code divides by it. The training micro-batch is the sampling micro-batch, in the same row
order, so before the first optimizer step the recomputed log-probs equal the sampled ones bit for bit
(``ratio_dev_first`` logs max |ratio - 1| of that step: 0).
"""

from __future__ import annotations

import numpy as np
import torch

from tessera.finetune.advantages import PerPromptStats, group_advantages, zero_std_share
from tessera.finetune.config import DDPOConfig
from tessera.finetune.methods.base import METHODS, Batch, Chunk, Context, Method, gather_all, micro_steps, \
    sample_chunk
from tessera.finetune.rollout import policy_output, step_kl


@METHODS.register("ddpo")
@METHODS.register("grpo")
class PolicyGradient(Method):
    """DDPO (per-prompt running advantages, no KL) or GRPO (group advantages, KL): one loss, two configs."""

    def __init__(self, cfg, job) -> None:
        super().__init__(cfg, job)
        self.stats = PerPromptStats(cfg.buffer_size, cfg.min_count) if isinstance(cfg, DDPOConfig) else None
        r = job.rollout
        n_sde = r.sde_window[1] - r.sde_window[0] if r.sde_window else r.steps
        self.n_train = max(1, int(n_sde * cfg.timestep_fraction))
        self.per_step = micro_steps(job.rollout.batches_per_update, cfg.steps_per_update, "policy gradient")

    def trained_steps(self, policy) -> list[int]:
        """The sampler steps the loss trains on: the first ``n_train`` stochastic ones in order (flow_grpo), or with
        a random order each sample's own subset of all of them."""
        return list(policy.train_steps[:self.n_train]) if self.cfg.timestep_order == "first" else list(policy.train_steps)

    def group_size(self) -> int:
        """G copies of each prompt per update."""
        return self.cfg.group_size

    def backward_calls(self) -> int:
        """One backward per (micro-batch, trained step)."""
        return self.per_step * self.n_train

    def advantages(self, batch: Batch, rewards: np.ndarray) -> np.ndarray:
        """Advantages of every sample of the update (identical on every rank): DDPO's per prompt, GRPO's per
        prompt or, with ``rollout.group_noise``, per group (two groups of one prompt start from different x_T)."""
        if self.stats is not None:
            return self.stats.update(batch.prompts, rewards)
        labels = batch.groups if self.job.rollout.group_noise else batch.prompts
        return group_advantages(labels, rewards, self.cfg.global_std)

    def update(self, ctx: Context, batch: Batch) -> dict[str, float]:
        """Sample, score, compute advantages, train."""
        if not ctx.policy.stochastic:
            raise ValueError("policy-gradient methods need a stochastic sampler: rollout.eta / noise_level > 0")
        prompts, keys = batch.prompts[batch.local], batch.keys[batch.local]
        noise = batch.groups[batch.local] if self.job.rollout.group_noise else None
        b = self.job.rollout.batch_size
        chunks = [sample_chunk(ctx, batch.update, prompts[i:i + b], keys[i:i + b],
                               noise_keys=None if noise is None else noise[i:i + b]) for i in range(0, len(prompts), b)]
        rewards = gather_all(torch.cat([c.rewards for c in chunks]), ctx.comm_device).numpy()
        adv = torch.from_numpy(self.advantages(batch, rewards)[batch.local])
        adv = adv.clamp(-self.cfg.adv_clip_max, self.cfg.adv_clip_max).float()
        logs = {"loss": [], "ratio_dev": [], "clipfrac": [], "approx_kl": [], "kl": []}
        first_dev = None
        for epoch in range(self.cfg.inner_epochs):
            for s in range(self.cfg.steps_per_update):
                devs = []
                for c_i in range(s * self.per_step, (s + 1) * self.per_step):
                    devs += self._train_chunk(ctx, batch.update, epoch, chunks[c_i], adv[c_i * b:(c_i + 1) * b], logs)
                if first_dev is None:
                    first_dev = max(devs)
        metrics = {k: float(np.mean(v)) for k, v in logs.items() if v and k != "ratio_dev"}
        metrics.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
                       zero_std_groups=zero_std_share(batch.prompts, rewards), ratio_dev_first=float(first_dev),
                       ratio_dev_max=float(np.max(logs["ratio_dev"])), adv_abs=float(adv.abs().mean()))
        return metrics

    def _train_chunk(self, ctx: Context, update: int, epoch: int, c: Chunk, adv: torch.Tensor, logs: dict
                     ) -> list[float]:
        """The trained steps of one micro-batch, one backward each; returns each step's max |ratio - 1|."""
        cfg, pol = self.cfg, ctx.policy
        steps = torch.tensor(pol.train_steps)
        if cfg.timestep_order == "first":  # flow_grpo: the first steps, in order
            order = steps[None].expand(len(c.keys), -1)  # (B, n_sde)
        else:  # DDPO: each sample its own random order, from its own generator
            order = torch.stack([steps[torch.randperm(len(steps), generator=g)] for g in
                                 ctx.generators(update, [f"{k}/order{epoch}" for k in c.keys])])  # (B, n_sde)
        rows = torch.arange(len(c.keys))
        scale = self.job.rollout.cfg_scale if cfg.train_cfg else 1.0
        both = c.both if cfg.train_cfg else None
        devs = []
        for j in range(self.n_train):
            idx = order[:, j]
            x, x_next, old = c.latents[rows, idx], c.latents[rows, idx + 1], c.log_probs[rows, idx]
            out = policy_output(ctx.train_fn, pol, x, idx, c.cond, both, scale)
            _, logp, mean, std = pol.step(out, idx, x, prev=x_next)
            ratio = torch.exp(logp - old)  # (B,)
            a = adv.to(ratio.device)
            loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)).mean()
            if cfg.kl_beta > 0:
                with ctx.reference.model() as ref:
                    mean_ref, _ = pol.mean_std(policy_output(ctx.ref_fn(ref), pol, x, idx, c.cond, both, scale),
                                               idx, x)
                kl = step_kl(pol, mean, mean_ref, idx)  # (B,): each row at its own step
                loss = loss + cfg.kl_beta * kl.mean()
                logs["kl"].append(float(kl.mean().detach()))
            ctx.engine.backward(loss)
            ctx.engine.step()
            with torch.no_grad():
                dev = float((ratio - 1).abs().max())
                devs.append(dev)
                logs["loss"].append(float(loss))
                logs["ratio_dev"].append(dev)
                logs["clipfrac"].append(float(((ratio - 1).abs() > cfg.clip_range).float().mean()))
                logs["approx_kl"].append(float(0.5 * ((logp - old) ** 2).mean()))
        return devs

    def state_dict(self) -> dict:
        """DDPO's per-prompt reward buffers."""
        return self.stats.state_dict() if self.stats is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Restore the buffers."""
        if self.stats is not None:
            self.stats.load_state_dict(state)
