"""Presets for real runs (configs/train/*.yaml), validated on the meta device with no weights: the dry run resolves,
the parameter count matches the published model within 2%, FLOPs per image and the per-rank memory on 8 GPUs are
printed, and a preset shadowed by explicit fields is said so."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stdout

import pytest
import torch
import yaml

from tessera.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Parameters of the published transformer/UNet, as diffusers' class holds them when built from the released
# config.json (test_published_figures rebuilds each on the meta device). Papers / model cards round them:
# PixArt-α and -Σ "0.6B", SD3-medium "2B", SDXL "2.6B UNet".
PUBLISHED = {"pixart_alpha_256": 610_856_096, "pixart_alpha_512": 610_856_096, "pixart_sigma_1024": 610_856_096,
             "sd3_medium": 2_028_328_000, "sdxl_unet_finetune": 2_567_463_684}
PRESETS = [*PUBLISHED, "sana_like_dit"]


def _run(*argv) -> str:
    """``tessera ...`` in-process; returns stdout (exit code 0 asserted)."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(list(argv)) == 0
    return buf.getvalue()


@pytest.mark.parametrize("name", PRESETS)
def test_preset_resolves_counts_and_estimates_without_weights(name, monkeypatch):
    import diffusers

    def no_weights(*a, **k):
        raise AssertionError("a preset check read weights")

    for cls in (diffusers.AutoencoderKL, diffusers.UNet2DConditionModel, diffusers.AutoencoderDC):
        monkeypatch.setattr(cls, "from_pretrained", no_weights)
    cfg = f"configs/train/{name}.yaml"
    resolved = yaml.safe_load(_run("train", "--config", cfg, "--dry-run"))
    assert resolved["model"]["name"] in ("dit", "mmdit", "unet")
    report = _run("train", "--config", cfg, "--estimate-memory", "--world-size", "8")
    n = int(report.split("parameters: ")[1].split()[0].replace(",", ""))
    if name in PUBLISHED:
        assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.02, (n, PUBLISHED[name])
    assert "FLOPs per image at" in report and "world size 8, precision bf16" in report
    total = float(report.split("device total")[1].split()[0])
    assert 0 < total < 80  # GiB per rank of model state: fits an 80 GB GPU with room for activations
    assert "shadowed" not in report  # every preset's explicit fields agree with its named size preset


def test_published_figures():
    """The PUBLISHED counts, rebuilt from the released configs with diffusers' own classes (meta device)."""
    from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    from tessera.trainer.models.unet import UNET_PRESETS

    with torch.device("meta"):
        pixart = PixArtTransformer2DModel(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                          out_channels=8, cross_attention_dim=1152, caption_channels=4096,
                                          sample_size=64)
        sd3 = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                                    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
        sdxl = UNet2DConditionModel(**UNET_PRESETS["sdxl"])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(pixart), count(sd3), count(sdxl)) == (PUBLISHED["pixart_alpha_512"], PUBLISHED["sd3_medium"],
                                                        PUBLISHED["sdxl_unet_finetune"])


def test_shadowed_preset_is_reported():
    over = ("--config", "configs/train/tiny_dit.yaml", "model.dit.preset=XL")
    dry = _run("train", *over, "--dry-run")
    assert "# note: model.dit.preset='XL' is shadowed by explicit fields: depth=4 (preset 28)" in dry
    report = _run("train", *over, "--estimate-memory")
    assert "shadowed by explicit fields" in report and "hidden_size=128 (preset 1152)" in report
    assert "shadowed" not in _run("train", "--config", "configs/train/tiny_dit.yaml", "--dry-run")
