"""CLIP score with any open_clip architecture and weights from a local checkpoint file.

Definition (torchmetrics' ``CLIPScore``/``clip_score``): per pair, 100 * cos(image embedding, text
embedding); the reported score is ``max(mean over pairs, 0)``. ``clip_scores`` returns the per-pair
``100 * max(cos, 0)`` (CLIP-S of Hessel et al. with w = 100) used by the ingest filter; the two agree
whenever every cosine is positive, as it is for real CLIP models on image/caption pairs.

Images go through open_clip's own validation transform (resize shortest side, center crop,
normalise); the tokenizer is open_clip's for the architecture (the bundled BPE for CLIP models).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(kw_only=True)
class ClipConfig:
    """An open_clip model: architecture name plus a local weights file."""

    arch: str  # open_clip architecture, e.g. "ViT-L-14"
    checkpoint: str  # local .safetensors/.pt/.bin file; never a hub tag
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 32


class ClipModel:
    """A loaded open_clip model with its transform and tokenizer; all embeddings L2-normalised."""

    def __init__(self, model, preprocess, tokenizer, device: torch.device, arch: str, checkpoint: Path) -> None:
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.device, self.arch, self.checkpoint = device, arch, checkpoint
        pp = model.visual.preprocess_cfg
        size = pp.get("size", model.visual.image_size)
        self.image_size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        self.mean = torch.tensor(pp["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(pp["std"], device=device).view(1, 3, 1, 1)
        self.dtype = next(model.parameters()).dtype

    @property
    def embed_dim(self) -> int:
        """Dimension of the joint embedding space."""
        return int(self.model.visual.output_dim)

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> (B, D) unit-norm float32 embeddings."""
        x = torch.stack([self.preprocess(img.convert("RGB")) for img in images]).to(self.device, self.dtype)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Strings -> (B, D) unit-norm float32 embeddings."""
        return self.encode_texts_grad(texts)

    def encode_texts_grad(self, texts: list[str]) -> torch.Tensor:
        """Strings -> (B, D) unit-norm embeddings, inside the caller's grad mode."""
        tokens = self.tokenizer(list(texts)).to(self.device)  # (B, context_length)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def encode_image_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable: images (B, 3, H, W) in [-1, 1] -> (B, D) unit-norm embeddings.

        Mirrors the PIL transform in tensor ops: bicubic antialiased resize of the shortest side,
        center crop, mean/std normalisation.
        """
        x = (x.to(self.device, torch.float32) + 1) / 2  # (B, 3, H, W) in [0, 1]
        th, tw = self.image_size
        h, w = x.shape[-2:]
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[..., top:top + th, left:left + tw]  # (B, 3, th, tw)
        x = (x - self.mean) / self.std
        return F.normalize(self.model.encode_image(x.to(self.dtype)).float(), dim=-1)


def load_clip(arch: str, checkpoint: str | Path, device: str | torch.device | None = None,
              precision: str = "fp32") -> ClipModel:
    """Build open_clip ``arch`` and load ``checkpoint`` (a local file) into it, offline."""
    import open_clip

    from tessera.device import pick_device

    path = Path(checkpoint)
    if not path.is_file():  # open_clip would treat a non-file as a hub tag and try to download it
        raise FileNotFoundError(f"{path}: CLIP checkpoint file not found (open_clip arch {arch!r})")
    dev = pick_device("auto" if device is None else str(device))
    model, _, preprocess = open_clip.create_model_and_transforms(
        arch, pretrained=str(path), device=dev, precision=precision, weights_only=True)
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(arch)
    return ClipModel(model, preprocess, tokenizer, dev, arch, path)


def load_clip_config(cfg: ClipConfig) -> ClipModel:
    """``load_clip`` driven by a ``ClipConfig``."""
    return load_clip(cfg.arch, cfg.checkpoint, cfg.device, cfg.precision)


def _check_pairs(images: list, prompts: list[str]) -> None:
    if len(images) != len(prompts) or not images:
        raise ValueError(f"need equal, non-zero numbers of images and prompts, got {len(images)} and {len(prompts)}")


def cosine_similarities(images: list[Image.Image], prompts: list[str], model: ClipModel,
                        batch_size: int = 32) -> torch.Tensor:
    """(N,) cosine similarity of each image with its prompt, batched, no grad."""
    _check_pairs(images, prompts)
    out = []
    for i in range(0, len(images), batch_size):
        img = model.encode_images(images[i:i + batch_size])  # (B, D)
        txt = model.encode_texts(prompts[i:i + batch_size])  # (B, D)
        out.append((img * txt).sum(-1))
    return torch.cat(out).cpu()


def clip_scores(images: list[Image.Image], prompts: list[str], model: ClipModel, batch_size: int = 32) -> list[float]:
    """Per-pair 100 * max(cos, 0)."""
    cos = cosine_similarities(images, prompts, model, batch_size)
    return (100 * cos.clamp_min(0)).tolist()


def clip_score(images: list[Image.Image], prompts: list[str], model: ClipModel, batch_size: int = 32) -> float:
    """torchmetrics' CLIPScore: max(mean(100 * cos), 0) over all image/prompt pairs."""
    cos = cosine_similarities(images, prompts, model, batch_size).double()
    return float(max(100 * cos.mean().item(), 0.0))
