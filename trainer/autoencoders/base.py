"""The autoencoder seam: registry and the frozen-autoencoder base class.

Contract: ``encode(images (B, 3, H, W) in [-1, 1]) -> latents (B, C, H/f, W/f)`` already normalised
(``(z - shift) * scale``), ``decode(latents) -> images (B, 3, H, W)`` in [-1, 1]; both return fp32
ordinary tensors (not inference tensors) on the autoencoder's device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from tessera.config import from_dict
from tessera.registry import Registry
from tessera.trainer.autoencoders.configs import AutoencoderConfig
from tessera.trainer.text_encoders.runtime import stable_id, weights_fingerprint

AUTOENCODERS: Registry[type[Autoencoder]] = Registry("autoencoder")


class Autoencoder:
    """A frozen latent space. Subclasses implement ``_encode``/``_decode`` on normalised latents."""

    Config: ClassVar[type]
    latent_channels: int  # C
    downsample_factor: int  # f
    id: str  # names cache members KEY.latent.<id>.safetensors

    def __init__(self, cfg: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.device = device
        self.dtype = dtype

    @classmethod
    def config_id(cls, cfg: Any) -> str:
        """The ``id`` an autoencoder built from ``cfg`` will have, from its config files only (no weights)."""
        return cls.id  # pixel space: a class constant

    def modules(self) -> list[torch.nn.Module]:
        """The wrapped torch modules (frozen, eval); empty for pixel space."""
        return []

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent of an H x W image."""
        f = self.downsample_factor
        return self.latent_channels, height // f, width // f

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/f, W/f), fp32."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        f = self.downsample_factor
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"image size {tuple(images.shape[2:])} is not divisible by {f}")
        with torch.inference_mode():
            z = self._encode(images.to(self.device, self.dtype), generator).float()
        return z.clone()  # leave inference mode: the result may feed autograd

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1], fp32."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            want = f"(B, {self.latent_channels}, h, w)"
            raise ValueError(f"expected latents {want}, got {tuple(latents.shape)}")
        with torch.inference_mode():
            x = self._decode(latents.to(self.device, self.dtype)).float().clamp(-1.0, 1.0)
        return x.clone()

    def _encode(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def autoencoder_id(cfg: AutoencoderConfig) -> str:
    """The ``id`` the autoencoder of ``cfg`` will have, without building it."""
    return AUTOENCODERS.get(cfg.name).config_id(cfg.section())


def build_autoencoder(name: str | AutoencoderConfig, cfg: Any = None) -> Autoencoder:
    """Build a registered autoencoder from its name and config (dataclass, mapping or None).

    Also accepts a whole ``AutoencoderConfig`` as the only argument.
    """
    if isinstance(name, AutoencoderConfig):
        name, cfg = name.name, name.section()
    cls = AUTOENCODERS.get(name)
    if cfg is None:
        cfg = cls.Config()
    elif isinstance(cfg, dict):
        cfg = from_dict(cls.Config, cfg, f"autoencoder {name!r}")
    if not isinstance(cfg, cls.Config):
        raise TypeError(f"autoencoder {name!r} expects {cls.Config.__name__}, got {type(cfg).__name__}")
    return cls(cfg)


def diffusers_id(kind: str, path: str, subfolder: str | None, payload: dict) -> str:
    """``<kind>-<repo basename>-<8 hex of weights fingerprint + normalisation options>``."""
    weights_dir = str(Path(path) / subfolder) if subfolder else path
    payload = {**payload, "kind": kind, "subfolder": subfolder, "weights": weights_fingerprint(weights_dir)}
    return stable_id(f"{kind}-{path.rstrip('/').split('/')[-1]}", payload)
