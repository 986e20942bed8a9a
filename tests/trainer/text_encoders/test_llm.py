"""Decoder-only LLM encoder: layer selection, instruction dropping, right padding, masks."""

from __future__ import annotations

import torch
import transformers

from tests.trainer.text_encoders.conftest import assert_frozen
from tessera.trainer.text_encoders import build_text_encoder

INSTR = "Describe: "


def _reference(llm_dir, ids):
    """Hidden states of the plain transformers model for (1, L) ids, all layers."""
    model = transformers.AutoModel.from_pretrained(llm_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True)


def test_llm_layers_match_reference(llm_dir):
    ids = torch.tensor([list(b"a cat".__iter__())]) + 3  # ByT5: byte + 3
    ref = _reference(llm_dir, ids)
    for layer, want in [(-1, ref.last_hidden_state), (0, ref.hidden_states[0]), (1, ref.hidden_states[1])]:
        enc = build_text_encoder("llm", {"path": llm_dir, "max_length": 5, "layer": layer})
        emb = enc.encode(["a cat"])
        assert emb.hidden.shape == (1, 5, 32) and emb.mask.all()
        torch.testing.assert_close(emb.hidden, want, atol=1e-5, rtol=1e-5)
    assert_frozen(enc)


def test_llm_instruction_tokens_dropped(llm_dir):
    enc = build_text_encoder("llm", {"path": llm_dir, "max_length": 8, "instruction": INSTR})
    emb = enc.encode(["a cat", "a big dog"])
    assert emb.hidden.shape == (2, 8, 32)  # max_length prompt tokens, the instruction cut off
    assert emb.mask.sum(dim=1).tolist() == [5, 8]  # "a big dog" (9 bytes) truncated to 8
    ids = torch.tensor([list((INSTR + "a cat").encode())]) + 3
    ref = _reference(llm_dir, ids).last_hidden_state[:, len(INSTR) :]  # states of the prompt tokens
    torch.testing.assert_close(emb.hidden[:1, :5], ref, atol=1e-5, rtol=1e-5)
    # The instruction conditions the prompt states (they differ from the plain encoding).
    plain = build_text_encoder("llm", {"path": llm_dir, "max_length": 8}).encode(["a cat"])
    assert not torch.allclose(plain.hidden[0, :5], emb.hidden[0, :5])


def test_llm_padding_right_and_masked(llm_dir):
    enc = build_text_encoder("llm", {"path": llm_dir, "max_length": 16, "padding": "longest"})
    enc.tokenizer.padding_side = "left"  # must not matter: ids are laid out by hand
    alone = enc.encode(["a cat"])
    batched = enc.encode(["a cat", "a much longer prompt"])
    assert alone.hidden.shape[1] == 5 and batched.hidden.shape[1] == 16
    assert batched.mask[0].tolist() == [True] * 5 + [False] * 11
    torch.testing.assert_close(batched.hidden[0, :5], alone.hidden[0], atol=1e-5, rtol=1e-5)


def test_llm_empty_prompt_keeps_one_valid_token(llm_dir):
    enc = build_text_encoder("llm", {"path": llm_dir, "max_length": 4, "instruction": INSTR})
    e = enc.empty_embedding()
    assert e.hidden.shape == (1, 4, 32)
    assert e.mask[0].tolist() == [True, False, False, False]  # never an all-masked row


def test_llm_trust_remote_code_passed_as_false(llm_dir, monkeypatch):
    calls = []
    orig = transformers.AutoModel.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return orig(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", spy)
    build_text_encoder("llm", {"path": llm_dir})
    assert calls and calls[0]["trust_remote_code"] is False
    build_text_encoder("llm", {"path": llm_dir, "trust_remote_code": True})
    assert calls[1]["trust_remote_code"] is True  # only an explicit opt-in turns it on


def test_llm_bos_kept_without_instruction_dropped_with_it(llm_bos_dir):
    tok = transformers.AutoTokenizer.from_pretrained(llm_bos_dir)
    prompt, instr = "a cat", "describe the image: "
    plain = build_text_encoder("llm", {"path": llm_bos_dir, "max_length": 6})
    assert plain.head == [tok.bos_token_id] and plain.n_drop == 0
    emb = plain.encode([prompt])
    ids = tok(prompt)["input_ids"]  # BOS + prompt
    assert emb.mask[0].sum() == len(ids) and emb.hidden.shape == (1, 6, 32)
    torch.testing.assert_close(
        emb.hidden[:, : len(ids)], _reference(llm_bos_dir, torch.tensor([ids])).last_hidden_state
    )
    instructed = build_text_encoder("llm", {"path": llm_bos_dir, "max_length": 6, "instruction": instr})
    head = tok(instr)["input_ids"]  # BOS + instruction: all dropped
    assert instructed.n_drop == len(head)
    body = tok(prompt, add_special_tokens=False)["input_ids"]
    ref = _reference(llm_bos_dir, torch.tensor([head + body])).last_hidden_state[:, len(head) :]
    emb = instructed.encode([prompt])
    assert emb.mask[0].sum() == len(body)
    torch.testing.assert_close(emb.hidden[:, : len(body)], ref, atol=1e-5, rtol=1e-5)
