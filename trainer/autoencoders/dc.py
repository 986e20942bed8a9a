"""diffusers ``AutoencoderDC`` (Chen et al. 2024, Sana's DC-AE): 32x spatial compression, deterministic."""

from __future__ import annotations

import torch

from tessera.trainer.autoencoders.base import AUTOENCODERS, Autoencoder, diffusers_id
from tessera.trainer.autoencoders.configs import DCConfig
from tessera.trainer.text_encoders.runtime import freeze, resolve_device, resolve_dtype, resolve_path


@AUTOENCODERS.register("dc")
class DCAutoencoder(Autoencoder):
    """``AutoencoderDC.from_pretrained(path)``; latents scaled by ``scaling_factor`` (no shift)."""

    Config = DCConfig

    def __init__(self, cfg: DCConfig) -> None:
        device = resolve_device(cfg.device)
        super().__init__(cfg, device, resolve_dtype(cfg.dtype, device))
        import diffusers

        if not hasattr(diffusers, "AutoencoderDC"):
            raise ImportError(f"autoencoder 'dc' needs diffusers >= 0.32 (installed {diffusers.__version__})")
        kwargs = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
        path = resolve_path(cfg.path)
        vae = diffusers.AutoencoderDC.from_pretrained(path, torch_dtype=self.dtype, **kwargs)
        self.vae = freeze(vae.to(device))
        if cfg.tiling:
            self.vae.enable_tiling()
        scale = cfg.scaling_factor if cfg.scaling_factor is not None else self.vae.config.scaling_factor
        self.scale = float(scale)
        self.latent_channels = self.vae.config.latent_channels
        self.downsample_factor = 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)
        self.id = self.config_id(cfg)

    @classmethod
    def config_id(cls, cfg) -> str:
        """``dc-<name>-<hash>`` from the autoencoder's config.json and the weights' fingerprint (no weights)."""
        import diffusers

        kwargs = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
        scale = cfg.scaling_factor
        if scale is None:
            scale = diffusers.AutoencoderDC.load_config(resolve_path(cfg.path), **kwargs)["scaling_factor"]
        return diffusers_id("dc", cfg.path, cfg.subfolder, {"scale": float(scale)})

    def modules(self) -> list[torch.nn.Module]:
        """The autoencoder."""
        return [self.vae]

    def _encode(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.vae.encode(images).latent * self.scale  # (B, C, H/f, W/f)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale).sample  # (B, 3, H, W)
