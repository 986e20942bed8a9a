"""UNet specifics: SD-format folders saved by diffusers load through our from_pretrained."""

from __future__ import annotations

import pytest
import torch

from tessera.trainer.models import UNet, UNetConfig, build_model, load_pretrained, save_pretrained
from tessera.trainer.models.unet import UNET_PRESETS

from .conftest import make_inputs, perturb

SDXL_TINY = dict(
    UNET_PRESETS["tiny"], addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8, transformer_layers_per_block=[1, 1], use_linear_projection=True,
)


def _diffusers_unet(**kwargs):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return perturb(UNet2DConditionModel(**kwargs))


@pytest.mark.parametrize("layout", ["unet_folder", "pipeline_root"])
def test_from_pretrained_loads_sd_folder(tmp_path, layout):
    ref = _diffusers_unet(**UNET_PRESETS["tiny"])
    folder = tmp_path / "unet" if layout == "pipeline_root" else tmp_path / "my_unet"
    ref.save_pretrained(folder, safe_serialization=True)
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    model = UNet.from_pretrained(tmp_path if layout == "pipeline_root" else folder)
    inp = make_inputs("unet")
    with torch.no_grad():
        got = model(**inp)
        want = ref(inp["x"], inp["t"], encoder_hidden_states=inp["text"],
                   encoder_attention_mask=inp["text_mask"].float(), return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_pretrained_round_trips_without_original_folder(tmp_path):
    _diffusers_unet(**UNET_PRESETS["tiny"]).save_pretrained(tmp_path / "sd")
    model = build_model("unet", {"pretrained": str(tmp_path / "sd")})
    save_pretrained(model, tmp_path / "ours")
    for p in (tmp_path / "sd").iterdir():
        p.unlink()
    loaded = load_pretrained(tmp_path / "ours")
    assert loaded.config.pretrained is None
    inp = make_inputs("unet")
    with torch.no_grad():
        assert torch.equal(model(**inp), loaded(**inp))


def test_sdxl_style_text_time_conditioning(tmp_path):
    _diffusers_unet(**SDXL_TINY).save_pretrained(tmp_path)
    model = UNet.from_pretrained(tmp_path)
    inp = make_inputs("unet", 8, 16)
    with torch.no_grad():
        a = model(**dict(inp, pooled=torch.zeros(2, 32)))
        b = model(**dict(inp, pooled=torch.ones(2, 32)))
    assert a.shape == inp["x"].shape and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="pooled"):
        model(**inp)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        UNet(UNetConfig(pretrained=str(tmp_path)))


def test_sdxl_options_pooled_tail_and_unmasked_text(tmp_path):
    _diffusers_unet(**SDXL_TINY).save_pretrained(tmp_path)
    plain = UNet.from_pretrained(tmp_path)
    sdxl = UNet.from_pretrained(tmp_path, pooled_tail=32, mask_text=False)
    inp = make_inputs("unet", 8, 16)
    pooled = torch.randn(2, 48)  # e.g. CLIP-L's 16 then CLIP-G's 32: SDXL reads only the tail
    with torch.no_grad():
        got = sdxl(**dict(inp, pooled=pooled))
        want = plain(**dict(inp, pooled=pooled[:, -32:], text_mask=None))
        assert torch.equal(got, want)
        assert not torch.equal(got, plain(**dict(inp, pooled=pooled[:, -32:])))  # the mask matters when used
