"""Control branches (trainer/models/control.py) on tiny DiT, MMDiT and UNet bases: a fresh branch is the base model
exactly; a trained one changes the output, scaled by ``control_scale`` (0: the base); only the branch trains; a
branch paired with other base weights is refused."""

from __future__ import annotations

import pytest
import torch

from tests.trainer.models.conftest import FAMILIES, make_inputs, make_model, perturb
from tessera.trainer.models.control import ControlBaseMismatch, ControlConfig, build_controlled


def control_input(model, x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A seeded condition in the branch's input space: a latent like ``x``, or an image at the UNet's pixel size."""
    g = torch.Generator().manual_seed(seed)
    if model.input_space == "pixel":
        f = model.pixel_factor
        return torch.rand(x.shape[0], 3, x.shape[-2] * f, x.shape[-1] * f, generator=g)
    return torch.randn(x.shape, generator=g)


def controlled(family: str, blocks: int | None = 1):
    """(base, controlled model) for a tiny perturbed base; the base's fingerprint pinned."""
    base = make_model(family)
    m = build_controlled(base, ControlConfig(condition="canny", blocks=blocks))
    m.pin_base("the test base")
    return base, m


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_branch_is_the_base_and_trained_branch_is_scaled(family):
    base, m = controlled(family)
    inp = make_inputs(family)
    ctl = control_input(m, inp["x"])
    with torch.no_grad():
        ref = base(**inp)
        assert torch.equal(m(**inp), ref)  # no control: the base's own forward, bit for bit
        assert torch.allclose(m(**inp, control=ctl), ref, atol=1e-6)  # zero-initialised outputs
        perturb(m.control, seed=3)  # a "trained" branch: its zero projections are live now
        out1 = m(**inp, control=ctl, control_scale=1.0)
        out0 = m(**inp, control=ctl, control_scale=0.0)
        half = m(**inp, control=ctl, control_scale=0.5)
    assert not torch.allclose(out1, ref, atol=1e-4)
    assert torch.equal(out0, ref)
    assert not torch.allclose(half, out1, atol=1e-5) and not torch.allclose(half, ref, atol=1e-5)
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"control"} and not any(p.requires_grad for p in m.base.parameters())


@pytest.mark.parametrize("family", ["dit", "mmdit"])
def test_gradients_reach_only_the_branch(family):
    _, m = controlled(family)
    inp = make_inputs(family)
    m(**inp, control=control_input(m, inp["x"])).square().mean().backward()
    assert all(p.grad is None for p in m.base.parameters())
    zero_out = m.control.after_proj if family == "dit" else m.control.controlnet_blocks
    assert all(lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0 for lin in zero_out)


def test_wrong_base_is_refused():
    _, m = controlled("dit")
    saved = m.base_fingerprint.clone()
    _, other = controlled("dit")
    other.check_base(saved, "x")  # the same seeded base: accepted
    with torch.no_grad():
        next(other.base.parameters()).add_(1.0)
    other.pin_base("the changed base")
    with pytest.raises(ControlBaseMismatch, match="trained on a base model with weights fingerprint .* the changed"):
        other.check_base(saved, "the branch")


def test_blocks_bounded_by_depth():
    with pytest.raises(ValueError, match="takes at most"):
        build_controlled(make_model("dit"), ControlConfig(condition="canny", blocks=99))


def test_config_needs_a_base_and_adds_the_condition_to_the_loader():
    from tessera.config import load_config
    from tessera.trainer.config import TrainJobConfig
    from tests.trainer.helpers import TINY_CONFIG

    with pytest.raises(Exception, match="set model.init_from to the base"):
        load_config(TrainJobConfig, TINY_CONFIG, ["model.control={condition: canny}"])
    cfg = load_config(TrainJobConfig, TINY_CONFIG, ["model.init_from=x", "model.control={condition: canny}"])
    assert cfg.data.conditions == ["canny"]
    with pytest.raises(Exception, match="samples.control_images needs one image per samples.prompts entry"):
        load_config(TrainJobConfig, TINY_CONFIG, ["model.init_from=x", "model.control={condition: canny}",
                                                  "samples.enabled=true"])
