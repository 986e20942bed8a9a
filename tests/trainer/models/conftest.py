"""Tiny models and inputs shared by the model tests (diffusers-style: 2 layers, 2 heads x 16, 8x8 latents)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from tessera.trainer.models import build_model

FAMILIES = ["dit", "mmdit", "unet"]
TEXT_DIM, TEXT_LEN, CHANNELS = 32, 8, 4
VALID = [5, 3]  # valid text tokens per row; the rest is padding


def tiny_cfg(family: str, **over) -> dict:
    """Plain-dict tiny config of a family (what a YAML file would hold)."""
    if family == "unet":
        return {"preset": "tiny", **over}
    return {"preset": "tiny", "in_channels": CHANNELS, **over}


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add seeded noise to every parameter so zero-initialised layers (adaLN-Zero, outputs) are live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def make_model(family: str, seed: int = 0, **over) -> torch.nn.Module:
    """A tiny, seeded, perturbed model of ``family``."""
    torch.manual_seed(seed)
    return perturb(build_model(family, tiny_cfg(family, **over)), seed)


def make_inputs(family: str, h: int = 8, w: int = 8, batch: int = 2, seed: int = 0) -> dict:
    """Seeded (x, t, text, text_mask, pooled) with a padded tail in each text row."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, TEXT_LEN, dtype=torch.long)
    for i in range(batch):
        mask[i, : VALID[i % len(VALID)]] = 1
    return dict(
        x=torch.randn(batch, CHANNELS, h, w, generator=g),
        t=torch.rand(batch, generator=g) * 999,
        text=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g),
        text_mask=mask,
        pooled=torch.randn(batch, 32, generator=g) if family == "mmdit" else None,
    )


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    """Each model family in turn."""
    return request.param


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU extra threads only thrash."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
