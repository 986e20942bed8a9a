"""Import: published layouts (diffusers PixArt-α/Σ, SD3/SD3.5, SD UNet, the original DiT release, Tessera's own
exports) mapped onto Tessera's models, each checked against the reference on the same inputs: fp32 outputs within
1e-5 of the reference's scale (max |ours - ref| <= 1e-5 * max |ref|)."""

from __future__ import annotations

import argparse
import io
import logging
from contextlib import redirect_stdout

import pytest
import torch
from safetensors.torch import load_file, save_file

from tessera.config import from_dict, read_yaml
from tessera.trainer.config import ModelConfig
from tessera.trainer.convert import MappingError, import_model, load_into, read_weights
from tessera.trainer.models import build_model

from . import published as P


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _imported(src, **kw):
    """Read, build and strictly load; returns the Tessera model."""
    w = read_weights(str(src), **kw)
    model = build_model(w.family, w.config)
    load_into(model, w, strict=True)
    return model.eval()


# PixArt-α 256/512 (no micro-conditions), PixArt-α 1024-MS (sample_size 128: micro-conditions, interpolation 2),
# PixArt-Σ 1024 (sample_size 128, micro-conditions off, interpolation 2).
@pytest.mark.parametrize("layout", [dict(), dict(micro=True, sample_size=128), dict(micro=False, sample_size=128)],
                         ids=["alpha-512", "alpha-1024-ms", "sigma-1024"])
def test_pixart_parity(tmp_path, layout):
    ref = P.pixart(tmp_path / "transformer", **layout)
    ours = _imported(tmp_path)  # a pipeline root: transformer/ is found
    assert ours.config.micro_conditions == bool(layout.get("micro")) and ours.config.out_channels == 4
    for h, w in ((8, 8), (8, 16)):  # two aspect ratios; micro-conditions follow from the latent size
        inp = P.inputs(h=h, w=w)
        added = None
        if layout.get("micro"):
            px = torch.tensor([[8.0 * h, 8.0 * w]] * 2)
            added = {"resolution": px, "aspect_ratio": torch.tensor([[h / w]] * 2)}
        with torch.no_grad():
            got = ours(inp["x"], inp["t"], inp["text"], inp["text_mask"])
            want = ref(inp["x"], encoder_hidden_states=inp["text"], timestep=inp["t"],
                       encoder_attention_mask=inp["text_mask"], added_cond_kwargs=added, return_dict=False)[0]
        P.assert_rel_close(got, want[:, :4])  # PixArt's learned-variance half is dropped on import


@pytest.mark.parametrize("variant", [dict(), dict(qk_norm="rms_norm"), dict(qk_norm="rms_norm", dual=(0, 1))],
                         ids=["sd3", "sd3.5-large", "sd3.5-medium"])
def test_sd3_parity(tmp_path, variant):
    ref = P.sd3(tmp_path, **variant)
    ours = _imported(tmp_path)
    assert ours.config.mask_text is False and ours.config.pos_embed_max_size == 12
    for h, w in ((8, 8), (8, 12)):
        inp = P.inputs(h=h, w=w)
        with torch.no_grad():  # SD3 attends to every text token: the padding mask must not change our output
            got = ours(inp["x"], inp["t"], inp["text"], inp["text_mask"], inp["pooled"])
            want = ref(inp["x"], encoder_hidden_states=inp["text"], pooled_projections=inp["pooled"],
                       timestep=inp["t"], return_dict=False)[0]
        P.assert_rel_close(got, want)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_original_dit_reproduces_unconditional_dit_at_the_anchor(tmp_path, suffix):
    ref = P.original_dit(tmp_path / f"DiT-tiny{suffix}")
    ours = _imported(tmp_path / f"DiT-tiny{suffix}", text_dim=P.TEXT_DIM, num_heads=2)
    inp = P.inputs()
    t = torch.full((2,), 500.0)  # the anchor timestep of the adaLN re-parameterisation
    with torch.no_grad():
        want = ref(inp["x"], timestep=t, class_labels=torch.tensor([10, 10]), return_dict=False)[0][:, :4]
        got = ours(inp["x"], t, inp["text"], inp["text_mask"])
        other_text = ours(inp["x"], t, torch.randn_like(inp["text"]), inp["text_mask"])
    P.assert_rel_close(got, want)
    assert torch.equal(got, other_text)  # fresh cross-attention starts at exactly zero: text has no effect yet


