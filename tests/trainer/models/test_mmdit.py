"""MMDiT specifics: FLOPs against a measured count, presets, pooled conditioning."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tessera.trainer.models import MMDiT, MMDiTConfig, build_model
from tessera.trainer.models.mmdit import MMDIT_PRESETS, flops_per_sample

from .conftest import make_inputs, make_model


@pytest.mark.parametrize("over", [{}, {"dual_attention_layers": [0], "pos_embed_max_size": 16}])
@pytest.mark.parametrize("hw, text_len", [((16, 16), 8), ((8, 16), 24)])
def test_flops_match_measured(hw, text_len, over):
    model = build_model("mmdit", {"preset": "tiny", "in_channels": 4, "hidden_size": 64, "num_heads": 4, **over})
    x, t, text, pooled = torch.zeros(1, 4, *hw), torch.zeros(1), torch.zeros(1, text_len, 32), torch.zeros(1, 32)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, text, torch.ones(1, text_len), pooled)
    measured, ours = counter.get_total_flops(), flops_per_sample(model.config, *hw, text_len)
    assert abs(ours - measured) / measured < 0.03, (ours, measured)


@pytest.mark.parametrize("preset", list(MMDIT_PRESETS))
def test_presets_build_on_meta(preset):
    with torch.device("meta"):
        model = MMDiT(MMDiTConfig(preset=preset))
    last = model.blocks[-1].context
    assert last.pre_only and not hasattr(last, "mlp")  # SD3's context_pre_only last block
    assert sum(p.numel() for p in model.parameters()) > 0


def test_pooled_text_conditions_the_output():
    model = make_model("mmdit")
    inp = make_inputs("mmdit")
    with torch.no_grad():
        a, b = model(**inp), model(**dict(inp, pooled=inp["pooled"] + 1))
    assert not torch.allclose(a, b)


@pytest.mark.filterwarnings("error")  # e.g. a dtype mismatch that drops a fused kernel
def test_bf16_autocast_runs():
    model = make_model("mmdit")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**make_inputs("mmdit", 8, 16))
    out.float().mean().backward()
    assert torch.isfinite(out.float()).all()


def test_sd3_options_crop_positions_and_attend_to_padding():
    model = make_model("mmdit", pos_embed_max_size=6, mask_text=False)
    crop = model.pos_embed(2, 4, torch.device("cpu"), torch.float32)[0].view(2, 4, -1)
    grid = model.pos_embed(6, 6, torch.device("cpu"), torch.float32)[0].view(6, 6, -1)
    assert torch.equal(crop, grid[2:4, 1:5])  # the centre window of the one 6 x 6 grid
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        model(**make_inputs("mmdit", 8, 16))  # 4 x 8 tokens: wider than the grid
    inp = make_inputs("mmdit")
    with torch.no_grad():  # padding is attended to: the mask changes nothing, the padded tokens' content does
        assert torch.equal(model(**inp), model(**dict(inp, text_mask=None)))
        inp2 = dict(inp, text=inp["text"].clone())
        inp2["text"][0, -1] += 1.0
        assert not torch.allclose(model(**inp)[0], model(**inp2)[0])


def test_dual_attention_layers_are_checked():
    with pytest.raises(ValueError, match="dual_attention_layers"):
        MMDiTConfig(preset="tiny", dual_attention_layers=[1])  # the last (context_pre_only) block
