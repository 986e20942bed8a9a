"""Loading transformers models and tokenizers the one way users and tests both go through."""

from __future__ import annotations

from typing import Any

import torch

from tessera.trainer.text_encoders.configs import EncoderConfig
from tessera.trainer.text_encoders.runtime import freeze, hf_dtype_kwargs, resolve_path


def load_tokenizer(cfg: EncoderConfig) -> Any:
    """``AutoTokenizer.from_pretrained(path)`` with the config's ``trust_remote_code``."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(
        resolve_path(cfg.path), trust_remote_code=cfg.trust_remote_code
    )


def load_model(
    model_cls: Any, cfg: EncoderConfig, device: torch.device, dtype: torch.dtype, **kwargs: Any
) -> torch.nn.Module:
    """``model_cls.from_pretrained(path)`` in ``dtype`` on ``device``, frozen and in eval mode."""
    model = model_cls.from_pretrained(resolve_path(cfg.path), **hf_dtype_kwargs(dtype), **kwargs)
    return freeze(model.to(device))


def tokenize(tokenizer: Any, texts: list[str], cfg: EncoderConfig, device: torch.device) -> dict:
    """Right-padded ``input_ids``/``attention_mask`` (B, L), truncated to ``cfg.max_length``."""
    tokenizer.padding_side = "right"  # explicit: some tokenizers default to left padding
    tok = tokenizer(
        texts,
        padding=cfg.padding,
        max_length=cfg.max_length,
        truncation=True,
        return_tensors="pt",
    )
    return {"input_ids": tok["input_ids"].to(device), "attention_mask": tok["attention_mask"].to(device)}
