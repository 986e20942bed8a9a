"""Typed configs of the autoencoders (no torch import).

    autoencoder:
      name: kl
      kl: {path: stabilityai/stable-diffusion-3-medium-diffusers, subfolder: vae, preset: sd3}
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

Dtype = Literal["auto", "fp32", "bf16", "fp16"]

# (scaling_factor, shift_factor): latents = (z - shift) * scale has roughly unit variance.
KL_PRESETS: dict[str, tuple[float, float]] = {
    "sd": (0.18215, 0.0),  # SD 1.x/2.x, 4 channels
    "sdxl": (0.13025, 0.0),  # SDXL, 4 channels
    "sd3": (1.5305, 0.0609),  # SD3, 16 channels
    "flux": (0.3611, 0.1159),  # FLUX.1, 16 channels
}


@dataclass(kw_only=True)
class KLConfig:
    """diffusers ``AutoencoderKL``; scale/shift: explicit value > preset > the VAE's own config."""

    path: str = "stabilityai/sd-vae-ft-mse"
    subfolder: str | None = None  # e.g. "vae" inside a full pipeline repo
    preset: Literal["sd", "sdxl", "sd3", "flux"] | None = None
    scaling_factor: float | None = None
    shift_factor: float | None = None
    posterior: Literal["sample", "mode"] = "sample"  # sample: LDM training; mode: deterministic mean
    dtype: Dtype = "auto"
    device: str = "auto"
    tiling: bool = False  # tile large images to bound memory (diffusers enable_tiling)
    slicing: bool = False  # one image at a time through the VAE (diffusers enable_slicing)


@dataclass(kw_only=True)
class DCConfig:
    """diffusers ``AutoencoderDC`` (Sana's DC-AE, 32x); deterministic encoder, scale from its config."""

    path: str = "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"
    subfolder: str | None = None
    scaling_factor: float | None = None
    dtype: Dtype = "auto"
    device: str = "auto"
    tiling: bool = False


@dataclass(kw_only=True)
class IdentityConfig:
    """Pixel space: latents are the images themselves."""

    device: str = "auto"


@dataclass(kw_only=True)
class AutoencoderConfig:
    """Which autoencoder to build (registry key) plus that autoencoder's own section."""

    name: str = "identity"
    kl: KLConfig | None = None
    dc: DCConfig | None = None
    identity: IdentityConfig | None = None

    def __post_init__(self) -> None:
        sections = [f.name for f in fields(self) if f.name != "name"]
        if self.name not in sections:
            raise ValueError(f"name must be one of {', '.join(sections)}; got {self.name!r}")
        extra = [s for s in sections if s != self.name and getattr(self, s) is not None]
        if extra:
            raise ValueError(f"section(s) {', '.join(extra)} set but name is {self.name!r}")

    def section(self) -> KLConfig | DCConfig | IdentityConfig:
        """The selected autoencoder's config, defaulted when its section is absent."""
        sec = getattr(self, self.name)
        return sec if sec is not None else SECTION_TYPES[self.name]()


SECTION_TYPES: dict[str, type] = {"kl": KLConfig, "dc": DCConfig, "identity": IdentityConfig}
