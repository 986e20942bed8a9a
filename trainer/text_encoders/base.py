"""The text-encoder seam: registry, common output type and the frozen-encoder base class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from tessera.config import from_dict, to_dict
from tessera.registry import Registry
from tessera.trainer.text_encoders.configs import EncoderConfig, TextEncoderConfig
from tessera.trainer.text_encoders.runtime import (
    resolve_device,
    resolve_dtype,
    resolve_path,
    stable_id,
    weights_fingerprint,
)

TEXT_ENCODERS: Registry[type[TextEncoder]] = Registry("text encoder")

# Config fields that change how the encoder runs but not what it computes (up to rounding), or that
# are already covered by the weights fingerprint; they stay out of the id.
_NOT_IN_ID = ("path", "device", "dtype", "trust_remote_code")


@dataclass
class TextEmbedding:
    """A batch of encoded prompts: per-token states, the valid-token mask and an optional pooled vector."""

    hidden: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L) bool, True = real token
    pooled: torch.Tensor | None = None  # (B, Dp)

    def to(self, *args: Any, **kwargs: Any) -> TextEmbedding:
        """Move/cast like ``Tensor.to`` (the mask stays bool)."""
        hidden = self.hidden.to(*args, **kwargs)
        pooled = None if self.pooled is None else self.pooled.to(*args, **kwargs)
        return TextEmbedding(hidden, self.mask.to(hidden.device), pooled)

    def pad_to(self, length: int) -> TextEmbedding:
        """Zero-pad (mask False) or check the token axis to ``length``, e.g. to batch with cached rows."""
        n = self.hidden.shape[1]
        if n > length:
            raise ValueError(f"embedding has {n} tokens, more than {length}")
        hidden = F.pad(self.hidden, (0, 0, 0, length - n))  # (B, length, D)
        return TextEmbedding(hidden, F.pad(self.mask, (0, length - n), value=False), self.pooled)


def ensure_one_valid(emb: TextEmbedding) -> TextEmbedding:
    """Mark token 0 valid in rows with no valid token: an all-masked row makes attention softmax NaN."""
    mask = emb.mask.clone()
    mask[:, 0] |= ~mask.any(dim=1)
    return TextEmbedding(emb.hidden, mask, emb.pooled)


class TextEncoder:
    """A frozen, eval-mode text encoder. Subclasses load in ``__init__`` and implement ``_encode``."""

    Config: ClassVar[type] = EncoderConfig
    hidden_size: int  # D
    pooled_size: int | None = None  # Dp, or None when the encoder has no pooled output

    def __init__(self, cfg: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self._empty: TextEmbedding | None = None
        self._id: str | None = None

    @property
    def id(self) -> str:
        """Stable name of (weights, output-shaping options), used for cache members."""
        if self._id is None:
            self._id = self._make_id()
        return self._id

    def _make_id(self) -> str:
        return type(self).config_id(self.cfg)

    @classmethod
    def config_id(cls, cfg: Any) -> str:
        """The id of an encoder built from ``cfg``, computed from the config and the weight files' fingerprint
        without loading the weights (so a trainer can pick a dataset's cached embeddings first)."""
        payload = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_IN_ID}
        payload["kind"] = cls.__name__
        payload["weights"] = weights_fingerprint(resolve_path(cfg.path))
        slug = "minilm-l6" if cfg.path == "minilm" else cfg.path.rstrip("/").split("/")[-1]
        return stable_id(slug, payload)

    def modules(self) -> list[torch.nn.Module]:
        """The wrapped torch modules (frozen, eval)."""
        return [self.model]  # type: ignore[attr-defined]

    def encode(self, texts: list[str]) -> TextEmbedding:
        """Encode a batch of prompts; outputs are ordinary tensors (usable as inputs to a trained model)."""
        if isinstance(texts, str):
            raise TypeError("encode expects a list of prompts, not a str")
        with torch.inference_mode():
            emb = ensure_one_valid(self._encode(list(texts)))
        # Inference tensors cannot be saved for backward; clone outside inference mode so the caller's
        # trainable model can take them as inputs.
        pooled = None if emb.pooled is None else emb.pooled.clone()
        return TextEmbedding(emb.hidden.clone(), emb.mask.clone(), pooled)

    def empty_embedding(self) -> TextEmbedding:
        """Embedding of the empty prompt (batch 1), computed once; the CFG-dropout unconditional input."""
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty

    def _encode(self, texts: list[str]) -> TextEmbedding:
        raise NotImplementedError


def runtime_of(cfg: EncoderConfig) -> tuple[torch.device, torch.dtype]:
    """Resolve a config's ``device``/``dtype`` strings."""
    device = resolve_device(cfg.device)
    return device, resolve_dtype(cfg.dtype, device)


def text_encoder_id(cfg: TextEncoderConfig) -> str:
    """The ``id`` the encoder of ``cfg`` will have, without building it."""
    return TEXT_ENCODERS.get(cfg.name).config_id(cfg.section())


def build_text_encoder(name: str | TextEncoderConfig, cfg: Any = None) -> TextEncoder:
    """Build a registered encoder from its name and config (dataclass, mapping or None for defaults).

    Also accepts a whole ``TextEncoderConfig`` as the only argument.
    """
    if isinstance(name, TextEncoderConfig):
        name, cfg = name.name, name.section()
    cls = TEXT_ENCODERS.get(name)
    if cfg is None:
        cfg = cls.Config()
    elif isinstance(cfg, dict):
        cfg = from_dict(cls.Config, cfg, f"text encoder {name!r}")
    if not isinstance(cfg, cls.Config):
        raise TypeError(f"text encoder {name!r} expects {cls.Config.__name__}, got {type(cfg).__name__}")
    return cls(cfg)
