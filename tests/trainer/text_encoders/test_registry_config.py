"""Registry, strict configs, device/dtype selection and ids."""

from __future__ import annotations

import pytest
import torch

from tessera.config import ConfigError, from_dict
from tessera.registry import RegistryError
from tessera.trainer.text_encoders import (
    TEXT_ENCODERS,
    TextEncoderConfig,
    build_text_encoder,
    resolve_device,
    resolve_dtype,
)
from tessera.trainer.text_encoders.runtime import slugify, weights_fingerprint


def test_registry_names():
    assert TEXT_ENCODERS.names() == ["clip", "concat", "hf_encoder", "llm", "t5"]
    with pytest.raises(RegistryError, match="did you mean 't5'"):
        build_text_encoder("t55")


def test_config_is_strict_and_sections_checked():
    with pytest.raises(ConfigError, match="max_lenght"):
        from_dict(TextEncoderConfig, {"name": "t5", "t5": {"max_lenght": 3}})
    with pytest.raises(ConfigError, match="set but name"):
        from_dict(TextEncoderConfig, {"name": "t5", "llm": {}})
    with pytest.raises(ConfigError, match="padding"):
        from_dict(TextEncoderConfig, {"name": "t5", "t5": {"padding": "left"}})
    cfg = from_dict(TextEncoderConfig, {"name": "llm"})
    assert cfg.section().trust_remote_code is False and cfg.section().layer == -1
    with pytest.raises(ConfigError, match="nest"):
        from_dict(TextEncoderConfig, {"name": "concat", "concat": {"channel": [{"name": "concat"}]}})


def test_build_rejects_wrong_config_type(t5_dir):
    from tessera.trainer.text_encoders import LLMEncoderConfig

    with pytest.raises(TypeError, match="T5EncoderConfig"):
        build_text_encoder("t5", LLMEncoderConfig(path=t5_dir))


def test_dtype_and_device_selection(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16 and resolve_dtype("fp16", cpu) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", cuda) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == cuda and resolve_device("cpu") == cpu


def test_ids_follow_weights(t5_dir, tmp_path):
    a = build_text_encoder("t5", {"path": t5_dir, "max_length": 8})
    b = build_text_encoder("t5", {"path": t5_dir, "max_length": 8, "padding": "longest"})
    assert a.id == build_text_encoder("t5", {"path": t5_dir, "max_length": 8}).id
    assert a.id != b.id and a.id.startswith(slugify(t5_dir.rstrip("/").split("/")[-1]))
    # Different weights at the same kind of path -> different fingerprint.
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    assert weights_fingerprint(str(tmp_path)) != weights_fingerprint(t5_dir)
    assert weights_fingerprint("google/t5-v1_1-xxl") == "hub:google/t5-v1_1-xxl"
    assert slugify("Qwen2.5-0.5B") == "qwen2-5-0-5b"


def test_embedding_pad_to_and_one_valid_token():
    from tessera.trainer.text_encoders import TextEmbedding, ensure_one_valid

    emb = TextEmbedding(torch.ones(2, 3, 4), torch.tensor([[True, True, False], [False, False, False]]))
    padded = emb.pad_to(5)
    assert padded.hidden.shape == (2, 5, 4) and not padded.hidden[:, 3:].any()
    assert padded.mask.tolist() == [[True, True, False, False, False], [False] * 5]
    with pytest.raises(ValueError, match="more than"):
        emb.pad_to(2)
    fixed = ensure_one_valid(emb)
    assert fixed.mask.tolist() == [[True, True, False], [True, False, False]]
    assert emb.mask[1].sum() == 0  # the input is not modified
