"""SD3-style concatenation: channel join, zero-pad to the common width, then token join."""

from __future__ import annotations

import torch

from tessera.config import from_dict
from tests.trainer.text_encoders.conftest import TINY_CLIP, assert_frozen
from tessera.trainer.text_encoders import TextEmbedding, TextEncoderConfig, build_text_encoder
from tessera.trainer.text_encoders.concat import concat_embeddings


def _emb(b, n, d, valid, pooled=None):
    mask = torch.arange(n)[None].expand(b, n) < valid
    return TextEmbedding(torch.randn(b, n, d), mask, None if pooled is None else torch.randn(b, pooled))


def test_sd3_rule_on_synthetic_embeddings():
    clip_l, clip_g, t5 = _emb(2, 7, 3, 4, pooled=3), _emb(2, 7, 5, 4, pooled=5), _emb(2, 9, 10, 6)
    out = concat_embeddings([clip_l, clip_g], [t5])
    assert out.hidden.shape == (2, 7 + 9, 10) and out.mask.shape == (2, 16) and out.pooled.shape == (2, 8)
    assert torch.equal(out.hidden[:, :7, :3], clip_l.hidden)
    assert torch.equal(out.hidden[:, :7, 3:8], clip_g.hidden)
    assert not out.hidden[:, :7, 8:].any()  # channel group zero-padded to T5's width
    assert torch.equal(out.hidden[:, 7:], t5.hidden)
    assert torch.equal(out.mask, torch.cat([clip_l.mask, t5.mask], dim=1))
    assert torch.equal(out.pooled, torch.cat([clip_l.pooled, clip_g.pooled], dim=-1))


def test_sequence_wider_than_channel_and_unequal_lengths():
    a, b = _emb(1, 3, 4, 2), _emb(1, 5, 2, 5)
    out = concat_embeddings([a, b], [])
    assert out.hidden.shape == (1, 5, 6) and out.pooled is None
    assert out.mask[0].tolist() == [True] * 5  # any member valid at that position
    assert not out.hidden[0, 3:, :4].any()  # the shorter member is zero-padded on tokens


def test_concat_of_real_encoders(t5_dir, clip_ckpt):
    cfg = from_dict(
        TextEncoderConfig,
        {
            "name": "concat",
            "concat": {
                "channel": [
                    {
                        "name": "clip",
                        "clip": {"arch": TINY_CLIP, "path": clip_ckpt, "layer": -2, "final_norm": False},
                    },
                    {"name": "clip", "clip": {"arch": TINY_CLIP, "path": clip_ckpt}},
                ],
                "sequence": [{"name": "t5", "t5": {"path": t5_dir, "max_length": 12}}],
            },
        },
    )
    enc = build_text_encoder(cfg)
    assert_frozen(enc)
    assert len(enc.modules()) == 3
    prompts = ["a red cube", "a dog"]
    emb = enc.encode(prompts)
    assert (enc.hidden_size, enc.pooled_size) == (64, 32)
    assert emb.hidden.shape == (2, 77 + 12, 64) and emb.mask.shape == (2, 89) and emb.pooled.shape == (2, 32)
    parts = [e.encode(prompts) for e in enc.channel + enc.sequence]
    torch.testing.assert_close(emb.hidden[:, :77], torch.cat([parts[0].hidden, parts[1].hidden], dim=-1))
    torch.testing.assert_close(emb.hidden[:, 77:, :32], parts[2].hidden)
    assert not emb.hidden[:, 77:, 32:].any()
    assert torch.equal(emb.mask, torch.cat([parts[1].mask, parts[2].mask], dim=1))
    assert enc.id.startswith("concat-") and enc.id != enc.channel[0].id
