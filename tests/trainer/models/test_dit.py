"""DiT specifics: parity with diffusers' PixArt, presets' sizes, FLOPs against a measured count."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tessera.config import ConfigError
from tessera.trainer.models import DiT, DiTConfig, build_model
from tessera.trainer.models.dit import CrossAttention, flops_per_sample, sincos_2d

from .conftest import make_inputs, make_model, perturb


def _pixart(cfg: DiTConfig, sample_size: int):
    """diffusers' PixArtTransformer2DModel with the same shape as ``cfg``."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        cross_attention_dim=cfg.hidden_size, sample_size=sample_size, patch_size=cfg.patch_size,
        caption_channels=cfg.text_dim, use_additional_conditions=False, interpolation_scale=1,
    )


def _load_pixart_weights(ours: DiT, ref) -> None:
    """Copy diffusers PixArt weights into our DiT (fusing q/k/v and k/v)."""
    sd, D = ref.state_dict(), ours.config.hidden_size
    new = {
        "x_embedder.weight": sd["pos_embed.proj.weight"].reshape(D, -1), "x_embedder.bias": sd["pos_embed.proj.bias"],
        "final_layer.scale_shift_table": sd["scale_shift_table"],
    }
    pairs = {"t_embedder.fc1": "adaln_single.emb.timestep_embedder.linear_1",
             "t_embedder.fc2": "adaln_single.emb.timestep_embedder.linear_2", "t_block": "adaln_single.linear",
             "y_embedder.fc1": "caption_projection.linear_1", "y_embedder.fc2": "caption_projection.linear_2",
             "final_layer.linear": "proj_out"}
    for i in range(ours.config.depth):
        b, r = f"blocks.{i}.", f"transformer_blocks.{i}."
        pairs.update({b + "attn.proj": r + "attn1.to_out.0", b + "cross_attn.q": r + "attn2.to_q",
                      b + "cross_attn.proj": r + "attn2.to_out.0", b + "mlp.fc1": r + "ff.net.0.proj",
                      b + "mlp.fc2": r + "ff.net.2"})
        new[b + "scale_shift_table"] = sd[r + "scale_shift_table"]
        for kind in ("weight", "bias"):
            new[f"{b}attn.qkv.{kind}"] = torch.cat([sd[f"{r}attn1.to_{n}.{kind}"] for n in "qkv"])
            new[f"{b}cross_attn.kv.{kind}"] = torch.cat([sd[f"{r}attn2.to_{n}.{kind}"] for n in "kv"])
    for o, r in pairs.items():
        new[o + ".weight"], new[o + ".bias"] = sd[r + ".weight"], sd[r + ".bias"]
    ours.load_state_dict(new, strict=True)


@pytest.mark.parametrize("hw", [(8, 8), (8, 16)])
def test_matches_diffusers_pixart(hw):
    cfg = DiTConfig(preset="tiny", in_channels=4, base_size=4)  # diffusers: base_size = sample_size // patch
    torch.manual_seed(0)
    ref = perturb(_pixart(cfg, sample_size=8))
    ours = DiT(cfg)
    _load_pixart_weights(ours, ref)
    inp = make_inputs("dit", *hw)
    with torch.no_grad():
        got = ours(**inp)
        want = ref(inp["x"], encoder_hidden_states=inp["text"], timestep=inp["t"],
                   encoder_attention_mask=inp["text_mask"], return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hw", [(4, 4), (4, 8), (8, 2)])
def test_pos_embed_matches_diffusers(hw):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    want = get_2d_sincos_pos_embed(64, hw, base_size=4, interpolation_scale=2.0)
    torch.testing.assert_close(sincos_2d(64, *hw, base_size=4, scale=2.0), want.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset, low, high", [("0.6B", 0.58e9, 0.64e9), ("1.6B", 1.55e9, 1.70e9)])
def test_big_presets_sizes_on_meta(preset, low, high):
    with torch.device("meta"):  # no allocation
        ours = DiT(DiTConfig(preset=preset))
        ref = _pixart(ours.config, sample_size=64)
    n = sum(p.numel() for p in ours.parameters())
    assert low < n < high, n
    assert n == sum(p.numel() for p in ref.parameters())  # same layout as PixArt-α


@pytest.mark.parametrize("over", [{}, {"qk_norm": True, "pooled_dim": 16, "hidden_size": 64, "num_heads": 4},
                                  {"micro_conditions": True, "hidden_size": 48}])
@pytest.mark.parametrize("hw, text_len", [((16, 16), 8), ((8, 16), 24)])
def test_flops_match_measured(over, hw, text_len):
    model = build_model("dit", {"preset": "tiny", "in_channels": 4, **over})
    x, t = torch.zeros(1, 4, *hw), torch.zeros(1)
    text, pooled = torch.zeros(1, text_len, 32), torch.zeros(1, 16) if over.get("pooled_dim") else None
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, text, torch.ones(1, text_len), pooled)
    measured, ours = counter.get_total_flops(), flops_per_sample(model.config, *hw, text_len)
    assert abs(ours - measured) / measured < 0.03, (ours, measured)


def test_cpu_cross_attention_equals_sdpa(monkeypatch):
    model = make_model("dit", qk_norm=True)
    inp = make_inputs("dit")
    inp["text_mask"][1] = 0  # and a row with no text at all
    with torch.no_grad():
        explicit = model(**inp)
        monkeypatch.setattr(CrossAttention, "use_sdpa", True)
        fused = model(**inp)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("error")  # e.g. a dtype mismatch that drops a fused kernel
@pytest.mark.parametrize("qk_norm", [False, True])
def test_bf16_autocast_close_to_fp32(qk_norm):
    model = make_model("dit", qk_norm=qk_norm)
    inp = make_inputs("dit")
    ref = model(**inp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inp)
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_pooled_text_conditions_the_output():
    model = make_model("dit", pooled_dim=32)
    inp = make_inputs("dit")
    with torch.no_grad():
        a = model(**dict(inp, pooled=torch.zeros(2, 32)))
        b = model(**dict(inp, pooled=torch.ones(2, 32)))
    assert not torch.allclose(a, b)


def test_config_presets_and_overrides():
    cfg = DiTConfig(preset="XL", depth=4)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == (4, 1152, 16)
    assert DiTConfig(in_channels=4, learn_sigma=True).out_channels == 8
    with pytest.raises(ValueError, match="preset"):
        DiTConfig(preset="XXL")
    with pytest.raises(ConfigError, match="depht"):
        build_model("dit", {"preset": "tiny", "depht": 2})


def test_rejects_latent_not_multiple_of_patch():
    model = make_model("dit")
    inp = make_inputs("dit", 8, 9)
    with pytest.raises(ValueError, match="multiple of patch"):
        model(**inp)


def test_micro_conditions_follow_the_latent_size():
    model = make_model("dit", micro_conditions=True, hidden_size=48)
    inp = make_inputs("dit", 8, 16)
    with torch.no_grad():
        wide = model(**inp)
        model.config.vae_scale_factor = 16  # the same latent read as twice the pixels: another condition
        assert not torch.allclose(model(**inp), wide)
    with pytest.raises(ValueError, match="divisible by 3"):
        DiTConfig(preset="tiny", micro_conditions=True)  # 32 wide: height, width and ratio need a third each
