"""open_clip text tower: per-token states (before the projection) and the pooled, projected EOT vector.

Built with ``open_clip.create_model(arch, pretrained=path)``; the tokenizer is
``open_clip.get_tokenizer(arch)``, which for the OpenAI/LAION towers is the BPE vocab bundled with
open_clip (no download). The vision tower is dropped after loading to free its memory.

The mask marks tokens up to and including EOT. CLIP's attention is causal, so states before EOT never
see the padding; SD-style models nevertheless attend to all 77 positions, so padded states are kept
(not zeroed) for users who want that.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from tessera.trainer.text_encoders.base import TEXT_ENCODERS, TextEmbedding, TextEncoder, runtime_of
from tessera.trainer.text_encoders.configs import ClipEncoderConfig
from tessera.trainer.text_encoders.runtime import freeze, resolve_path


def _pool_index(tokens: torch.Tensor, pool_type: str, eos_id: int | None) -> torch.Tensor:
    """Index (B,) of the pooled token, following open_clip's ``text_global_pool``."""
    if pool_type == "argmax":  # EOT has the largest id in CLIP's vocab
        return tokens.argmax(dim=-1)
    if pool_type == "eos" and eos_id is not None:
        return (tokens == eos_id).int().argmax(dim=-1)
    if pool_type == "first":
        return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    if pool_type == "last":
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
    raise ValueError(f"unsupported open_clip text pool type {pool_type!r}")


@TEXT_ENCODERS.register("clip")
class ClipTextEncoder(TextEncoder):
    """open_clip text transformer; ``hidden`` from ``cfg.layer``, ``pooled`` = projected EOT state."""

    Config = ClipEncoderConfig

    def __init__(self, cfg: ClipEncoderConfig) -> None:
        super().__init__(cfg, *runtime_of(cfg))
        import open_clip

        kwargs = {}
        if "weights_only" in inspect.signature(open_clip.create_model).parameters:
            kwargs["weights_only"] = True  # never unpickle arbitrary objects from a checkpoint
        model = open_clip.create_model(cfg.arch, pretrained=resolve_path(cfg.path), **kwargs)
        model.visual = nn.Identity()  # text-only use; frees the image tower
        # CustomTextCLIP keeps its tower in .text; CLIP has the same attributes on itself.
        self.tower = getattr(model, "text", model)
        if not hasattr(self.tower, "token_embedding"):
            raise ValueError(f"clip: {cfg.arch} has a non-open_clip text tower (HF text model), unsupported")
        self.model = freeze(model.to(device=self.device, dtype=self.dtype))
        self.tokenizer = open_clip.get_tokenizer(cfg.arch)
        self.context_length = self.tower.positional_embedding.shape[0]
        if cfg.max_length > self.context_length:
            raise ValueError(f"max_length {cfg.max_length} > context length {self.context_length}")
        self.pool_type = getattr(self.tower, "text_pool_type", getattr(self.tower, "pool_type", "argmax"))
        self.eos_id = getattr(self.tower, "text_eos_id", getattr(self.tower, "eos_id", None))
        n_blocks = len(self.tower.transformer.resblocks)
        if not -(n_blocks + 1) <= cfg.layer <= n_blocks:
            raise ValueError(f"layer {cfg.layer} out of range for {n_blocks} blocks")
        self.layer = cfg.layer % (n_blocks + 1)  # number of blocks whose output is ``hidden``
        self.hidden_size = self.tower.transformer.width
        proj = self.tower.text_projection
        if proj is None:
            self.pooled_size = self.hidden_size
        else:
            self.pooled_size = proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    def _tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) and mask (B, L): L = max_length, or up to the last EOT for ``longest``."""
        tokens = self.tokenizer(texts, context_length=self.cfg.max_length).to(self.device)  # (B, max_length)
        last = _pool_index(tokens, self.pool_type, self.eos_id)  # (B,)
        if self.pool_type in ("argmax", "eos"):
            mask = torch.arange(tokens.shape[1], device=self.device)[None] <= last[:, None]
        else:
            mask = tokens != 0  # open_clip pads with 0
        if self.cfg.padding == "longest":
            # Causal attention: trimming trailing pads leaves every kept state unchanged.
            keep = int(mask.sum(dim=1).max())  # masks are contiguous prefixes
            tokens, mask = tokens[:, :keep], mask[:, :keep]
        return tokens, mask

    def _encode(self, texts: list[str]) -> TextEmbedding:
        t = self.tower
        tokens, mask = self._tokens(texts)
        L = tokens.shape[1]
        x = t.token_embedding(tokens).to(self.dtype) + t.positional_embedding[:L].to(self.dtype)  # (B, L, W)
        attn_mask = None if t.attn_mask is None else t.attn_mask[:L, :L].to(self.dtype)  # causal (L, L)
        batch_first = getattr(t.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        picked = x  # layer 0: the embeddings
        for i, block in enumerate(t.transformer.resblocks):
            x = block(x, attn_mask=attn_mask)
            if i + 1 == self.layer:
                picked = x
        x, picked = (x, picked) if batch_first else (x.transpose(0, 1), picked.transpose(0, 1))
        final = t.ln_final(x)  # (B, L, W)
        full = self.layer == len(t.transformer.resblocks)
        hidden = (final if full else t.ln_final(picked)) if self.cfg.final_norm else picked
        idx = _pool_index(tokens, self.pool_type, self.eos_id)  # (B,)
        pooled = final[torch.arange(final.shape[0], device=self.device), idx]  # (B, W)
        proj = t.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj  # (B, Dp)
        return TextEmbedding(hidden, mask, pooled)
