"""The ``vllm`` captioner: the ``hf`` captioner's job through vLLM offline inference, one engine per Ray actor.

It reads the same ``hf`` section (model, revision, prompt, sampling, dtype), so on a GPU machine switching is one
line: ``name: hf`` -> ``name: vllm`` (engine options in an optional ``vllm`` section). Each request carries its
own seed (the batch seed plus its position), so captions do not depend on how vLLM schedules them. vLLM is
imported only when the captioner is built; where it is not installed (these CPU machines) the error says so.
The prompt is the model processor's chat template, built on the CPU workers like the ``hf`` captioner's.
"""

from __future__ import annotations

import hashlib
from typing import Any

from tessera.recaption.captioners import CAPTIONERS, Generation
from tessera.recaption.config import CaptionerConfig, SamplingConfig
from tessera.recaption.hf import load_processor, model_identity, prompt_text

_DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class CaptionerUnavailable(RuntimeError):
    """A captioner whose library is not installed where it was asked to run."""


def import_vllm() -> Any:
    """``import vllm``, or a clear error naming the missing package and the alternatives."""
    try:
        import vllm
    except ImportError as e:
        raise CaptionerUnavailable(
            "captioner 'vllm' needs the package vllm, which is not installed here (" + str(e) + "). vLLM runs on "
            "CUDA GPUs: `pip install vllm` there, or use `name: hf` with the same hf section (transformers)."
        ) from None
    return vllm


def engine_kwargs(cfg: CaptionerConfig, seed: int) -> dict:
    """Keyword arguments of ``vllm.LLM``: the hf section's model, the vllm section's engine options."""
    h, v = cfg.hf, cfg.vllm
    return {"model": h.model, "revision": h.revision, "trust_remote_code": h.trust_remote_code,
            "dtype": _DTYPES[h.dtype], "tensor_parallel_size": v.tensor_parallel_size,
            "gpu_memory_utilization": v.gpu_memory_utilization, "max_model_len": v.max_model_len,
            "enforce_eager": v.enforce_eager, "max_num_seqs": v.max_num_seqs, "limit_mm_per_prompt": {"image": 1},
            "seed": seed}


def sampling_kwargs(s: SamplingConfig, seed: int, temperature: float | None) -> dict:
    """Keyword arguments of one request's ``vllm.SamplingParams``."""
    t = s.temperature if temperature is None else temperature
    return {"max_tokens": s.max_new_tokens, "temperature": t, "top_p": s.top_p if t > 0 else 1.0,
            "repetition_penalty": s.repetition_penalty, "seed": seed}


def build_requests(prompt: str, images: list) -> list[dict]:
    """One vLLM prompt per image: the templated text with the image as multi-modal data."""
    return [{"prompt": prompt, "multi_modal_data": {"image": img}} for img in images]


class VLLMPreparer:
    """The CPU half: the templated prompt (from the model's processor) and the decoded images."""

    def __init__(self, cfg: CaptionerConfig) -> None:
        self.prompt = prompt_text(load_processor(cfg.hf), cfg.hf)

    def __call__(self, images: list) -> dict:
        """One batch -> what ``generate`` turns into requests."""
        return {"prompt": self.prompt, "images": images}


@CAPTIONERS.register("vllm")
class VLLMCaptioner:
    """One vLLM engine (on the actor's GPUs) generating a batch of requests, each with its own seed."""

    stochastic = True
    source_variant = None

    @staticmethod
    def preparer(cfg: CaptionerConfig) -> VLLMPreparer:
        """The CPU half for ``cfg`` (built once per worker process)."""
        return VLLMPreparer(cfg)

    def __init__(self, cfg: CaptionerConfig) -> None:
        vllm = import_vllm()
        self.cfg, self._vllm = cfg, vllm
        self.llm = vllm.LLM(**engine_kwargs(cfg, seed=0))
        self.prompt = VLLMPreparer(cfg).prompt
        self.identity = model_identity(cfg.hf)

    def provenance(self) -> dict:
        """What made these captions: model, revision, weights, prompt hash, sampling and the engine."""
        h, s = self.cfg.hf, self.cfg.hf.sampling
        return {"captioner": "vllm", "model": h.model, "revision": h.revision, "weights": self.identity,
                "prompt_sha256": hashlib.sha256(self.prompt.encode()).hexdigest()[:16],
                "engine": f"vllm {self._vllm.__version__}",
                "sampling": {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                             "repetition_penalty": s.repetition_penalty}}

    def generate(self, prepared: dict, alts: list[str], seed: int, temperature: float | None) -> list[Generation]:
        """Captions in request order; finish reason as vLLM reports it."""
        s = self.cfg.hf.sampling
        requests = build_requests(prepared["prompt"], prepared["images"])
        params = [self._vllm.SamplingParams(**sampling_kwargs(s, seed + i, temperature)) for i in range(len(requests))]
        outs = self.llm.generate(requests, params, use_tqdm=False)
        return [Generation(text=o.outputs[0].text.strip(), tokens=len(o.outputs[0].token_ids),
                           finish_reason="length" if o.outputs[0].finish_reason == "length" else "stop") for o in outs]
