"""The contract every denoiser family meets, at tiny size (diffusers-style shared model tests)."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint

from tessera.trainer.models import load_pretrained, model_flops, save_pretrained

from .conftest import VALID, make_inputs, make_model


@pytest.mark.parametrize("hw", [(8, 8), (8, 16), (16, 8)])
def test_output_shape_any_aspect(family, hw):
    model = make_model(family)
    inp = make_inputs(family, *hw)
    with torch.no_grad():
        out = model(**inp)
    assert out.shape == inp["x"].shape
    assert torch.isfinite(out).all()


def test_deterministic(family):
    a, b = make_model(family, seed=3), make_model(family, seed=3)
    for (ka, pa), (kb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(pa, pb), ka
    inp = make_inputs(family, seed=1)
    with torch.no_grad():
        out_a, out_b, out_a2 = a(**inp), b(**inp), a(**inp)
    assert torch.equal(out_a, out_b)
    assert torch.equal(out_a, out_a2)


def test_save_load_round_trip(family, tmp_path):
    model = make_model(family)
    save_pretrained(model, tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "model.safetensors"]  # weights as safetensors, no pickles
    loaded = load_pretrained(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    inp = make_inputs(family)
    with torch.no_grad():
        assert torch.equal(model(**inp), loaded(**inp))


def _grads(model, inp) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**inp).square().mean().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_gives_equal_grads(family, monkeypatch):
    model = make_model(family).train()
    inp = make_inputs(family, 8, 16)
    ref = _grads(model, inp)
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.set_gradient_checkpointing(True)
    got = _grads(model, inp)
    assert calls, "activation checkpointing was not used"
    assert ref.keys() == got.keys() and len(ref) == len(list(model.parameters()))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)


def test_padding_mask_masks(family):
    model = make_model(family)
    inp = make_inputs(family)
    changed = dict(inp, text=inp["text"].clone())
    for i, n in enumerate(VALID):
        changed["text"][i, n:] = torch.randn_like(changed["text"][i, n:]) * 10  # only padded tokens change
    with torch.no_grad():
        a, b, c = model(**inp), model(**changed), model(**dict(inp, text_mask=None))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-4)  # without the mask the padding does matter


def test_all_padding_row_is_finite(family):
    model = make_model(family)
    inp = make_inputs(family)
    inp["text_mask"][0] = 0
    with torch.no_grad():
        out = model(**inp)
    assert torch.isfinite(out).all()
    model.zero_grad()
    model(**inp).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_flops_sanity(family):
    model = make_model(family)
    small, wide, long_text = model_flops(model, 8, 8, 8), model_flops(model, 8, 16, 8), model_flops(model, 8, 8, 16)
    assert 0 < small < wide and small < long_text
    assert wide < 2.5 * small  # roughly linear in tokens at this size (attention is a small share)
