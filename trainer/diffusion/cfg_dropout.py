"""Condition dropout for classifier-free guidance (Ho & Salimans 2022).

With probability ``p`` a sample's text condition is replaced by the unconditional one, so the same
network learns both p(x|c) and p(x); the sampler then extrapolates between them.

* ``mode="empty"``: the encoder's embedding of the empty prompt (and its mask), as SD/PixArt do, so the
  unconditional input at sampling time is exactly what was seen in training.
* ``mode="zeros"``: zero hidden states (and pooled vector). The mask then keeps only the first token:
  an all-masked row would make attention softmax over nothing (NaN), and one zero token is a fixed,
  content-free key/value.

The trainer calls ``drop_condition(cfg, cond, empty, generator) -> (cond, n_dropped)`` on an embedding
object with ``hidden``/``mask``/``pooled`` (the text encoders' ``TextEmbedding``); ``drop_tensors`` is
the same on bare tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from tessera.trainer.diffusion import rng


@dataclass(kw_only=True)
class CFGDropoutConfig:
    """How often and with what the text condition is dropped during training."""

    p: float = 0.1
    mode: Literal["empty", "zeros"] = "empty"

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {self.p}")


class DroppedCond(NamedTuple):
    """The condition after dropout, plus which samples were dropped (for logging)."""

    hidden: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L), 1 = real token
    pooled: torch.Tensor | None  # (B, P) or None
    dropped: torch.Tensor  # (B,) bool
    n_dropped: torch.Tensor  # () int64, on the batch's device: counted without a host sync


def _as_batch(t: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """Accept the unconditional tensor with or without a leading batch dim of 1; check it matches."""
    t = t[0] if t.dim() == like.dim() else t
    if t.shape != like.shape[1:]:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(like.shape[1:])} (same max length)")
    return t.to(device=like.device, dtype=like.dtype)


def drop_tensors(
    cfg: CFGDropoutConfig,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    *,
    pooled: torch.Tensor | None = None,
    empty_hidden: torch.Tensor | None = None,
    empty_mask: torch.Tensor | None = None,
    empty_pooled: torch.Tensor | None = None,
    generator: rng.Gen = None,
) -> DroppedCond:
    """Replace each sample's condition by the unconditional one with probability ``cfg.p``."""
    b = hidden.shape[0]
    drop = rng.rand(b, generator, hidden.device, torch.float32) < cfg.p  # (B,)
    if cfg.mode == "empty":
        if empty_hidden is None or empty_mask is None:
            raise ValueError("mode='empty' needs empty_hidden and empty_mask (the empty prompt's encoding)")
        u_hidden, u_mask = _as_batch(empty_hidden, hidden, "empty_hidden"), _as_batch(empty_mask, mask, "empty_mask")
        if pooled is not None and empty_pooled is None:
            raise ValueError("mode='empty' with a pooled embedding needs empty_pooled")
        u_pooled = None if pooled is None else _as_batch(empty_pooled, pooled, "empty_pooled")  # type: ignore[arg-type]
    else:
        u_hidden = hidden.new_zeros(hidden.shape[1:])
        u_mask = mask.new_zeros(mask.shape[1:])
        u_mask[0] = 1
        u_pooled = None if pooled is None else pooled.new_zeros(pooled.shape[1:])
    hidden = torch.where(drop[:, None, None], u_hidden, hidden)
    mask = torch.where(drop[:, None], u_mask, mask)
    if pooled is not None:
        pooled = torch.where(drop[:, None], u_pooled, pooled)
    return DroppedCond(hidden, mask, pooled, drop, drop.sum())


def _fit_length(hidden: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (mask 0) or cut the empty prompt's (1, L', D) / (1, L') to L tokens; never cut a real token."""
    n = hidden.shape[1]
    if n < length:
        hidden = torch.nn.functional.pad(hidden, (0, 0, 0, length - n))
        return hidden, torch.nn.functional.pad(mask, (0, length - n), value=0)
    if n > length and bool(mask[:, length:].any()):  # once per length: drop_condition caches the result
        raise ValueError(f"the empty prompt has real tokens beyond the batch's {length} tokens")
    return hidden[:, :length], mask[:, :length]


def drop_condition(
    cfg: CFGDropoutConfig, cond: Any, empty: Any | None, generator: rng.Gen = None
) -> tuple[Any, torch.Tensor | int]:
    """Dropout on an embedding object (``hidden``, ``mask``, ``pooled``); returns the new one and the count (a
    device tensor: reading it is left to the caller's logging step)."""
    if cfg.p == 0.0:
        return cond, 0
    kw: dict[str, Any] = {"pooled": cond.pooled, "generator": generator}
    if cfg.mode == "empty":
        if empty is None:
            raise ValueError("cfg_dropout.mode='empty' needs the empty prompt's embedding")
        # length -> (hidden, mask), checked and cut once per embedding object (the check reads the mask on the host)
        fitted = vars(empty).setdefault("_fitted", {}) if hasattr(empty, "__dict__") else {}
        length = cond.hidden.shape[1]
        if length not in fitted:
            fitted[length] = _fit_length(empty.hidden[:1], empty.mask[:1], length)
        kw["empty_hidden"], kw["empty_mask"] = fitted[length]
        kw["empty_pooled"] = None if empty.pooled is None else empty.pooled[:1]
    out = drop_tensors(cfg, cond.hidden, cond.mask, **kw)
    if dataclasses.is_dataclass(cond):
        new = dataclasses.replace(cond, hidden=out.hidden, mask=out.mask, pooled=out.pooled)
    else:
        new = type(cond)(out.hidden, out.mask, out.pooled)
    return new, out.n_dropped
