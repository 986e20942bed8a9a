"""What every method shares: the run's context (engine, policy sampler, reward, encoders), the ``Method`` contract,
and drawing one micro-batch of trajectories with their rewards.

A method's ``update(ctx, batch)`` samples (no grad), scores, and calls ``engine.backward``/``engine.step``
exactly ``backward_calls()`` times per optimizer step on every rank (DeepSpeed's accumulation boundary), then
returns its metrics. Every random draw of an update comes from a generator of its own sample, seeded by
(seed, update, sample key), so a resumed run, another world size or another micro-batching draws the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from tessera.registry import Registry
from tessera.trainer.diffusion.guidance import cat_cond
from tessera.trainer.distributed import world_size
from tessera.trainer.engine import sample_generators
from tessera.trainer.inference import uncond_like

from tessera.finetune.policy import Reference
from tessera.finetune.rollout import GaussianPolicy, initial_noise, sample_trajectories

METHODS: Registry[type] = Registry("fine-tuning method")


@dataclass
class Batch:
    """One update's prompts: the global list (every rank) and this rank's slice."""

    update: int
    prompts: list[str]  # global, rank-major
    keys: list[str]  # one per global sample: seeds its generators
    rank: int
    per_rank: int
    groups: list[str] = field(default_factory=list)  # one per global sample: its group (a prompt's G copies)

    @property
    def local(self) -> slice:
        """This rank's rows of the global lists."""
        return slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)


@dataclass
class Context:
    """Everything a method needs, built once by the loop."""

    cfg: Any  # FinetuneJobConfig
    engine: Any
    train_fn: Callable  # model_fn through the DeepSpeed engine (with grad)
    sample_fn: Callable  # model_fn of the engine's module (for no-grad sampling)
    reference: Reference
    ref_fn: Callable[[Any], Callable]  # ref_fn(module) -> model_fn
    policy: GaussianPolicy  # the stochastic rollout sampler
    ode: GaussianPolicy  # the same steps with no noise (reward backprop)
    text_encoder: Any
    autoencoder: Any
    objective: Any  # built objective (DPO's denoising loss)
    reward: Any  # WeightedReward
    latent_shape: tuple[int, int, int]
    device: torch.device
    comm_device: torch.device
    seed: int
    counters: dict = field(default_factory=dict)

    def condition(self, prompts: list[str], cfg_scale: float):
        """(cond, cond + empty prompt batched for guidance or None)."""
        cond = self.text_encoder.encode(list(prompts)).to(self.device)
        both = cat_cond(cond, uncond_like(self.text_encoder, cond, self.device)) if cfg_scale != 1.0 else None
        return cond, both

    def generators(self, update: int, keys: list[str]) -> list[torch.Generator]:
        """One generator per sample key of this update."""
        return sample_generators(self.seed, update, list(keys))

    def count(self, name: str, n: int = 1) -> None:
        """Count an event (ties, skipped prompts, ...); logged with the metrics."""
        self.counters[name] = self.counters.get(name, 0) + n


@dataclass
class Chunk:
    """One micro-batch of sampled trajectories."""

    prompts: list[str]
    keys: list[str]
    cond: Any
    both: Any
    latents: torch.Tensor  # (B, n + 1, C, h, w)
    log_probs: torch.Tensor | None  # (B, n)
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    rewards: torch.Tensor | None = None  # (B,) float64


def sample_chunk(ctx: Context, update: int, prompts: list[str], keys: list[str], policy: GaussianPolicy | None = None,
                 noise_keys: list[str] | None = None) -> Chunk:
    """Sample one micro-batch with the (stochastic) policy and score it; ``noise_keys`` seed x_T (rows with one
    key start alike), else each sample's own generator draws it."""
    scale = ctx.cfg.rollout.cfg_scale
    cond, both = ctx.condition(prompts, scale)
    x_t = None if noise_keys is None else initial_noise(ctx.generators(update, [f"{k}/x_T" for k in noise_keys]),
                                                        ctx.latent_shape, ctx.device)
    lat, logp = sample_trajectories(ctx.sample_fn, policy or ctx.policy, cond, both, scale,
                                    ctx.generators(update, keys), ctx.latent_shape, ctx.device, x_t=x_t)
    images = ctx.autoencoder.decode(lat[:, -1])
    return Chunk(list(prompts), list(keys), cond, both, lat, logp, images, ctx.reward(images, list(prompts)))


def gather_all(local: torch.Tensor, comm_device: torch.device) -> torch.Tensor:
    """Concatenate every rank's equally long 1-D tensor, in rank order (float64, on the CPU)."""
    t = local.detach().to(comm_device, torch.float64)
    if world_size() == 1:
        return t.cpu()
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts).cpu()


class Method:
    """A fine-tuning method: ``backward_calls`` per optimizer step, ``update`` per round, resumable state."""

    def __init__(self, cfg, job) -> None:
        self.cfg, self.job = cfg, job

    def per_rank(self) -> int:
        """Samples (or pairs) each rank draws per update."""
        return self.job.rollout.batch_size * self.job.rollout.batches_per_update

    def group_size(self) -> int:
        """Copies of each prompt in an update."""
        return 1

    def backward_calls(self) -> int:
        """``engine.backward`` calls per optimizer step (DeepSpeed's gradient_accumulation_steps)."""
        raise NotImplementedError

    def update(self, ctx: Context, batch: Batch) -> dict[str, float]:
        """Sample, score and train one round; returns metrics."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What a resumed run needs besides weights and optimizer (JSON-ready)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``."""


def micro_steps(n_chunks: int, steps: int, what: str) -> int:
    """Micro-batches per optimizer step; they must split evenly."""
    if n_chunks % steps:
        raise ValueError(f"{what}: rollout.batches_per_update ({n_chunks}) must be a multiple of steps_per_update "
                         f"({steps})")
    return n_chunks // steps
