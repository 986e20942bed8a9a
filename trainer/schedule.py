"""What happens when, as pure functions of samples seen (EDM counts progress in images, not steps).

A learning rate or a cadence that is a function of samples alone survives a resume, a change of batch
size and a change of world size with nothing to save: the resumed run recomputes the same value. That is
why the loop sets the lr itself before every optimizer step instead of using DeepSpeed's schedulers, whose
state lives in the optimizer's param groups and was restored one step late after a resume.
"""

from __future__ import annotations

import math

from tessera.trainer.ds_config import OptimConfig


def lr_at(optim: OptimConfig, samples: int, total_samples: int) -> float:
    """The learning rate of the optimizer step that brings the run to ``samples`` samples seen.

    Linear warmup over ``warmup_samples``; then ``constant``; ``cosine`` to ``min_lr_ratio * lr`` at
    ``total_samples``; or ``wsd`` (warmup-stable-decay: the peak until ``decay_start_samples``, then linear to
    ``min_lr_ratio * lr`` over ``decay_samples``).
    """
    if optim.warmup_samples and samples < optim.warmup_samples:
        return optim.lr * samples / optim.warmup_samples
    floor = optim.lr * optim.min_lr_ratio
    if optim.schedule == "cosine":
        span = max(1, total_samples - optim.warmup_samples)
        frac = min(1.0, max(0.0, (samples - optim.warmup_samples) / span))
        return floor + (optim.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if optim.schedule == "wsd" and optim.decay_start_samples is not None and samples > optim.decay_start_samples:
        frac = min(1.0, (samples - optim.decay_start_samples) / max(1, optim.decay_samples))
        return optim.lr - frac * (optim.lr - floor)
    return optim.lr


def crossed(samples: int, step_samples: int, every: int) -> bool:
    """True when the step that took the run from ``samples - step_samples`` to ``samples`` crossed a multiple of
    ``every`` (0 or None: never)."""
    return bool(every) and samples // every != (samples - step_samples) // every
