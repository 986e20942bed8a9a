"""T5 encoder (Imagen, PixArt, SD3): per-token states of ``T5EncoderModel``, no pooled vector.

T5 overflows in fp16 (its FF activations exceed 65504); ``dtype: auto`` therefore picks bf16 on GPUs.
"""

from __future__ import annotations

from tessera.trainer.text_encoders.base import TEXT_ENCODERS, TextEmbedding, TextEncoder, runtime_of
from tessera.trainer.text_encoders.configs import T5EncoderConfig
from tessera.trainer.text_encoders.hf import load_model, load_tokenizer, tokenize


@TEXT_ENCODERS.register("t5")
class T5TextEncoder(TextEncoder):
    """``T5EncoderModel`` + tokenizer from a local path or hub id."""

    Config = T5EncoderConfig

    def __init__(self, cfg: T5EncoderConfig) -> None:
        super().__init__(cfg, *runtime_of(cfg))
        import transformers

        self.tokenizer = load_tokenizer(cfg)
        # A concrete class, not Auto*: no repo code can run here, whatever trust_remote_code says.
        self.model = load_model(transformers.T5EncoderModel, cfg, self.device, self.dtype)
        self.hidden_size = self.model.config.d_model

    def _encode(self, texts: list[str]) -> TextEmbedding:
        tok = tokenize(self.tokenizer, texts, self.cfg, self.device)
        hidden = self.model(**tok).last_hidden_state  # (B, L, D)
        return TextEmbedding(hidden, tok["attention_mask"].bool())
