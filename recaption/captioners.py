"""The captioner registry (``hf``, ``vllm``, ``attributes``) and the two halves every captioner has.

A captioner is split where the work is split: ``prepare`` (CPU: decoded images -> model inputs, e.g. the
processor's pixel values and token ids) runs on Ray CPU workers, ahead of the actor that holds the model, so
decode and preprocessing overlap with generation; ``generate`` (the model) runs in the actor. ``prepare_batch``
is that CPU half as a plain function of plain data, as a Ray task or a local thread runs it.

    @CAPTIONERS.register("mine")
    class Mine:
        stochastic = True                                  # a rejected caption is worth a retry at a higher temperature
        @staticmethod
        def preparer(cfg: CaptionerConfig) -> Callable[[list[Image]], Any]: ...
        def __init__(self, cfg: CaptionerConfig): ...      # load the model (once per actor)
        def provenance(self) -> dict: ...                  # model id, revision, weights hash, prompt hash, sampling
        def generate(self, prepared, alts, seed, temperature) -> list[Generation]: ...
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from tessera.config import config_hash, from_dict, to_dict
from tessera.recaption.config import CaptionerConfig
from tessera.registry import Registry

CAPTIONERS: Registry = Registry("captioner")


@dataclass
class Generation:
    """One generated caption: its text, its length in the captioner's own tokens, and why generation stopped."""

    text: str
    tokens: int
    finish_reason: str  # "stop" (end of sequence) or "length" (hit max_new_tokens)
    detail: dict = field(default_factory=dict)  # extra provenance of this caption (e.g. what was measured)


def build_captioner(cfg: CaptionerConfig) -> Any:
    """The registered captioner for ``cfg.name``, with its model loaded."""
    _register_all()
    return CAPTIONERS.get(cfg.name)(cfg)


def _register_all() -> None:
    """Import the captioner modules (they register themselves; heavy libraries load only when one is built)."""
    from tessera.recaption import attributes, hf, vllm_captioner  # noqa: F401


def decode_image(data: bytes, max_pixels: int | None):
    """Shard image bytes -> an RGB PIL image with at most ``max_pixels`` pixels (aspect ratio kept)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        img = im.convert("RGB")
    w, h = img.size
    if max_pixels and w * h > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
        img = img.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.BICUBIC)
    return img


_PREPARERS: dict[str, Callable] = {}


def prepare_batch(plain_cfg: dict, images: list[bytes]) -> Any:
    """The CPU half of one batch: decode the images and turn them into the captioner's model inputs.

    Runs as a Ray task on a CPU worker (or a local thread); the preparer (e.g. a processor) is built once per
    process and config.
    """
    cfg = from_dict(CaptionerConfig, plain_cfg, "captioner")
    h = config_hash(plain_cfg)
    if h not in _PREPARERS:
        _register_all()
        _PREPARERS[h] = CAPTIONERS.get(cfg.name).preparer(cfg)
    max_pixels = cfg.hf.max_pixels if cfg.hf is not None else None
    return _PREPARERS[h]([decode_image(b, max_pixels) for b in images])


def plain(cfg: CaptionerConfig) -> dict:
    """A captioner config as plain data (what crosses to Ray workers)."""
    return to_dict(cfg)
