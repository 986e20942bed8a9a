"""Tiny diffusers autoencoders built from configs and saved with ``save_pretrained`` to temp dirs."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch


@pytest.fixture(scope="session")
def kl_dir(tmp_path_factory):
    """AutoencoderKL, 2 levels (f = 2), 4 latent channels; its config scale 0.5, no shift."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.5,
    )
    path = tmp_path_factory.mktemp("tiny_kl")
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def dc_dir(tmp_path_factory):
    """AutoencoderDC, 2 levels (f = 2) with one EfficientViT (linear attention) stage."""
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    blocks = ("ResBlock", "EfficientViTBlock")
    vae = AutoencoderDC(
        latent_channels=4,
        attention_head_dim=8,
        encoder_block_types=blocks,
        decoder_block_types=blocks,
        encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        scaling_factor=0.41,
    )
    path = tmp_path_factory.mktemp("tiny_dc")
    vae.save_pretrained(path)
    return str(path)


def images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random images (b, 3, h, w) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1
