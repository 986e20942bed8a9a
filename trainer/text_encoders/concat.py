"""Several encoders as one condition, by SD3's rule (Esser et al. 2024, diffusers StableDiffusion3Pipeline).

SD3: CLIP-L (768) and CLIP-G (1280) per-token states are joined on channels (2048), zero-padded to T5's
width (4096), then T5's tokens are appended on the sequence axis: (B, 77 + 256, 4096). Pooled = the
CLIP pooled vectors joined (768 + 1280). In generic form:

1. ``channel`` encoders: pad each to the longest token count (mask False), join on channels,
   mask = any encoder's mask at that position;
2. width D = max(channel width sum, widest ``sequence`` encoder); zero-pad every part to D;
3. join [channel part, *sequence parts] on the token axis (masks likewise);
4. pooled = every pooled vector present, joined on channels (None if no encoder pools).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.trainer.text_encoders.base import (TEXT_ENCODERS, TextEmbedding, TextEncoder, build_text_encoder,
                                                 text_encoder_id)
from tessera.trainer.text_encoders.configs import ConcatEncoderConfig
from tessera.trainer.text_encoders.runtime import stable_id


def _pad(emb: TextEmbedding, length: int, width: int) -> TextEmbedding:
    """Zero-pad hidden (B, L, D) -> (B, length, width); padded tokens are masked out."""
    b, n, d = emb.hidden.shape
    hidden = F.pad(emb.hidden, (0, width - d, 0, length - n))
    return TextEmbedding(hidden, F.pad(emb.mask, (0, length - n), value=False), emb.pooled)


def concat_embeddings(channel: list[TextEmbedding], sequence: list[TextEmbedding]) -> TextEmbedding:
    """Combine encoder outputs by the SD3 rule above."""
    first = (channel or sequence)[0]
    like = dict(device=first.hidden.device, dtype=first.hidden.dtype)
    channel = [e.to(**like) for e in channel]
    sequence = [e.to(**like) for e in sequence]
    parts: list[TextEmbedding] = []
    if channel:
        n = max(e.hidden.shape[1] for e in channel)
        padded = [_pad(e, n, e.hidden.shape[2]) for e in channel]
        hidden = torch.cat([e.hidden for e in padded], dim=-1)  # (B, n, sum D_i)
        mask = torch.stack([e.mask for e in padded]).any(dim=0)  # (B, n)
        parts.append(TextEmbedding(hidden, mask))
    parts += sequence
    width = max(e.hidden.shape[2] for e in parts)
    parts = [_pad(e, e.hidden.shape[1], width) for e in parts]
    pooled = [e.pooled for e in channel + sequence if e.pooled is not None]
    return TextEmbedding(
        torch.cat([e.hidden for e in parts], dim=1),  # (B, sum L, width)
        torch.cat([e.mask for e in parts], dim=1),  # (B, sum L)
        torch.cat(pooled, dim=-1) if pooled else None,  # (B, sum Dp)
    )


@TEXT_ENCODERS.register("concat")
class ConcatTextEncoder(TextEncoder):
    """Several registered encoders combined into one ``TextEmbedding`` (SD3 style)."""

    Config = ConcatEncoderConfig

    def __init__(self, cfg: ConcatEncoderConfig) -> None:
        self.channel = [build_text_encoder(spec) for spec in cfg.channel]
        self.sequence = [build_text_encoder(spec) for spec in cfg.sequence]
        first = (self.channel or self.sequence)[0]
        super().__init__(cfg, first.device, first.dtype)
        self.hidden_size = max(
            [sum(e.hidden_size for e in self.channel)] + [e.hidden_size for e in self.sequence]
        )
        pooled = [e.pooled_size for e in self.channel + self.sequence if e.pooled_size is not None]
        self.pooled_size = sum(pooled) if pooled else None

    @classmethod
    def config_id(cls, cfg: ConcatEncoderConfig) -> str:
        """The members' ids, combined (no weights are loaded)."""
        ids = {"channel": [text_encoder_id(c) for c in cfg.channel], "sequence": [text_encoder_id(c) for c in cfg.sequence]}
        return stable_id("concat", ids)

    def modules(self) -> list[torch.nn.Module]:
        """All member encoders' modules."""
        return [m for e in self.channel + self.sequence for m in e.modules()]

    def _encode(self, texts: list[str]) -> TextEmbedding:
        return concat_embeddings(
            [e._encode(texts) for e in self.channel], [e._encode(texts) for e in self.sequence]
        )
