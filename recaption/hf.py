"""The ``hf`` captioner: any image-text-to-text model of HF transformers, loaded the one way a user's model id is.

``AutoProcessor`` + ``AutoModelForImageTextToText.from_pretrained(path_or_id)`` (``AutoModelForVision2Seq`` is
gone in transformers 5). Chat models (Qwen2-VL, LLaVA, SmolVLM, ...) get the processor's chat template with the
image and the prompt as one user turn; processors without one (BLIP) get the prompt as plain text, which for
BLIP is the caption's start. Batches are left-padded (decoder-only models continue from the right) and hold
images of one aspect bucket, so every image has the same number of image tokens.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from tessera.recaption.captioners import CAPTIONERS, Generation
from tessera.recaption.config import CaptionerConfig, HFCaptionerConfig


def load_processor(h: HFCaptionerConfig) -> Any:
    """``AutoProcessor.from_pretrained`` with the config's revision and ``trust_remote_code``; left padding."""
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(h.model, revision=h.revision,
                                                           trust_remote_code=h.trust_remote_code)
    processor.tokenizer.padding_side = "left"
    return processor


def uses_chat(processor: Any, h: HFCaptionerConfig) -> bool:
    """Whether prompts go through the processor's chat template (``chat: auto`` asks the processor)."""
    if h.chat == "auto":
        return bool(getattr(processor, "chat_template", None))
    if h.chat == "on" and not getattr(processor, "chat_template", None):
        raise ValueError(f"{h.model}: chat: on, but its processor has no chat template")
    return h.chat == "on"


def prompt_text(processor: Any, h: HFCaptionerConfig) -> str:
    """The text that goes with each image: the chat-templated turn (image + prompt), or the plain prompt."""
    if not uses_chat(processor, h):
        return h.prompt
    messages = [{"role": "system", "content": [{"type": "text", "text": h.system}]}] if h.system else []
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": h.prompt}]})
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def model_identity(h: HFCaptionerConfig) -> str:
    """What names the weights: a fingerprint of a local directory's weight files, else ``hub:<id>@<revision>``."""
    from tessera.trainer.text_encoders.runtime import weights_fingerprint

    if Path(h.model).is_dir():
        return "sha256:" + hashlib.sha256(weights_fingerprint(h.model).encode()).hexdigest()[:16]
    return f"hub:{h.model}@{h.revision or 'main'}"


_MODELS: dict[tuple, Any] = {}


def load_model(h: HFCaptionerConfig, device: Any, dtype: Any) -> Any:
    """The model in eval mode on ``device``; captioners of one job that name the same model (e.g. a short and a
    long prompt) share one copy per process."""
    import transformers

    from tessera.trainer.text_encoders.runtime import hf_dtype_kwargs

    key = (h.model, h.revision, str(device), str(dtype), h.attn_implementation, h.trust_remote_code)
    if key not in _MODELS:
        kw = hf_dtype_kwargs(dtype)
        if h.attn_implementation:
            kw["attn_implementation"] = h.attn_implementation
        _MODELS[key] = transformers.AutoModelForImageTextToText.from_pretrained(
            h.model, revision=h.revision, trust_remote_code=h.trust_remote_code, **kw).to(device).eval()
    return _MODELS[key]


class HFPreparer:
    """The CPU half: decoded images -> the processor's tensors (pixel values, token ids, masks)."""

    def __init__(self, cfg: CaptionerConfig) -> None:
        self.processor = load_processor(cfg.hf)
        self.text = prompt_text(self.processor, cfg.hf)

    def __call__(self, images: list) -> dict:
        """One batch of images (one bucket) -> a dict of tensors for ``generate``."""
        kw: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if self.text:
            kw.update(text=[self.text] * len(images), padding=True)
        out = self.processor(**kw)
        # generate() rejects token_type_ids (BERT-style tokenizers such as BLIP's emit them).
        return {k: v for k, v in out.items() if k != "token_type_ids" and hasattr(v, "dtype")}


