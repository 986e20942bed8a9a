"""Caption information gain: how much the model's loss depends on the caption it is given.

At fixed noise and timesteps (each sample's own generator, seeded by (seed, step, key) in a namespace of its
own), the probe computes the loss of a batch twice without gradient: with each sample's own caption, and with
the caption of another sample of the same batch (a cyclic shift: no sample keeps its own). The gain is

    caption_gain = mean(loss(shuffled caption) - loss(own caption))

It is about zero for a model that ignores the text (any caption predicts the same image), and grows as
conditioning is learned; a broken conditioning path (masking, pooling, dropout) shows as a flat zero within
minutes, long before any sample grid or FID would tell. With CFG dropout on, ``uncond_gain`` compares the own
caption with the empty prompt the sampler guides against. The values are the mean over every rank's batch
(one all-reduce, on probe steps only); every rank runs the forward, so ZeRO-3's gathered parameters work too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from tessera.trainer.diffusion.cfg_dropout import _fit_length

PROBE_SEED_OFFSET = 0x5EED  # the probe's draws never coincide with the training step's own


@dataclass(kw_only=True)
class ProbeConfig:
    """When the caption probe runs (``probe:`` in the training config)."""

    every_samples: int | None = None  # None: at every ``every_logs``-th log line; 0: off
    # The probe costs 2-3 extra forwards of the step's batch: at scale, once every few log lines is plenty.
    every_logs: int = 4

    def __post_init__(self) -> None:
        if self.every_samples is not None and self.every_samples < 0:
            raise ValueError(f"every_samples must be >= 0 or null, got {self.every_samples}")
        if self.every_logs < 1:
            raise ValueError(f"every_logs must be >= 1, got {self.every_logs}")


def probe_config(job_cfg) -> ProbeConfig:
    """The job's ``probe`` section (defaults for a job config without one)."""
    return getattr(job_cfg, "probe", None) or ProbeConfig()


def probe_every(job_cfg) -> int:
    """Samples between two probes (0: off)."""
    pc = probe_config(job_cfg)
    return job_cfg.train.log_every_samples * pc.every_logs if pc.every_samples is None else pc.every_samples


def shift_condition(cond: Any) -> Any:
    """Each sample gets the next sample's caption (hidden, mask and pooled rolled together along the batch)."""
    roll = lambda t: None if t is None else t.roll(1, dims=0)  # noqa: E731
    return dataclasses.replace(cond, hidden=roll(cond.hidden), mask=roll(cond.mask), pooled=roll(cond.pooled))


def empty_condition(cond: Any, empty: Any) -> Any:
    """The empty prompt's embedding, token-aligned with ``cond`` and broadcast to its batch."""
    n, length = cond.hidden.shape[:2]
    hidden, mask = _fit_length(empty.hidden[:1], empty.mask[:1], length)
    pooled = None if empty.pooled is None else empty.pooled[:1].expand(n, -1).to(cond.pooled.dtype)
    return dataclasses.replace(cond, hidden=hidden.expand(n, -1, -1).to(cond.hidden.dtype),
                               mask=mask.expand(n, -1).to(cond.mask.dtype), pooled=pooled)


@torch.no_grad()
def caption_gain(objective, model_fn: Callable, x0: torch.Tensor, cond: Any, generators: Callable[[], list],
                 empty: Any | None = None) -> dict[str, torch.Tensor]:
    """Per-sample losses (B,) with the own, a shifted and (given ``empty``) the empty caption, all at the same
    noise and timesteps: ``generators()`` returns identically seeded per-sample generators on every call."""
    out = {"own": objective.loss(model_fn, x0, cond, generators())[0],
           "shuffled": objective.loss(model_fn, x0, shift_condition(cond), generators())[0]}
    if empty is not None:
        out["empty"] = objective.loss(model_fn, x0, empty_condition(cond, empty), generators())[0]
    return out


def summarise(sums: torch.Tensor, has_empty: bool) -> dict[str, float]:
    """Metrics from the all-reduced [n, sum own, sum shuffled, sum empty] of a probe."""
    n, own, shuffled, empty = (float(v) for v in sums)
    n = max(n, 1.0)
    m = {"probe/loss_own": own / n, "probe/loss_shuffled": shuffled / n,
         "probe/caption_gain": (shuffled - own) / n, "probe/caption_gain_rel": (shuffled - own) / max(own, 1e-12)}
    if has_empty:
        m["probe/uncond_gain"] = (empty - own) / n
    return m


def run_probe(engine, objective, frozen, micro_batches: list[dict], cfg, step: int, dtype: torch.dtype,
              comm_dev: torch.device) -> dict[str, float]:
    """The caption probe on this step's micro-batches (every rank), averaged over all ranks (one all-reduce)."""
    from tessera.trainer.components import batch_to_inputs
    from tessera.trainer.distributed import all_reduce_sum
    from tessera.trainer.diffusion.rng import KeyedRNG

    device = next(engine.module.parameters()).device
    empty = frozen.empty() if cfg.cfg_dropout.p > 0 else None

    def model_fn(x_t, timestep, c):  # as the training step's: no autocast over the engine's own dtype
        return engine(x_t.to(dtype), timestep, c.hidden, c.mask, c.pooled).float()

    sums = torch.zeros(4, dtype=torch.float64)  # [samples, sum own, sum shuffled, sum empty]
    for batch in micro_batches:
        x0, cond, _ = batch_to_inputs(batch, frozen, device, dtype)
        keys = list(batch["key"])
        losses = caption_gain(objective, model_fn, x0, cond,
                              lambda: KeyedRNG.for_samples(cfg.train.seed + PROBE_SEED_OFFSET, step, keys, device),
                              empty)
        sums[0] += len(keys)
        for i, k in enumerate(("own", "shuffled", "empty"), start=1):
            if k in losses:
                sums[i] += losses[k].double().sum().cpu()
    return summarise(all_reduce_sum(sums.to(comm_dev)), empty is not None)