def test_original_dit_head_count_and_pickles_are_clear_errors(tmp_path):
    P.original_dit(tmp_path / "dit.pt")
    with pytest.raises(MappingError, match="head count"):
        read_weights(str(tmp_path / "dit.pt"))  # width 16 is not in DiT's size table
    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "train.pt")
    with pytest.raises(MappingError, match="not a plain tensor checkpoint"):
        read_weights(str(tmp_path / "train.pt"))


def test_unet_folder_imports_unchanged(tmp_path):
    from diffusers import UNet2DConditionModel

    from tessera.trainer.models.unet import UNET_PRESETS

    torch.manual_seed(0)
    ref = P.perturb(UNet2DConditionModel(**{**UNET_PRESETS["tiny"], "cross_attention_dim": P.TEXT_DIM})).eval()
    ref.save_pretrained(tmp_path / "unet")
    ours = _imported(tmp_path)
    inp = P.inputs()
    with torch.no_grad():
        got = ours(inp["x"], inp["t"], inp["text"], inp["text_mask"])
        want = ref(inp["x"], inp["t"], encoder_hidden_states=inp["text"],
                   encoder_attention_mask=inp["text_mask"].float(), return_dict=False)[0]
    assert torch.equal(got, want)


def _tamper(folder, extra=False, reshape=None):
    """Rewrite a saved diffusers model: add an unknown tensor and/or reshape one."""
    f = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    if extra:
        sd["transformer_blocks.0.attn1.mystery.weight"] = torch.zeros(3)
    if reshape:
        sd[reshape] = torch.zeros(7, 7)
    save_file(sd, f)


def test_unmapped_and_misshaped_keys_are_listed_strict_or_skipped(tmp_path, caplog):
    P.pixart(tmp_path)
    _tamper(tmp_path, reshape="caption_projection.linear_1.weight")
    with pytest.raises(Exception, match="caption_projection.linear_1.weight"):
        read_weights(str(tmp_path))  # diffusers' own from_pretrained refuses a mis-shaped tensor first
    P.pixart(tmp_path / "b")
    _tamper(tmp_path / "b", extra=True)  # a tensor no rule maps (from_pretrained itself would only warn)
    w = read_weights(str(tmp_path / "b"))
    model = build_model("dit", w.config)
    w.state["t_block.weight"] = torch.zeros(5, 5)  # and a mapping gone wrong: the wrong shape for our model
    with pytest.raises(MappingError) as e:
        load_into(model, w, strict=True)
    assert "t_block.weight: got (5, 5)" in str(e.value) and "attn1.mystery.weight" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="tessera.convert"):
        before = model.t_block.weight.clone()
        load_into(model, w, strict=False)  # loads the rest, keeps the fresh t_block
    assert torch.equal(model.t_block.weight, before) and "mis shaped" in caplog.text and "mystery" in caplog.text
    assert torch.equal(model.x_embedder.weight, w.state["x_embedder.weight"])


def test_init_from_checks_the_architecture(tmp_path):
    P.pixart(tmp_path)
    w = read_weights(str(tmp_path))
    cfg = from_dict(ModelConfig, {"name": "dit", "dit": {**w.config, "depth": 1}, "init_from": str(tmp_path)})
    with pytest.raises(MappingError, match="depth: model 1, weights 2"):
        cfg.build()
    loose = from_dict(ModelConfig, {"name": "dit", "dit": {**w.config, "depth": 1}, "init_from": str(tmp_path),
                                    "init_strict": False})
    model = loose.build()  # the one block that fits is loaded
    assert torch.equal(model.blocks[0].attn.proj.weight, w.state["blocks.0.attn.proj.weight"])


def test_tessera_import_then_init_from(tmp_path):
    from tessera.cli import main

    ref = P.sd3(tmp_path / "sd3")
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["import", str(tmp_path / "sd3"), "--out", str(tmp_path / "imported")]) == 0
    (tmp_path / "model.yaml").write_text(buf.getvalue())
    section = read_yaml(tmp_path / "model.yaml")["model"]  # the printed section is a valid config as is
    model = from_dict(ModelConfig, section).build()
    assert section["init_from"] == str(tmp_path / "imported")
    inp = P.inputs()
    with torch.no_grad():
        got = model.eval()(inp["x"], inp["t"], inp["text"], None, inp["pooled"])
        want = ref(inp["x"], encoder_hidden_states=inp["text"], pooled_projections=inp["pooled"], timestep=inp["t"],
                   return_dict=False)[0]
    P.assert_rel_close(got, want)
    # A Tessera model folder (and an export, read the same way) is itself a valid source.
    again = from_dict(ModelConfig, {**section, "init_from": str(tmp_path / "imported")}).build()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