def _ids(*values: Any) -> set[int]:
    out: set[int] = set()
    for v in values:
        if isinstance(v, int):
            out.add(v)
        elif isinstance(v, (list, tuple)):
            out.update(x for x in v if isinstance(x, int))
    return out


@CAPTIONERS.register("hf")
class HFCaptioner:
    """A transformers VLM in one actor: batched, seeded ``generate`` on the device picked by detection."""

    stochastic = True
    source_variant = None

    @staticmethod
    def preparer(cfg: CaptionerConfig) -> HFPreparer:
        """The CPU half for ``cfg`` (built once per worker process)."""
        return HFPreparer(cfg)

    def __init__(self, cfg: CaptionerConfig) -> None:
        from tessera.trainer.text_encoders.runtime import resolve_device, resolve_dtype

        self.cfg, h = cfg, cfg.hf
        self.device = resolve_device(h.device)
        self.dtype = resolve_dtype(h.dtype, self.device)
        self.model = load_model(h, self.device, self.dtype)
        processor = load_processor(h)
        self.tokenizer = processor.tokenizer
        self.chat, self.prompt = uses_chat(processor, h), prompt_text(processor, h)
        gen, tok = self.model.generation_config, self.tokenizer
        self.eos = _ids(gen.eos_token_id, tok.eos_token_id, tok.sep_token_id if not self.chat else None)
        self.pad = next(iter(_ids(tok.pad_token_id, gen.pad_token_id) or self.eos), 0)
        if gen.pad_token_id is None:  # set here, not per call: BLIP's generate passes its own pad_token_id
            gen.pad_token_id = self.pad
        self.special = set(tok.all_special_ids)
        self.identity = model_identity(h)

    def provenance(self) -> dict:
        """What made these captions: model, revision, weights, prompt hash and sampling."""
        h, s = self.cfg.hf, self.cfg.hf.sampling
        return {"captioner": self.cfg.name, "model": h.model,
                "revision": h.revision or getattr(self.model.config, "_commit_hash", None), "weights": self.identity,
                "prompt_sha256": hashlib.sha256(self.prompt.encode()).hexdigest()[:16],
                "sampling": {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                             "repetition_penalty": s.repetition_penalty}}

    def generate(self, prepared: dict, alts: list[str], seed: int, temperature: float | None) -> list[Generation]:
        """One batch: seeded sampling (or greedy at temperature 0); returns captions in batch order."""
        import torch

        s = self.cfg.hf.sampling
        t = s.temperature if temperature is None else temperature
        inputs = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                  for k, v in prepared.items()}
        kw: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "do_sample": t > 0}
        if t > 0:  # top_k off: Qwen's generation_config ships top_k=1, which would make sampling greedy
            kw.update(temperature=t, top_p=s.top_p, top_k=0)
        if s.repetition_penalty != 1.0:
            kw["repetition_penalty"] = s.repetition_penalty
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kw)
        seq = (out.sequences if hasattr(out, "sequences") else out).cpu()  # (B, L_out)
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        return [self._decode(seq[i], None if ids is None else ids[i].cpu(), None if mask is None else mask[i].cpu())
                for i in range(seq.shape[0])]

    def _decode(self, row: Any, prompt: Any, mask: Any) -> Generation:
        """The continuation after the prompt, cut at end-of-sequence, with its token count and finish reason."""
        n_pad = 0 if mask is None else int((mask == 0).sum())  # left padding
        toks = row.tolist()[n_pad:]
        ref = [] if prompt is None else prompt.tolist()[n_pad:]
        k = 0  # decoder-only models echo the whole prompt; BLIP echoes it without its final [SEP]
        while k < min(len(toks), len(ref)) and toks[k] == ref[k]:
            k += 1
        new = toks[k:]
        cut = next((j for j, t in enumerate(new) if t in self.eos), None)
        kept = new if cut is None else new[:cut]
        finish = "stop" if cut is not None or len(new) < self.cfg.hf.sampling.max_new_tokens else "length"
        text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        if self.cfg.hf.keep_prompt and not self.chat:
            text = f"{self.prompt.strip()} {text}".strip()
        return Generation(text=text, tokens=sum(1 for t in kept if t not in self.special), finish_reason=finish)
