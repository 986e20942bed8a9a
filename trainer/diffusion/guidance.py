"""Classifier-free guidance (Ho & Salimans 2022): one batched forward over [cond; uncond], then extrapolate.

``guidance_interval`` limits it to a band of noise levels (Kynkäänniemi et al. 2024, "Applying Guidance in a
Limited Interval Improves Sample and Distribution Quality in Diffusion Models"); outside it a step is plain
conditional, at half the cost.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch


def cat_cond(cond: Any, uncond: Any) -> Any:
    """Concatenate two conditions of the same structure (tensor, dict, list/tuple, dataclass, None) on dim 0.

    An unconditional tensor with batch 1 is broadcast to the conditional batch (one empty prompt for all).
    """
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        if uncond.shape[0] == 1 and cond.shape[0] > 1:
            uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
        return torch.cat([cond, uncond.to(cond.device, cond.dtype)])
    if isinstance(cond, dict):
        if cond.keys() != uncond.keys():
            raise ValueError(f"cond and uncond keys differ: {sorted(cond)} vs {sorted(uncond)}")
        return {k: cat_cond(cond[k], uncond[k]) for k in cond}
    if dataclasses.is_dataclass(cond) and not isinstance(cond, type):  # e.g. TextEmbedding(hidden, mask, pooled)
        fields = {f.name: cat_cond(getattr(cond, f.name), getattr(uncond, f.name)) for f in dataclasses.fields(cond)}
        return dataclasses.replace(cond, **fields)
    if isinstance(cond, (list, tuple)):
        return type(cond)(cat_cond(c, u) for c, u in zip(cond, uncond, strict=True))
    if cond != uncond:
        raise ValueError(f"cannot batch non-tensor condition values {cond!r} and {uncond!r}")
    return cond


def guided_output(
    model_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    x: torch.Tensor,
    timestep: torch.Tensor,
    cond: Any,
    uncond_batched: Any | None,
    cfg_scale: float,
) -> torch.Tensor:
    """out_u + s * (out_c - out_u); ``uncond_batched`` is ``cat_cond(cond, uncond)`` or None for no guidance.

    Guidance is applied to the raw network output; every parameterization here is affine in it with
    the same coefficients for both halves, so this equals guiding x0_hat or the velocity.
    """
    if uncond_batched is None:
        return model_fn(x, timestep, cond).float()
    out = model_fn(torch.cat([x, x]), torch.cat([timestep, timestep]), uncond_batched).float()
    out_c, out_u = out.chunk(2)
    return out_u + cfg_scale * (out_c - out_u)


def guidance_on(interval: Sequence[float] | None, level: float) -> bool:
    """Whether CFG applies at noise ``level`` (a sampler's ``noise_level``: 0 clean .. 1 pure noise).

    ``interval`` is [lo, hi], both ends included; None guides every step.
    """
    return interval is None or interval[0] <= level <= interval[1]


def check_interval(interval: Sequence[float] | None) -> None:
    """Raise ValueError unless ``interval`` is None or [lo, hi] with 0 <= lo < hi <= 1."""
    if interval is None:
        return
    if len(interval) != 2 or not 0.0 <= interval[0] < interval[1] <= 1.0:
        raise ValueError(f"guidance_interval must be [lo, hi] with 0 <= lo < hi <= 1, got {list(interval)}")
