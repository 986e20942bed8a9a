"""The ``vllm`` captioner where vLLM cannot run (these CPU machines): its config, prompt and request building, the
one-line switch from ``hf``, and the error that names the missing package."""

from __future__ import annotations

import sys

import pytest
from PIL import Image

from tessera.config import from_dict, to_dict
from tessera.recaption.captioners import build_captioner, prepare_batch
from tessera.recaption.config import CaptionerConfig, SamplingConfig
from tessera.recaption.vllm_captioner import CaptionerUnavailable, build_requests, engine_kwargs, sampling_kwargs
from tests.recaption.conftest import qwen_captioner
from tests.recaption.test_hf import IMAGES


def as_vllm(section: dict, **engine) -> dict:
    """The same captioner with ``name: vllm``: the switch a GPU user makes (plus optional engine options)."""
    return {**section, "name": "vllm", **({"vllm": engine} if engine else {})}


def test_the_switch_is_one_line_and_engine_options_come_from_both_sections(tiny_qwen):
    cfg = from_dict(CaptionerConfig, as_vllm(qwen_captioner(tiny_qwen, dtype="bf16", revision="r1")), "test")
    assert cfg.vllm is not None and cfg.vllm.tensor_parallel_size == 1  # defaults when the section is absent
    kw = engine_kwargs(cfg, seed=3)
    assert kw == {"model": str(tiny_qwen), "revision": "r1", "trust_remote_code": False, "dtype": "bfloat16",
                  "tensor_parallel_size": 1, "gpu_memory_utilization": 0.85, "max_model_len": 4096,
                  "enforce_eager": False, "max_num_seqs": 64, "limit_mm_per_prompt": {"image": 1}, "seed": 3}
    tp = from_dict(CaptionerConfig, as_vllm(qwen_captioner(tiny_qwen), tensor_parallel_size=2), "test")
    assert engine_kwargs(tp, 0)["tensor_parallel_size"] == 2
    with pytest.raises(Exception, match="needs an 'hf' section"):
        from_dict(CaptionerConfig, {"name": "vllm", "variant": "v", "vllm": {}}, "test")


def test_sampling_params_per_request():
    s = SamplingConfig(max_new_tokens=40, temperature=0.7, top_p=0.9, repetition_penalty=1.05)
    assert sampling_kwargs(s, seed=11, temperature=None) == {"max_tokens": 40, "temperature": 0.7, "top_p": 0.9,
                                                              "repetition_penalty": 1.05, "seed": 11}
    assert sampling_kwargs(s, seed=12, temperature=0.0)["top_p"] == 1.0  # greedy: no nucleus
    assert sampling_kwargs(s, seed=12, temperature=1.2)["temperature"] == 1.2  # the retry


def test_requests_carry_the_chat_templated_prompt_and_one_image_each(tiny_qwen):
    cfg = from_dict(CaptionerConfig, as_vllm(qwen_captioner(tiny_qwen, prompt="Describe the colours.",
                                                            system="Be brief.")), "test")
    prepared = prepare_batch(to_dict(cfg), IMAGES)  # built on the CPU workers, as for hf
    prompt = prepared["prompt"]
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert prompt.endswith("Describe the colours.<|im_end|>\n<|im_start|>assistant\n")
    requests = build_requests(prompt, prepared["images"])
    assert len(requests) == len(IMAGES)
    assert all(r["prompt"] == prompt and isinstance(r["multi_modal_data"]["image"], Image.Image) for r in requests)
    assert requests[0]["multi_modal_data"]["image"].size == (32, 32)


def test_missing_vllm_is_a_clear_error(tiny_qwen, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails, also where vLLM is installed
    cfg = from_dict(CaptionerConfig, as_vllm(qwen_captioner(tiny_qwen)), "test")
    with pytest.raises(CaptionerUnavailable, match=r"needs the package vllm.*pip install vllm.*name: hf"):
        build_captioner(cfg)
