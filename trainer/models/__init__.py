"""Denoisers: PixArt-style DiT, SD3-style MMDiT and diffusers' SD UNet, behind one forward signature."""

from .dit import DIT_PRESETS, DiT, DiTConfig
from .mmdit import MMDIT_PRESETS, MMDiT, MMDiTConfig
from .registry import MODELS, build_model, config_class, load_pretrained, model_flops, save_pretrained
from .unet import UNET_PRESETS, UNet, UNetConfig

__all__ = [
    "DIT_PRESETS", "DiT", "DiTConfig", "MMDIT_PRESETS", "MMDiT", "MMDiTConfig", "UNET_PRESETS", "UNet",
    "UNetConfig", "MODELS", "build_model", "config_class", "load_pretrained", "model_flops", "save_pretrained",
]
