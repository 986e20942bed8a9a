"""Reward models: LAION aesthetic predictor, PickScore/HPSv2-style preference score, CLIP score, colourfulness.

Each reward is built from its typed config (``REWARDS.get(name)`` is the class, ``.Config`` its
dataclass) and exposes:

* ``score(images: list[PIL.Image], prompts: list[str]) -> list[float]``: batched, no grad;
* ``score_tensor(images (B, 3, H, W) in [-1, 1], prompts) -> (B,)``: differentiable w.r.t. the
  images (the reward model's own weights stay frozen), for reward-backprop fine-tuning.

Every reward is also an ingest score filter (``data_pipeline.scoring``), built by ``build_reward`` from the
filter's ``options: dict[str, str]``, each value parsed by the config field's declared type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from tessera.evaluation.clip_score import ClipModel, load_clip
from tessera.config import apply_overrides, from_dict
from tessera.registry import Registry

REWARDS: Registry[type] = Registry("reward model")


class AestheticHead(nn.Module):
    """improved-aesthetic-predictor's MLP over an L2-normalised CLIP image embedding: (B, D) -> (B, 1)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        # Same layer indices as the published checkpoints (layers.0/2/4/6/7), so they load strictly.
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb)


def load_head_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Head weights from .safetensors, or .pth/.pt via ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: aesthetic head weights not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


class _BatchedReward:
    """Shared batching: subclasses implement ``score_tensor``-like ``_score_pil``."""

    name = "reward"
    batch_size = 32

    def _score_pil(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        """One float per (image, prompt), batched, no grad."""
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts")
        out: list[float] = []
        for i in range(0, len(images), self.batch_size):
            out += self._score_pil(images[i:i + self.batch_size], prompts[i:i + self.batch_size]).tolist()
        return out


@REWARDS.register("aesthetic")
class AestheticReward(_BatchedReward):
    """LAION aesthetic predictor: CLIP image embedding (L2-normalised) -> MLP head -> score (~1-10)."""

    name = "aesthetic"

    @dataclass(kw_only=True)
    class Config:
        clip_arch: str = "ViT-L-14"
        clip_checkpoint: str  # local open_clip weights (the head was trained on OpenAI ViT-L/14)
        head: str  # local .safetensors or .pth of the MLP head
        device: str = "auto"
        batch_size: int = 32

    def __init__(self, cfg: Config, clip: ClipModel | None = None) -> None:
        self.cfg, self.batch_size = cfg, cfg.batch_size
        self.clip = clip or load_clip(cfg.clip_arch, cfg.clip_checkpoint, cfg.device)
        sd = load_head_state(cfg.head)
        d = self.clip.embed_dim
        w0 = sd.get("layers.0.weight")
        if w0 is None or w0.shape[1] != d:
            raise ValueError(f"{cfg.head}: head input is {None if w0 is None else w0.shape[1]}-d but "
                             f"CLIP {cfg.clip_arch} embeds in {d}-d")
        self.head = AestheticHead(d)
        self.head.load_state_dict(sd)
        self.head.eval().requires_grad_(False).to(self.clip.device)

    def _score_pil(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        return self.head(self.clip.encode_images(images)).squeeze(-1).cpu()  # (B,)

    def score_tensor(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Differentiable aesthetic score of (B, 3, H, W) images in [-1, 1] -> (B,); prompts unused."""
        return self.head(self.clip.encode_image_tensor(images)).squeeze(-1)


@REWARDS.register("preference")
class PreferenceReward(_BatchedReward):
    """PickScore/HPSv2-style: a fine-tuned open_clip model; score = exp(logit_scale) * cos(image, text)."""

    name = "preference"

    @dataclass(kw_only=True)
    class Config:
        arch: str = "ViT-H-14"
        checkpoint: str  # local fine-tuned open_clip weights (e.g. HPS_v2_compressed.pt)
        device: str = "auto"
        batch_size: int = 32

    def __init__(self, cfg: Config, clip: ClipModel | None = None) -> None:
        self.cfg, self.batch_size = cfg, cfg.batch_size
        self.clip = clip or load_clip(cfg.arch, cfg.checkpoint, cfg.device)

    def _scale(self) -> torch.Tensor:
        return self.clip.model.logit_scale.exp().float()  # CLIP's learned temperature, ~100

    def _score_pil(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        img, txt = self.clip.encode_images(images), self.clip.encode_texts(prompts)  # (B, D) each
        return (self._scale() * (img * txt).sum(-1)).cpu()

    def score_tensor(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Differentiable preference score of (B, 3, H, W) images in [-1, 1] with their prompts -> (B,)."""
        img = self.clip.encode_image_tensor(images)
        with torch.no_grad():  # text side is constant for reward backprop
            txt = self.clip.encode_texts_grad(prompts)
        return self._scale() * (img * txt).sum(-1)


@REWARDS.register("clip_score")
class ClipScoreReward(_BatchedReward):
    """CLIP score per pair: 100 * max(cos, 0) (see ``clip_score.py``)."""

    name = "clip_score"

    @dataclass(kw_only=True)
    class Config:
        arch: str = "ViT-L-14"
        checkpoint: str
        device: str = "auto"
        batch_size: int = 32

    def __init__(self, cfg: Config, clip: ClipModel | None = None) -> None:
        self.cfg, self.batch_size = cfg, cfg.batch_size
        self.clip = clip or load_clip(cfg.arch, cfg.checkpoint, cfg.device)

    def _score_pil(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        img, txt = self.clip.encode_images(images), self.clip.encode_texts(prompts)
        return (100 * (img * txt).sum(-1).clamp_min(0)).cpu()

    def score_tensor(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Differentiable 100 * max(cos, 0) of (B, 3, H, W) images in [-1, 1] with their prompts -> (B,)."""
        img = self.clip.encode_image_tensor(images)
        with torch.no_grad():
            txt = self.clip.encode_texts_grad(prompts)
        return 100 * (img * txt).sum(-1).clamp_min(0)


@REWARDS.register("colorfulness")
class ColorfulnessReward(_BatchedReward):
    """Hasler & Suesstrunk (2003) colourfulness: sigma_rgyb + 0.3 * mu_rgyb; 0 for grey images (no weights)."""

    name = "colorfulness"

    @dataclass(kw_only=True)
    class Config:
        batch_size: int = 256

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.batch_size = cfg, cfg.batch_size

    def _score_pil(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        out = []
        for img in images:
            rgb = np.asarray(img.convert("RGB"), dtype=np.float64)  # (H, W, 3)
            r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
            rg, yb = r - g, 0.5 * (r + g) - b
            out.append(float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())))
        return torch.tensor(out, dtype=torch.float64)


def build_reward(name: str, options: dict[str, str] | None = None):
    """Build reward ``name`` from string options (parsed by the config's field types)."""
    cls = REWARDS.get(name)
    data = apply_overrides(cls.Config, {}, [f"{k}={v}" for k, v in (options or {}).items()])
    return cls(from_dict(cls.Config, data, source=f"reward {name!r} options"))
