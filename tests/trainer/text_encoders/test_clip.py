"""open_clip text tower: tiny model checkpoint loaded through ``create_model(arch, pretrained=path)``."""

from __future__ import annotations

import open_clip
import torch

from tests.trainer.text_encoders.conftest import TINY_CLIP, assert_frozen
from tessera.trainer.text_encoders import build_text_encoder

PROMPTS = ["a red cube", "a small dog running on the beach"]


def _reference(clip_ckpt):
    """open_clip's own encode_text pooled output and the ln_final states (captured by a hook)."""
    model = open_clip.create_model(TINY_CLIP, pretrained=clip_ckpt).eval()
    tokens = open_clip.get_tokenizer(TINY_CLIP)(PROMPTS)
    seen = {}
    hook = model.ln_final.register_forward_hook(lambda m, i, o: seen.setdefault("hidden", o))
    with torch.no_grad():
        pooled = model.encode_text(tokens)
    hook.remove()
    return tokens, seen["hidden"], pooled


def test_clip_matches_open_clip(clip_ckpt):
    enc = build_text_encoder("clip", {"arch": TINY_CLIP, "path": clip_ckpt})
    assert_frozen(enc)
    emb = enc.encode(PROMPTS)
    tokens, hidden, pooled = _reference(clip_ckpt)
    assert emb.hidden.shape == (2, 77, 32) and emb.pooled.shape == (2, 16)
    assert (enc.hidden_size, enc.pooled_size) == (32, 16)
    torch.testing.assert_close(emb.hidden, hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb.pooled, pooled, atol=1e-5, rtol=1e-5)
    # Mask: start-of-text, the words, EOT; nothing after.
    eot = tokens.argmax(dim=-1)
    assert emb.mask.sum(dim=1).tolist() == (eot + 1).tolist()
    assert not emb.mask[0, int(eot[0]) + 1 :].any()


def test_clip_longest_padding_trims_without_changing_states(clip_ckpt):
    full = build_text_encoder("clip", {"arch": TINY_CLIP, "path": clip_ckpt}).encode(PROMPTS)
    longest = {"arch": TINY_CLIP, "path": clip_ckpt, "padding": "longest"}
    short = build_text_encoder("clip", longest).encode(PROMPTS)
    n = short.hidden.shape[1]
    assert n == int(full.mask.sum(dim=1).max()) and short.mask.all(dim=0).any()
    torch.testing.assert_close(short.hidden, full.hidden[:, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short.pooled, full.pooled, atol=1e-5, rtol=1e-5)


def test_clip_penultimate_layer(clip_ckpt):
    model = open_clip.create_model(TINY_CLIP, pretrained=clip_ckpt).eval()
    tokens = open_clip.get_tokenizer(TINY_CLIP)(PROMPTS)
    with torch.no_grad():
        x = model.token_embedding(tokens) + model.positional_embedding
        x = model.transformer.resblocks[0](x, attn_mask=model.attn_mask)  # output of block 1 of 2
    raw = build_text_encoder("clip", {"arch": TINY_CLIP, "path": clip_ckpt, "layer": -2, "final_norm": False})
    normed = build_text_encoder("clip", {"arch": TINY_CLIP, "path": clip_ckpt, "layer": -2})
    torch.testing.assert_close(raw.encode(PROMPTS).hidden, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normed.encode(PROMPTS).hidden, model.ln_final(x), atol=1e-5, rtol=1e-5)


def test_clip_max_length_truncates(clip_ckpt):
    enc = build_text_encoder("clip", {"arch": TINY_CLIP, "path": clip_ckpt, "max_length": 8})
    emb = enc.encode(["one two three four five six seven eight nine ten", "hi"])
    assert emb.hidden.shape == (2, 8, 32)
    assert emb.mask[0].all() and emb.mask[1].sum() == 3  # SOT, "hi", EOT
