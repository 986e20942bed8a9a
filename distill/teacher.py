"""The frozen teacher and the networks a distillation step calls: the teacher's guided output (CFG folded in, only
inside the guidance interval, the empty prompt as the unconditional, as ``tessera sample`` guides), and one call
convention for the student (through DeepSpeed), the teacher and the target network."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from tessera.trainer.diffusion.guidance import cat_cond, guidance_on
from tessera.trainer.diffusion.process import Process


def call_net(module, dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]:
    """``fn(x, timestep, cond) -> raw output (float32)`` of a network (plain module or DeepSpeed engine) under the
    run's autocast dtype, as the training step calls it."""
    def fn(x: torch.Tensor, timestep: torch.Tensor, c) -> torch.Tensor:
        device = x.device
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return module(x.to(dtype), timestep.to(device), c.hidden, c.mask, c.pooled).float()
    return fn


@dataclass
class Guidance:
    """The guidance folded into the student: scale, interval (noise levels, None: every step)."""

    cfg_scale: float
    interval: list[float] | None

    def mask(self, process: Process, t: torch.Tensor) -> torch.Tensor:
        """(B,) bool: which samples are guided at times ``t``."""
        return torch.tensor([self.cfg_scale != 1.0 and guidance_on(self.interval, process.level(float(ti)))
                             for ti in t.tolist()])


class Teacher:
    """The teacher's guided prediction. ``source.model()`` is a context yielding the network (a frozen copy, or the
    LoRA student with its adapters off: ``finetune.policy.Reference``)."""

    def __init__(self, source, process: Process, guidance: Guidance, uncond_of: Callable, dtype: torch.dtype) -> None:
        self.source, self.process, self.guidance = source, process, guidance
        self.uncond_of, self.dtype = uncond_of, dtype  # uncond_of(cond) -> the empty-prompt condition, aligned

    @torch.no_grad()
    def output(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """Raw output at ``x`` (B, C, H, W) and times ``t`` (B,): out_u + w (out_c - out_u) for the guided samples,
        out_c for the others (one batched forward over [cond; uncond] when any sample is guided)."""
        ts = self.process.model_timestep(t).to(x.device)
        on = self.guidance.mask(self.process, t).to(x.device)
        with self.source.model() as net:
            fn = call_net(net, self.dtype)
            if not bool(on.any()):
                return fn(x, ts, cond)
            out = fn(torch.cat([x, x]), torch.cat([ts, ts]), cat_cond(cond, self.uncond_of(cond)))
        out_c, out_u = out.chunk(2)
        guided = out_u + self.guidance.cfg_scale * (out_c - out_u)
        return torch.where(on.view(-1, *([1] * (x.ndim - 1))), guided, out_c)

    @torch.no_grad()
    def ddim(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond) -> torch.Tensor:
        """One deterministic guided DDIM step (a flow model's Euler step) from times ``t`` to ``s``."""
        x0, eps = self.process.x0_eps(self.output(x, t, cond), x, t)
        return self.process.ddim(x0, eps, s)


class FrozenNet:
    """A frozen network as a ``Reference``-like source (the target network, a progressive round's teacher)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module.requires_grad_(False).eval()

    @contextlib.contextmanager
    def model(self):
        """The frozen network, without gradients."""
        with torch.no_grad():
            yield self.module

    @torch.no_grad()
    def load(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy full weights (by parameter name) into the network."""
        params = dict(self.module.named_parameters())
        for name, t in weights.items():
            params[name].copy_(t.to(params[name].device, params[name].dtype))
