"""Pixel-space identity and the 32x-family AutoencoderDC."""

from __future__ import annotations

import torch
from diffusers import AutoencoderDC

from tests.trainer.autoencoders.conftest import images
from tessera.trainer.autoencoders import build_autoencoder


def test_identity_round_trip_exact():
    ae = build_autoencoder("identity")
    assert (ae.latent_channels, ae.downsample_factor, ae.id) == (3, 1, "identity")
    for hw in [(8, 8), (8, 16), (24, 8)]:
        x = images(2, *hw)
        z = ae.encode(x)
        assert z.shape == x.shape and torch.equal(ae.decode(z), x)
        assert z.data_ptr() != x.data_ptr()  # a copy: callers may modify it


def test_dc_shapes_and_scale(dc_dir):
    ae = build_autoencoder("dc", {"path": dc_dir})
    assert (ae.latent_channels, ae.downsample_factor, ae.scale) == (4, 2, 0.41)
    raw = AutoencoderDC.from_pretrained(dc_dir).eval()
    for hw in [(16, 16), (16, 32), (32, 8)]:
        x = images(2, *hw)
        z = ae.encode(x)
        assert z.shape == (2, 4, hw[0] // 2, hw[1] // 2)
        with torch.no_grad():
            torch.testing.assert_close(z, raw.encode(x).latent * 0.41)
            torch.testing.assert_close(ae.decode(z), raw.decode(z / 0.41).sample.clamp(-1, 1))
        assert ae.decode(z).shape == x.shape
    assert torch.equal(ae.encode(images(1, 8, 8)), ae.encode(images(1, 8, 8)))  # deterministic encoder
    assert ae.id.startswith("dc-") and "." not in ae.id
