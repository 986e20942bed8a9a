"""Exporting control branches: Tessera's format holds the branch alone (the base is ``model.init_from``'s) and
samples again; the UNet's loads with diffusers' ``ControlNetModel.from_pretrained``, the MMDiT's with
``SD3ControlNetModel.from_pretrained`` and gives the branch's residuals; PixArt's has no diffusers class (said)."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.trainer.helpers import TINY_CONFIG
from tests.trainer.models.conftest import make_inputs, perturb, tiny_cfg

SECTIONS = {"dit": tiny_cfg("dit"), "unet": tiny_cfg("unet"),  # SD3 crops one position grid and attends to padding:
            "mmdit": tiny_cfg("mmdit", pos_embed_max_size=8, mask_text=False)}


def exported(tmp_path, family: str):
    """(controlled model with a live branch, Tessera export dir) for a tiny perturbed ``family`` base."""
    from tessera.config import load_config
    from tessera.trainer.config import TrainJobConfig
    from tessera.trainer.export import write_export
    from tessera.trainer.models import save_pretrained
    from tessera.trainer.models.control import branch_weights

    section = "{" + ", ".join(f"{k}: {v}" for k, v in SECTIONS[family].items()) + "}"
    from tests.trainer.helpers import tiny_text_encoder

    ovs = [f"model.name={family}", "model.dit=null", f"model.{family}={section}",
           f"text_encoder.t5.path={tiny_text_encoder(tmp_path / 'enc')}"]
    torch.manual_seed(0)
    save_pretrained(perturb(load_config(TrainJobConfig, TINY_CONFIG, ovs).model.build()), tmp_path / "base")
    cfg = load_config(TrainJobConfig, TINY_CONFIG, ovs + [f"model.init_from={tmp_path / 'base'}",
                                                          "model.control={condition: canny, blocks: 1}"])
    model = cfg.model.build()
    perturb(model.control, seed=5)
    w = {k: v for k, v in branch_weights(model).items()}
    write_export(str(tmp_path / "export"), cfg, {"ema": w}, source="test", step=1, samples=1)
    return model.eval(), tmp_path / "export"


def test_mmdit_branch_exports_an_sd3_controlnet(tmp_path):
    from diffusers import SD3ControlNetModel

    from tessera.trainer.export_diffusers import export_any

    model, src = exported(tmp_path, "mmdit")
    export_any(str(src), str(tmp_path / "out"), fmt="diffusers")
    ref = SD3ControlNetModel.from_pretrained(tmp_path / "out", subfolder="controlnet")
    inp = make_inputs("mmdit")
    ctl = torch.randn(inp["x"].shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(inp["x"], controlnet_cond=ctl, encoder_hidden_states=inp["text"], pooled_projections=inp["pooled"],
                   timestep=inp["t"], return_dict=False)[0]
        N, C, H, W = inp["x"].shape
        p = model.config.patch_size

        def patches(z):
            return z.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(N, -1, C * p * p)

        got = model._branch(patches(inp["x"]), patches(ctl), inp["t"], inp["text"], inp["pooled"], None,
                            model.base.pos_embed(H // p, W // p, inp["x"].device, inp["x"].dtype))
    assert len(got) == len(want) == 1
    assert torch.allclose(got[0], want[0], rtol=1e-4, atol=1e-5), (got[0] - want[0]).abs().max()


def test_unet_branch_exports_a_diffusers_controlnet(tmp_path):
    from diffusers import ControlNetModel

    from tessera.trainer.export_diffusers import export_any

    model, src = exported(tmp_path, "unet")
    export_any(str(src), str(tmp_path / "out"), fmt="diffusers")
    ref = ControlNetModel.from_pretrained(tmp_path / "out", subfolder="controlnet")
    mine = model.control.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in ref.state_dict().items()) and len(mine) == len(ref.state_dict())


def test_dit_branch_has_no_diffusers_class_and_samples_from_its_export(tmp_path, caplog):
    from tessera.trainer.export_diffusers import export_any
    from tessera.trainer.inference import load_for_sampling
    from tessera.trainer.checkpoint import read_tensors

    model, src = exported(tmp_path, "dit")
    assert all(k.startswith("control.") or k == "buffer/base_fingerprint"
               for k in read_tensors(str(src / "ema" / "model.safetensors")))  # the branch alone
    with caplog.at_level(logging.WARNING, logger="tessera.export"):
        export_any(str(src), str(tmp_path / "out"), fmt="diffusers")
    assert "no class for PixArt's ControlNet-Transformer" in caplog.text
    again = load_for_sampling(str(tmp_path / "out"), device=torch.device("cpu"))[0]
    inp = make_inputs("dit")
    ctl = torch.randn(inp["x"].shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(again(**inp, control=ctl), model(**inp, control=ctl))
    from tessera.trainer.models import load_pretrained, save_pretrained
    from tessera.trainer.models.control import ControlBaseMismatch

    save_pretrained(perturb(load_pretrained(tmp_path / "base"), seed=1), tmp_path / "base")  # init_from now holds another base: refused
    with pytest.raises(ControlBaseMismatch, match="pair it with the base it was trained on"):
        load_for_sampling(str(tmp_path / "out"), device=torch.device("cpu"))
