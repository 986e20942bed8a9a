"""Decoder-only LLM as a text encoder (Sana: Gemma-2; Lumina: Gemma/Qwen): one layer's hidden states.

Token layout per prompt, built by hand so the padding side is explicit and never the tokenizer's default:

    [head | prompt tokens | pad ...]        head = tokenizer(instruction or "") with its leading
                                            special tokens (BOS), trailing ones (EOS) stripped
The prefix and the prompt are tokenized separately and joined as ids, so no BPE merge can straddle
the boundary and the prefix length is exact. Padding is on the right: with causal attention, real
tokens never attend to pads, so a prompt's states do not depend on the batch it is in.
Without an instruction the head (usually just BOS) is kept and counts toward ``max_length``; with one,
the whole head is dropped from the output and ``max_length`` prompt tokens remain.
"""

from __future__ import annotations

import torch

from tessera.trainer.text_encoders.base import TEXT_ENCODERS, TextEmbedding, TextEncoder, runtime_of
from tessera.trainer.text_encoders.configs import LLMEncoderConfig
from tessera.trainer.text_encoders.hf import load_model, load_tokenizer


@TEXT_ENCODERS.register("llm")
class LLMTextEncoder(TextEncoder):
    """Hidden states of ``AutoModel`` (the decoder without LM head) at ``cfg.layer``."""

    Config = LLMEncoderConfig

    def __init__(self, cfg: LLMEncoderConfig) -> None:
        super().__init__(cfg, *runtime_of(cfg))
        import transformers

        self.tokenizer = load_tokenizer(cfg)
        self.model = load_model(
            transformers.AutoModel, cfg, self.device, self.dtype, trust_remote_code=cfg.trust_remote_code
        )
        n_layers = self.model.config.num_hidden_layers
        if not -(n_layers + 1) <= cfg.layer <= n_layers:
            raise ValueError(f"layer {cfg.layer} out of range for a {n_layers}-layer model")
        self.hidden_size = self.model.config.hidden_size
        self.head = self._head_ids(cfg.instruction or "")
        self.n_drop = len(self.head) if cfg.instruction else 0
        self.budget = cfg.max_length if cfg.instruction else cfg.max_length - len(self.head)
        if self.budget < 1:
            raise ValueError(f"max_length {cfg.max_length} leaves no room for prompt tokens")
        tok = self.tokenizer
        self.pad_id = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)

    def _head_ids(self, prefix: str) -> list[int]:
        """Ids of the prefix with the tokenizer's own special tokens, minus trailing ones (EOS)."""
        ids = list(self.tokenizer(prefix, add_special_tokens=True)["input_ids"])
        special = set(self.tokenizer.all_special_ids)
        while ids and ids[-1] in special and ids[-1] != self.tokenizer.bos_token_id:
            ids.pop()
        return ids

    def _batch_ids(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids (B, L) and attention mask (B, L) for head + prompt tokens."""
        bodies = [b[: self.budget] for b in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        body_len = self.budget if self.cfg.padding == "max_length" else max(1, *map(len, bodies))
        ids = torch.full((len(texts), len(self.head) + body_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, body in enumerate(bodies):
            seq = self.head + list(body)
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _encode(self, texts: list[str]) -> TextEmbedding:
        ids, mask = self._batch_ids(texts)
        last = self.cfg.layer == -1
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=not last, use_cache=False)
        hidden = out.last_hidden_state if last else out.hidden_states[self.cfg.layer]  # (B, L, D)
        # Drop the instruction positions; keep the prompt tokens.
        return TextEmbedding(hidden[:, self.n_drop :], mask[:, self.n_drop :].bool())
