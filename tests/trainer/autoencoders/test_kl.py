"""AutoencoderKL: shapes, scale/shift against the raw diffusers model, posterior sampling."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from tessera.config import ConfigError, from_dict
from tests.trainer.autoencoders.conftest import images
from tessera.trainer.autoencoders import AUTOENCODERS, KL_PRESETS, AutoencoderConfig, build_autoencoder


def test_registry():
    assert AUTOENCODERS.names() == ["dc", "identity", "kl"]


@pytest.mark.parametrize("hw", [(16, 16), (16, 32), (32, 8)])
def test_kl_shapes(kl_dir, hw):
    ae = build_autoencoder("kl", {"path": kl_dir, "posterior": "mode"})
    assert (ae.latent_channels, ae.downsample_factor) == (4, 2)
    z = ae.encode(images(2, *hw))
    assert z.shape == (2, 4, hw[0] // 2, hw[1] // 2) == (2, *ae.latent_shape(*hw))
    x = ae.decode(z)
    assert x.shape == (2, 3, *hw) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1


def test_kl_scale_shift_against_raw_diffusers(kl_dir):
    ae = build_autoencoder("kl", {"path": kl_dir, "preset": "sd3", "posterior": "mode"})
    scale, shift = KL_PRESETS["sd3"]
    assert (ae.scale, ae.shift) == (scale, shift) == (1.5305, 0.0609)
    for m in ae.modules():
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    raw = AutoencoderKL.from_pretrained(kl_dir).eval()
    x = images(2, 16, 16)
    with torch.no_grad():
        z_raw = raw.encode(x).latent_dist.mode()
        z = ae.encode(x)
        torch.testing.assert_close(z, (z_raw - shift) * scale)
        torch.testing.assert_close(ae.decode(z), raw.decode(z / scale + shift).sample.clamp(-1, 1))


def test_kl_scale_resolution_order(kl_dir):
    assert build_autoencoder("kl", {"path": kl_dir}).scale == 0.5  # from the VAE's own config
    assert build_autoencoder("kl", {"path": kl_dir}).shift == 0.0  # config shift_factor is None
    flux = build_autoencoder("kl", {"path": kl_dir, "preset": "flux"})
    assert (flux.scale, flux.shift) == (0.3611, 0.1159)
    explicit = build_autoencoder("kl", {"path": kl_dir, "preset": "flux", "scaling_factor": 2.0})
    assert (explicit.scale, explicit.shift) == (2.0, 0.1159)
    assert len({flux.id, explicit.id, build_autoencoder("kl", {"path": kl_dir}).id}) == 3


def test_kl_posterior_sampling_is_seeded(kl_dir):
    ae = build_autoencoder("kl", {"path": kl_dir, "posterior": "sample"})
    x = images(1, 16, 16)
    a = ae.encode(x, generator=torch.Generator().manual_seed(1))
    b = ae.encode(x, generator=torch.Generator().manual_seed(1))
    c = ae.encode(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    raw = AutoencoderKL.from_pretrained(kl_dir).eval()
    with torch.no_grad():
        z_raw = raw.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, z_raw * 0.5)  # same draw as diffusers, then scaled


def test_kl_rejects_bad_sizes_and_outputs_feed_autograd(kl_dir):
    ae = build_autoencoder("kl", {"path": kl_dir, "posterior": "mode"})
    with pytest.raises(ValueError, match="divisible"):
        ae.encode(images(1, 15, 16))
    z = ae.encode(images(1, 8, 8))
    w = torch.ones(1, requires_grad=True)
    (z * w).sum().backward()  # not an inference tensor
    assert w.grad is not None


def test_kl_bf16(kl_dir):
    ae = build_autoencoder("kl", {"path": kl_dir, "dtype": "bf16", "posterior": "mode"})
    assert all(p.dtype == torch.bfloat16 for p in ae.vae.parameters())
    z = ae.encode(images(1, 8, 8))
    assert z.dtype == torch.float32 and z.shape == (1, 4, 4, 4)


def test_autoencoder_config_sections(kl_dir):
    cfg = from_dict(AutoencoderConfig, {"name": "kl", "kl": {"path": kl_dir, "preset": "sdxl"}})
    assert build_autoencoder(cfg).scale == 0.13025
    with pytest.raises(ConfigError, match="preset"):
        from_dict(AutoencoderConfig, {"name": "kl", "kl": {"preset": "sd4"}})
    with pytest.raises(ConfigError, match="set but name"):
        from_dict(AutoencoderConfig, {"name": "identity", "kl": {}})
