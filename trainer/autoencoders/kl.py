"""diffusers ``AutoencoderKL`` (SD 1.x/2.x/XL 4-channel, SD3/FLUX 16-channel, f = 8).

Latents are normalised as ``(z - shift) * scale`` so the diffusion model sees roughly unit variance;
scale/shift come from our config (explicit value, else a preset) and fall back to the VAE's own
``config.scaling_factor``/``shift_factor``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tessera.trainer.autoencoders.base import AUTOENCODERS, Autoencoder, diffusers_id
from tessera.trainer.autoencoders.configs import KL_PRESETS, KLConfig
from tessera.trainer.text_encoders.runtime import freeze, resolve_device, resolve_dtype, resolve_path


def resolve_scale_shift(cfg: KLConfig, vae_config: object) -> tuple[float, float]:
    """(scale, shift): explicit config value > preset > the VAE config's (shift defaults to 0)."""
    preset = KL_PRESETS[cfg.preset] if cfg.preset else (None, None)
    scales = (cfg.scaling_factor, preset[0], getattr(vae_config, "scaling_factor", None), 1.0)
    shifts = (cfg.shift_factor, preset[1], getattr(vae_config, "shift_factor", None), 0.0)
    return float(next(v for v in scales if v is not None)), float(next(v for v in shifts if v is not None))


@AUTOENCODERS.register("kl")
class KLAutoencoder(Autoencoder):
    """``AutoencoderKL.from_pretrained(path)``; posterior sample (seeded by a generator) or mode."""

    Config = KLConfig

    def __init__(self, cfg: KLConfig) -> None:
        device = resolve_device(cfg.device)
        super().__init__(cfg, device, resolve_dtype(cfg.dtype, device))
        from diffusers import AutoencoderKL

        kwargs = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
        vae = AutoencoderKL.from_pretrained(resolve_path(cfg.path), torch_dtype=self.dtype, **kwargs)
        self.vae = freeze(vae.to(device))
        if cfg.tiling:
            self.vae.enable_tiling()
        if cfg.slicing:
            self.vae.enable_slicing()
        self.scale, self.shift = resolve_scale_shift(cfg, self.vae.config)
        self.latent_channels = self.vae.config.latent_channels
        self.downsample_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.id = self.config_id(cfg)

    @classmethod
    def config_id(cls, cfg: KLConfig) -> str:
        """``kl-<name>-<hash>`` from the VAE's config.json and the weights' fingerprint (no weights loaded)."""
        from diffusers import AutoencoderKL

        kwargs = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
        vae_config = SimpleNamespace(**AutoencoderKL.load_config(resolve_path(cfg.path), **kwargs))
        scale, shift = resolve_scale_shift(cfg, vae_config)
        return diffusers_id("kl", cfg.path, cfg.subfolder, {"scale": scale, "shift": shift, "posterior": cfg.posterior})

    def modules(self) -> list[torch.nn.Module]:
        """The VAE."""
        return [self.vae]

    def _encode(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        dist = self.vae.encode(images).latent_dist
        sample = self.cfg.posterior == "sample"
        z = dist.sample(generator=generator) if sample else dist.mode()  # (B, C, h, w)
        return (z - self.shift) * self.scale

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale + self.shift).sample  # (B, 3, H, W)
