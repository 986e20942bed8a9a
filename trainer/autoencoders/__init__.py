"""Frozen autoencoders: ``AUTOENCODERS`` registry (kl, dc, identity).

    ae = build_autoencoder("kl", {"path": "stabilityai/sdxl-vae", "preset": "sdxl"})
    z = ae.encode(images)        # (B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f), normalised
    x = ae.decode(z)             # back to [-1, 1]
    ae.id                        # names cache members KEY.latent.<id>.safetensors

diffusers is imported only when a kl/dc autoencoder is built.
"""

from tessera.trainer.autoencoders import dc, identity, kl  # noqa: F401  (registration)
from tessera.trainer.autoencoders.base import AUTOENCODERS, Autoencoder, autoencoder_id, build_autoencoder
from tessera.trainer.autoencoders.configs import KL_PRESETS, AutoencoderConfig, DCConfig, IdentityConfig, KLConfig

__all__ = [
    "AUTOENCODERS",
    "KL_PRESETS",
    "Autoencoder",
    "AutoencoderConfig",
    "DCConfig",
    "IdentityConfig",
    "KLConfig",
    "autoencoder_id",
    "build_autoencoder",
]
