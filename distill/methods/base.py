"""What every distillation method shares: the run's context (student engine, teacher, processes, encoders) and the
``Method`` contract.

The loop calls ``method.loss(ctx, batch, step)`` for each micro-batch (per-sample losses, with gradients to the
student), then ``method.after_step(ctx, st)`` once per optimizer step on every rank (a progressive round ends, a
reflow phase changes). Every random draw of a step comes from a generator of its own sample, seeded by (seed,
step, sample key), so a resumed run replays the uninterrupted one. ``student_sampler()`` is what the student's
checkpoints sample with; ``state_dict`` rides in each checkpoint's per-rank ``loader`` record.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from tessera.registry import Registry
from tessera.trainer.diffusion.objectives import ObjectiveConfig
from tessera.trainer.diffusion.process import Process
from tessera.trainer.diffusion.sampling import SamplerConfig

from tessera.distill.teacher import Teacher

METHODS: Registry[type] = Registry("distillation method")
ALTERNATIVES = {"progressive": "ddpm (eps, v, x0) and flow", "lcm": "ddpm (eps, v, x0) and flow", "reflow": "flow"}


class ObjectiveMismatch(ValueError):
    """The teacher's objective does not fit the method; the message names the methods that do fit."""


def check_fits(method: str, objective: ObjectiveConfig, source: str) -> None:
    """Raise ``ObjectiveMismatch`` unless ``method`` can distil a model trained with ``objective``."""
    fits = [m for m, objs in ALTERNATIVES.items() if objective.name in objs]
    if objective.name not in ALTERNATIVES[method]:
        others = ", ".join(fits) if fits else "none of progressive, lcm, reflow"
        raise ObjectiveMismatch(f"{source}: method {method!r} distils {ALTERNATIVES[method]} models, but the teacher "
                                f"was trained with the {objective.name!r} objective; methods that fit it: {others}")


@dataclass
class Context:
    """What a method's step needs, built once by the loop."""

    cfg: Any  # DistillJobConfig
    engine: Any  # the student under DeepSpeed
    student: Callable  # fn(x, timestep, cond) -> raw output, with gradients
    teacher: Teacher
    process: Process  # the teacher's objective
    student_process: Process  # the student's (a progressive eps teacher's student predicts v)
    frags: list
    ema: Any  # ShardedEMA or None
    uncond_of: Callable  # cond -> the empty-prompt condition, aligned
    frozen: Any  # trainer.components.Frozen: the teacher's encoders (a batch without caches is encoded)
    dtype: torch.dtype
    device: torch.device
    seed: int
    target: Any = None  # the EMA target network (teacher.FrozenNet): lcm, and LoRA runs with an EMA
    counters: dict = field(default_factory=dict)


def loader_config(data, teacher_data):
    """The teacher's loader section with the distillation's data settings on it."""
    over = {"batch_size": data.batch_size, "num_workers": data.num_workers, "shuffle_buffer": data.shuffle_buffer,
            "seed": data.seed}
    if data.path is not None:
        over["path"] = list(data.path)
    if data.caption_variants is not None:
        over["caption_variants"] = dict(data.caption_variants)
    return dataclasses.replace(teacher_data, **over)


def inputs(ctx: Context, batch: dict, step: int):
    """(x0 (B, C, h, w), text condition, per-sample generators) of a loader batch."""
    from tessera.trainer.components import batch_to_inputs
    from tessera.trainer.engine import sample_generators

    x0, cond, counts = batch_to_inputs(batch, ctx.frozen, ctx.device, ctx.dtype)
    for k, v in counts.items():
        ctx.counters[k] = ctx.counters.get(k, 0) + v
    return x0, cond, sample_generators(ctx.seed, step, list(batch["key"]))


class Method:
    """One distillation method (subclasses register in ``METHODS``)."""

    name = ""

    def __init__(self, section, job, teacher_job) -> None:
        self.section, self.job, self.teacher_job = section, job, teacher_job

    def student_objective(self) -> ObjectiveConfig:
        """The objective the student's outputs are read with (the teacher's, unless the method changes it)."""
        return self.teacher_job.objective

    def student_sampler(self) -> SamplerConfig:
        """What the student's checkpoints sample with: its own sampler, guidance folded in (cfg 1)."""
        raise NotImplementedError

    def data(self, ctx: Context, rank: int, world: int, run) -> Any:
        """This rank's batches (``state_dict``/``load_rank_states`` resume them): the teacher's training data."""
        from tessera.trainer.components import precomputed_ids
        from tessera.trainer.data import build_loader

        cfg = loader_config(self.job.data, self.teacher_job.data)
        return build_loader(cfg, rank=rank, world_size=world, **precomputed_ids(cfg, self.teacher_job.text_encoder,
                                                                                 self.teacher_job.autoencoder))

    def loss(self, ctx: Context, batch: dict, step: int) -> torch.Tensor:
        """(B,) per-sample losses of this rank's micro-batch, with gradients to the student."""
        raise NotImplementedError

    def after_step(self, ctx: Context, samples: int) -> dict:
        """After each optimizer step on every rank (``samples``: consumed so far); returns metrics to log."""
        return {}

    def setup(self, ctx: Context) -> None:
        """Once, after the loop has built the context (before any resume)."""

    def files(self) -> dict[str, Any]:
        """Extra files of a checkpoint, written by rank 0 (name -> tensors or text)."""
        return {}

    def restore(self, ctx: Context, url: str) -> None:
        """After a resume from checkpoint ``url`` and ``load_state_dict``: rebuild what the state implies."""

    def state_dict(self) -> dict:
        """JSON-ready state, identical on every rank."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict``."""
