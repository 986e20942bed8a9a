"""SD-style UNet (diffusers ``UNet2DConditionModel``) behind Tessera's denoiser signature.

The UNet itself is diffusers' (so SD 1.x / 2.x / SDXL weights load unchanged); this file only maps
our typed config to its constructor, our ``forward(x, t, text, text_mask, pooled)`` to its call, and
loads SD-format UNet folders (``config.json`` + ``diffusion_pytorch_model.safetensors``, or a
pipeline root with a ``unet/`` subfolder) from a local path, safetensors only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Constructor kwargs of UNet2DConditionModel per preset. "tiny" is for tests (diffusers-test sized).
UNET_PRESETS: dict[str, dict] = {
    "tiny": dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[16, 32],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ),
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=768, attention_head_dim=8,
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}


@dataclass(kw_only=True)
class UNetConfig:
    """UNet: a preset and/or explicit diffusers constructor kwargs, or a local pretrained folder."""

    preset: str | None = None
    pretrained: str | None = None  # local SD-format UNet folder or pipeline root (has unet/)
    kwargs: dict[str, Any] = field(default_factory=dict)  # UNet2DConditionModel kwargs, override the preset
    vae_scale_factor: int = 8  # SDXL micro-conditioning: pixel size = latent size * this
    mask_text: bool = True  # False: padded text tokens are attended to, as SD/SDXL were trained
    pooled_tail: int | None = None  # SDXL: text_embeds = the last N pooled channels (CLIP-G's 1280 after CLIP-L's)
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in UNET_PRESETS:
            raise ValueError(f"preset: unknown {self.preset!r} (known: {', '.join(UNET_PRESETS)})")
        if self.preset is None and self.pretrained is None and not self.kwargs:
            raise ValueError("preset: set a preset, kwargs or a pretrained path")


def unet_dir(path: str | Path) -> Path:
    """The folder holding the UNet's config.json: ``path`` itself or its ``unet/`` subfolder."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "unet" / "config.json").is_file():
        return path / "unet"
    raise FileNotFoundError(f"no UNet config.json in {path} or {path / 'unet'}")


class UNet(nn.Module):
    """diffusers UNet2DConditionModel with the denoiser signature shared by every Tessera model."""

    family = "unet"

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel  # heavy import, only when a UNet is built

        self.config = config
        if config.pretrained is not None:
            self.unet = UNet2DConditionModel.from_pretrained(
                unet_dir(config.pretrained), use_safetensors=True, local_files_only=True
            )
        else:
            kwargs = {**UNET_PRESETS.get(config.preset or "", {}), **config.kwargs}
            self.unet = UNet2DConditionModel(**kwargs)
        self.set_gradient_checkpointing(config.gradient_checkpointing)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "UNet":
        """Load an SD 1.x/2.x/SDXL-format UNet folder (config.json + diffusion_pytorch_model.safetensors)."""
        return cls(UNetConfig(pretrained=str(path), **overrides))

    def diffusers_config(self) -> dict:
        """The UNet's full constructor kwargs (enough to rebuild it without the original folder)."""
        return {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Toggle diffusers' activation checkpointing (torch.utils.checkpoint, use_reentrant=False)."""
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def added_cond(self, x: torch.Tensor, pooled: torch.Tensor | None) -> dict | None:
        """SDXL's text_time conditioning: pooled text plus (orig size, crop 0 0, target size) time ids."""
        if self.unet.config.addition_embed_type != "text_time":
            return None
        if pooled is None:
            raise ValueError("this UNet (addition_embed_type=text_time) needs pooled text embeddings")
        H, W = (s * self.config.vae_scale_factor for s in x.shape[-2:])
        ids = torch.tensor([H, W, 0, 0, H, W], dtype=x.dtype, device=x.device).expand(x.shape[0], 6)
        if self.config.pooled_tail:
            pooled = pooled[:, -self.config.pooled_tail:]
        return {"text_embeds": pooled, "time_ids": ids}

    def forward(self, x, t, text, text_mask=None, pooled=None) -> torch.Tensor:
        """Predict the model target for latents x (N, C, H, W) at timesteps t (N,) given text (N, L, Dt)."""
        mask = None if text_mask is None or not self.config.mask_text else text_mask.to(x.dtype)  # 1 = keep
        return self.unet(
            x, t, encoder_hidden_states=text, encoder_attention_mask=mask,
            added_cond_kwargs=self.added_cond(x, pooled), return_dict=False,
        )[0]


def flops_per_sample(model: UNet, height: int, width: int, text_len: int) -> int:
    """Forward FLOPs of one sample, counted by running the UNet once under FlopCounterMode (no closed form)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    cfg = model.unet.config
    x = torch.zeros(1, cfg.in_channels, height, width, dtype=p.dtype, device=p.device)
    text = torch.zeros(1, text_len, cfg.cross_attention_dim, dtype=p.dtype, device=p.device)
    pooled = None
    if cfg.addition_embed_type == "text_time":
        pooled = torch.zeros(1, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                             dtype=p.dtype, device=p.device)
    # The math backend decomposes attention into counted matmuls; fused CPU kernels are not counted.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, torch.zeros(1, device=p.device), text, None, pooled)
    return int(counter.get_total_flops())

