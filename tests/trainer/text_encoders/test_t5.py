"""T5 encoder: tiny model saved to disk and loaded through ``from_pretrained(path)``."""

from __future__ import annotations

import torch
import transformers

from tests.trainer.text_encoders.conftest import assert_frozen
from tessera.trainer.text_encoders import TextEmbedding, build_text_encoder

PROMPTS = ["a red cube", "a small dog running on the beach at sunset"]


def test_t5_shapes_mask_and_reference(t5_dir):
    enc = build_text_encoder("t5", {"path": t5_dir, "max_length": 16})
    assert_frozen(enc)
    emb = enc.encode(PROMPTS)
    assert isinstance(emb, TextEmbedding)
    assert emb.hidden.shape == (2, 16, 32) and emb.mask.shape == (2, 16) and emb.pooled is None
    assert emb.mask.dtype == torch.bool
    # ByT5: one token per byte + EOS, truncated to 16; pads are False.
    assert emb.mask[0].sum() == len("a red cube") + 1
    assert not emb.mask[0, len("a red cube") + 1 :].any()
    assert emb.mask[1].all()
    # Same numbers as the plain transformers model.
    ref_model = transformers.T5EncoderModel.from_pretrained(t5_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(t5_dir)(
        PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        ref = ref_model(**tok).last_hidden_state
    torch.testing.assert_close(emb.hidden, ref)
    assert torch.equal(emb.mask, tok["attention_mask"].bool())


def test_t5_padding_does_not_change_valid_tokens(t5_dir):
    enc = build_text_encoder("t5", {"path": t5_dir, "max_length": 32, "padding": "longest"})
    alone = enc.encode(["a red cube"])
    batched = enc.encode(["a red cube", "a much longer prompt that needs padding"])
    n = int(alone.mask[0].sum())
    assert alone.hidden.shape[1] == n  # longest: no padding at all for a single prompt
    assert batched.hidden.shape[1] > n and not batched.mask[0, n:].any()
    torch.testing.assert_close(batched.hidden[0, :n], alone.hidden[0], atol=1e-5, rtol=1e-5)


def test_t5_deterministic_and_usable_in_autograd(t5_dir):
    enc = build_text_encoder("t5", {"path": t5_dir, "max_length": 8})
    a, b = enc.encode(PROMPTS), enc.encode(PROMPTS)
    assert torch.equal(a.hidden, b.hidden)
    # Outputs are ordinary tensors: a trainable layer may consume them and backprop.
    layer = torch.nn.Linear(32, 4)
    layer(a.hidden).sum().backward()
    assert layer.weight.grad is not None


def test_t5_bf16_dtype(t5_dir):
    enc = build_text_encoder("t5", {"path": t5_dir, "max_length": 8, "dtype": "bf16"})
    assert enc.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in enc.model.parameters())
    assert enc.encode(["x"]).hidden.dtype == torch.bfloat16


def test_t5_empty_embedding_cached(t5_dir):
    enc = build_text_encoder("t5", {"path": t5_dir, "max_length": 8})
    e = enc.empty_embedding()
    assert e is enc.empty_embedding()
    assert e.hidden.shape == (1, 8, 32)
    assert e.mask[0].tolist() == [True] + [False] * 7  # "" -> just EOS
    torch.testing.assert_close(e.hidden, enc.encode([""]).hidden)


def test_t5_trust_remote_code_passed_as_false(t5_dir, monkeypatch):
    calls = []
    orig = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return orig(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    build_text_encoder("t5", {"path": t5_dir})
    assert calls and calls[0]["trust_remote_code"] is False
