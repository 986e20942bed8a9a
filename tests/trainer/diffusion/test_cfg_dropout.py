"""Condition dropout for classifier-free guidance: rate, determinism, replacement content, masks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tessera.trainer.diffusion.cfg_dropout import CFGDropoutConfig, drop_condition, drop_tensors


def _batch(b=8, length=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, length, d, generator=g)
    mask = torch.zeros(b, length, dtype=torch.long)
    for i in range(b):
        mask[i, : 1 + i % length] = 1
    pooled = torch.randn(b, 3, generator=g)
    empty_hidden, empty_mask = torch.randn(length, d, generator=g), torch.tensor([1, 1, 0, 0, 0, 0])
    return hidden, mask, pooled, empty_hidden, empty_mask, torch.randn(3, generator=g)


def test_rate_and_count():
    hidden, mask, *_ = _batch(b=20_000, length=2, d=1)
    cfg = CFGDropoutConfig(p=0.3, mode="zeros")
    out = drop_tensors(cfg, hidden, mask, generator=torch.Generator().manual_seed(0))
    assert out.n_dropped == int(out.dropped.sum())
    assert abs(out.n_dropped / 20_000 - 0.3) < 0.015
    none = drop_tensors(CFGDropoutConfig(p=0.0, mode="zeros"), hidden, mask)
    assert none.n_dropped == 0 and torch.equal(none.hidden, hidden)
    every = drop_tensors(CFGDropoutConfig(p=1.0, mode="zeros"), hidden, mask)
    assert every.n_dropped == 20_000


def test_deterministic_given_generator():
    hidden, mask, pooled, eh, em, ep = _batch(b=64)
    cfg = CFGDropoutConfig(p=0.5, mode="empty")
    kw = dict(pooled=pooled, empty_hidden=eh, empty_mask=em, empty_pooled=ep)
    a = drop_tensors(cfg, hidden, mask, generator=torch.Generator().manual_seed(5), **kw)
    b = drop_tensors(cfg, hidden, mask, generator=torch.Generator().manual_seed(5), **kw)
    c = drop_tensors(cfg, hidden, mask, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a.dropped, b.dropped) and torch.equal(a.hidden, b.hidden)
    assert not torch.equal(a.dropped, c.dropped)


def test_empty_mode_replaces_hidden_mask_and_pooled():
    hidden, mask, pooled, eh, em, ep = _batch(b=64)
    out = drop_tensors(CFGDropoutConfig(p=0.5, mode="empty"), hidden, mask, pooled=pooled,
                         empty_hidden=eh[None], empty_mask=em, empty_pooled=ep,
                         generator=torch.Generator().manual_seed(1))
    d = out.dropped
    assert 0 < out.n_dropped < 64
    assert torch.equal(out.hidden[d], eh.expand(int(d.sum()), -1, -1))
    assert torch.equal(out.mask[d], em.expand(int(d.sum()), -1))
    assert torch.equal(out.pooled[d], ep.expand(int(d.sum()), -1))
    assert torch.equal(out.hidden[~d], hidden[~d]) and torch.equal(out.mask[~d], mask[~d])
    assert torch.equal(out.pooled[~d], pooled[~d])


def test_zeros_mode_keeps_one_token_attended():
    hidden, mask, pooled, *_ = _batch(b=64)
    out = drop_tensors(CFGDropoutConfig(p=0.5, mode="zeros"), hidden, mask, pooled=pooled,
                         generator=torch.Generator().manual_seed(2))
    d = out.dropped
    assert torch.all(out.hidden[d] == 0) and torch.all(out.pooled[d] == 0)
    assert torch.all(out.mask[d].sum(1) == 1) and torch.all(out.mask[d][:, 0] == 1)
    assert torch.equal(out.hidden[~d], hidden[~d])


def test_bad_inputs_raise():
    hidden, mask, pooled, eh, em, ep = _batch()
    with pytest.raises(ValueError, match="empty_hidden"):
        drop_tensors(CFGDropoutConfig(mode="empty"), hidden, mask)
    with pytest.raises(ValueError, match="same max length"):
        drop_tensors(CFGDropoutConfig(mode="empty"), hidden, mask, empty_hidden=eh[:3], empty_mask=em[:3])
    with pytest.raises(ValueError, match="empty_pooled"):
        drop_tensors(CFGDropoutConfig(mode="empty"), hidden, mask, pooled=pooled, empty_hidden=eh, empty_mask=em)
    with pytest.raises(ValueError):
        CFGDropoutConfig(p=1.5)


@dataclass
class Emb:
    """Stand-in for the text encoders' TextEmbedding (same fields)."""

    hidden: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None = None


def test_drop_condition_on_embedding_objects():
    hidden, mask, pooled, eh, em, ep = _batch(b=32)
    cond = Emb(hidden, mask.bool(), pooled)
    short = Emb(eh[None, :2], em[None, :2].bool(), ep[None])  # a 'longest'-padded empty prompt: 2 tokens
    cfg = CFGDropoutConfig(p=0.5, mode="empty")
    out, n = drop_condition(cfg, cond, short, torch.Generator().manual_seed(0))
    again, _ = drop_condition(cfg, cond, short, torch.Generator().manual_seed(0))
    assert isinstance(out, Emb) and 0 < n < 32 and torch.equal(out.hidden, again.hidden)
    d = (out.hidden != hidden).flatten(1).any(1)
    assert int(d.sum()) == n
    assert torch.equal(out.hidden[d][:, :2], eh[:2].expand(n, -1, -1)) and torch.all(out.hidden[d][:, 2:] == 0)
    assert torch.equal(out.mask[d], torch.tensor([True, True, False, False, False, False]).expand(n, -1))
    assert out.mask.dtype == torch.bool and torch.equal(out.pooled[d], ep.expand(n, -1))
    same, zero = drop_condition(CFGDropoutConfig(p=0.0), cond, None, torch.Generator().manual_seed(0))
    assert same is cond and zero == 0
    z, nz = drop_condition(CFGDropoutConfig(p=1.0, mode="zeros"), cond, None)
    assert nz == 32 and torch.all(z.hidden == 0) and torch.all(z.mask.sum(1) == 1)
    with pytest.raises(ValueError, match="empty prompt"):
        drop_condition(cfg, cond, None)
    with pytest.raises(ValueError, match="real tokens beyond"):
        drop_condition(cfg, Emb(hidden[:, :1], mask[:, :1].bool(), pooled), short)
