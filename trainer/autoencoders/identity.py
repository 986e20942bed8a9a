"""Pixel space as a trivial latent space (C = 3, f = 1): for tests and small demos."""

from __future__ import annotations

import torch

from tessera.trainer.autoencoders.base import AUTOENCODERS, Autoencoder
from tessera.trainer.autoencoders.configs import IdentityConfig
from tessera.trainer.text_encoders.runtime import resolve_device


@AUTOENCODERS.register("identity")
class IdentityAutoencoder(Autoencoder):
    """``encode``/``decode`` return their input (as fp32 on the device)."""

    Config = IdentityConfig
    latent_channels = 3
    downsample_factor = 1
    id = "identity"

    def __init__(self, cfg: IdentityConfig) -> None:
        super().__init__(cfg, resolve_device(cfg.device), torch.float32)

    def _encode(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return images

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents
