"""Frozen text encoders: ``TEXT_ENCODERS`` registry (t5, llm, clip, hf_encoder, concat).

    enc = build_text_encoder("hf_encoder", {"path": "minilm", "max_length": 32})
    emb = enc.encode(["a red cube"])       # TextEmbedding(hidden (B, L, D), mask (B, L), pooled (B, Dp))
    uncond = enc.empty_embedding()         # "" encoded once, for CFG dropout
    enc.id                                 # names cache members KEY.emb.<id>.<variant>.safetensors

Heavy libraries (transformers, open_clip) are imported only when an encoder is built.
"""

from tessera.trainer.text_encoders import clip, concat, hf_encoder, llm, t5  # noqa: F401  (registration)
from tessera.trainer.text_encoders.base import (
    TEXT_ENCODERS,
    TextEmbedding,
    TextEncoder,
    build_text_encoder,
    ensure_one_valid,
    text_encoder_id,
)
from tessera.trainer.text_encoders.configs import (
    SANA_INSTRUCTION,
    ClipEncoderConfig,
    ConcatEncoderConfig,
    EncoderConfig,
    HFEncoderConfig,
    LLMEncoderConfig,
    T5EncoderConfig,
    TextEncoderConfig,
)
from tessera.trainer.text_encoders.runtime import minilm_path, resolve_device, resolve_dtype

__all__ = [
    "TEXT_ENCODERS",
    "SANA_INSTRUCTION",
    "TextEmbedding",
    "TextEncoder",
    "TextEncoderConfig",
    "EncoderConfig",
    "T5EncoderConfig",
    "LLMEncoderConfig",
    "ClipEncoderConfig",
    "HFEncoderConfig",
    "ConcatEncoderConfig",
    "build_text_encoder",
    "ensure_one_valid",
    "text_encoder_id",
    "minilm_path",
    "resolve_device",
    "resolve_dtype",
]
