"""Turning resolved samples into batch tensors: caption variant choice, decoding, collation.

Shard members are decoded as images (PIL), UTF-8 text, JSON and safetensors only: never pickles. Control
conditions (``KEY.cond.<name>.png``, written by ``tessera data condition``) come with their sample: a missing one
makes the sample a counted hole (``missing_condition``); one whose size is not its bucket's is an error naming the
key (a condition must share its image's bucket, so that would be a broken dataset, not a bad sample).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from tessera.trainer.data.plan import unit_hash
from tessera.trainer.data.shards import IMAGE_EXTS, ShardIndex, ShardReader

PRIMARY = "txt"  # variant id of the KEY.txt primary caption, used when no configured variant exists


class SkipSample(Exception):
    """A sample that cannot be used; ``args[0]`` is the counted reason."""


@dataclass(kw_only=True)
class SampleSpec:
    """What a batch needs from each sample (the loader config's relevant part)."""

    seed: int
    variants: list[str]  # configured variant ids
    cum_ratios: list[float]  # cumulative, normalised to end at 1.0
    fallback: list[str]  # order tried after the chosen variant
    text_encoder_id: str | None  # load KEY.emb.<id>.<variant>.safetensors
    autoencoder_id: str | None  # load KEY.latent.<id>.safetensors instead of decoding the image
    conditions: list[str] = field(default_factory=list)  # load KEY.cond.<name>.png for each name


class ConditionSizeError(ValueError):
    """A control condition whose size differs from its sample's bucket."""


@dataclass
class BatchStats:
    """Counters for one batch; the loader sums them into ``stats()``."""

    skipped: Counter = field(default_factory=Counter)
    variants: Counter = field(default_factory=Counter)
    variant_fallbacks: int = 0

    def as_dict(self) -> dict:
        """JSON-friendly form."""
        return {"skipped": dict(self.skipped), "variants": dict(self.variants),
                "variant_fallbacks": self.variant_fallbacks}


def choose_variant(spec: SampleSpec, epoch: int, key: str) -> str:
    """The configured variant for (seed, epoch, key), drawn by the ratios."""
    u = unit_hash("variant", spec.seed, epoch, key)
    for v, c in zip(spec.variants, spec.cum_ratios):
        if u < c:
            return v
    return spec.variants[-1]


def _pick_caption(spec: SampleSpec, reader: ShardReader, idx: ShardIndex, key: str, epoch: int,
                  stats: BatchStats) -> tuple[str, str]:
    """(variant, caption): the chosen variant, else the first usable one in fallback order, else ``KEY.txt``
    (without precomputed embeddings). A blank caption is never used: an ingest with ``require_caption: false``
    keeps uncaptioned images with an empty ``alt`` for re-captioning, and a recaption drops rejected captions.
    No usable caption skips the sample, counted as ``empty_caption`` (only blank ones), ``missing_text_embedding``
    (text without its embedding) or ``missing_caption``."""
    exts = idx.members[key]
    try:
        captions = json.loads(reader.read(idx, key, "json")).get("captions") or {}
    except (ValueError, AttributeError):
        raise SkipSample("bad_json") from None
    chosen = choose_variant(spec, epoch, key)
    need_emb = spec.text_encoder_id is not None
    blank = no_emb = False
    for v in [chosen] + [v for v in spec.fallback if v != chosen]:
        text = captions.get(v)
        if not isinstance(text, str):
            continue
        if not text.strip():
            blank = True
        elif need_emb and f"emb.{spec.text_encoder_id}.{v}.safetensors" not in exts:
            no_emb = True
        else:
            if v != chosen:
                stats.variant_fallbacks += 1
            return v, text
    if not need_emb and "txt" in exts:
        text = reader.read(idx, key, "txt").decode("utf-8", errors="strict").strip()
        if text:
            stats.variant_fallbacks += 1
            return PRIMARY, text
        blank = True
    raise SkipSample("missing_text_embedding" if no_emb else "empty_caption" if blank else "missing_caption")


def _condition(reader: ShardReader, idx: ShardIndex, key: str, name: str, bucket: str) -> np.ndarray:
    """Condition ``name`` of ``key`` as (H, W, 3) uint8 at the bucket's size; missing or undecodable: a hole."""
    ext = f"cond.{name}.png"
    if ext not in idx.members[key]:
        raise SkipSample("missing_condition")
    try:
        with Image.open(io.BytesIO(reader.read(idx, key, ext))) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError):
        raise SkipSample("bad_condition") from None
    h, w = (int(x) for x in bucket.split("x"))
    if arr.shape[:2] != (h, w):
        raise ConditionSizeError(f"sample {key}: condition {name!r} ({key}.{ext}) is {arr.shape[0]}x{arr.shape[1]}, "
                                 f"its bucket is {bucket}; conditions must share their image's bucket (remake them "
                                 "with `tessera data condition`)")
    return arr


def _image(reader: ShardReader, idx: ShardIndex, key: str, hw: tuple[int, int]) -> np.ndarray:
    """The decoded image as (H, W, 3) uint8, which must already be bucket-sized."""
    ext = next((e for e in IMAGE_EXTS if e in idx.members[key]), None)
    if ext is None:
        raise SkipSample("missing_image")
    try:
        with Image.open(io.BytesIO(reader.read(idx, key, ext))) as im:
            arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError):
        raise SkipSample("undecodable_image") from None
    if arr.shape[:2] != hw:
        raise SkipSample("wrong_size")
    return arr


def _tensors(reader: ShardReader, idx: ShardIndex, key: str, ext: str, reason: str) -> dict[str, torch.Tensor]:
    if ext not in idx.members[key]:
        raise SkipSample(reason)
    try:
        return load_safetensors(reader.read(idx, key, ext))
    except Exception:  # safetensors raises its own error types for any malformed header/body
        raise SkipSample(f"bad_{reason.removeprefix('missing_')}") from None


def load_sample(spec: SampleSpec, reader: ShardReader, idx: ShardIndex, key: str, bucket: str,
                epoch: int, stats: BatchStats) -> dict:
    """One sample's fields; raises SkipSample with a reason."""
    variant, caption = _pick_caption(spec, reader, idx, key, epoch, stats)
    out: dict = {"key": key, "caption": caption, "variant": variant}
    if spec.autoencoder_id is not None:
        t = _tensors(reader, idx, key, f"latent.{spec.autoencoder_id}.safetensors", "missing_latent")
        if "latent" not in t:
            raise SkipSample("bad_latent")
        out["latent"] = t["latent"]
    else:
        h, w = (int(x) for x in bucket.split("x"))
        out["image"] = _image(reader, idx, key, (h, w))
    if spec.text_encoder_id is not None:
        t = _tensors(reader, idx, key, f"emb.{spec.text_encoder_id}.{variant}.safetensors",
                     "missing_text_embedding")
        if "hidden" not in t or "mask" not in t:
            raise SkipSample("bad_text_embedding")
        out["text"] = t
    if spec.conditions:
        out["cond"] = {name: _condition(reader, idx, key, name, bucket) for name in spec.conditions}
    return out


def collate(samples: list[dict], bucket: str) -> dict:
    """Stack samples of one bucket into a batch dict (strings stay lists)."""
    batch: dict = {"key": [s["key"] for s in samples], "caption": [s["caption"] for s in samples],
                   "variant": [s["variant"] for s in samples], "bucket": bucket}
    if not samples:
        return batch
    if "image" in samples[0]:
        u8 = torch.from_numpy(np.stack([s["image"] for s in samples]))  # (B, H, W, 3) uint8
        batch["image"] = u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, 3, H, W) in [-1, 1]
    if "latent" in samples[0]:
        batch["latent"] = torch.stack([s["latent"] for s in samples])  # (B, C, h, w)
    if "cond" in samples[0]:  # control conditions: name -> (B, 3, H, W) in [-1, 1], the images' scale
        batch["cond"] = {name: torch.from_numpy(np.stack([s["cond"][name] for s in samples])).permute(0, 3, 1, 2)
                         .float().div_(127.5).sub_(1.0) for name in samples[0]["cond"]}
    if "text" in samples[0]:
        texts = [s["text"] for s in samples]
        length = max(t["hidden"].shape[0] for t in texts)
        dim = texts[0]["hidden"].shape[1]
        hidden = torch.zeros(len(texts), length, dim, dtype=texts[0]["hidden"].dtype)  # (B, L, D)
        mask = torch.zeros(len(texts), length, dtype=torch.int8)  # (B, L); padding is masked out
        for i, t in enumerate(texts):
            n = t["hidden"].shape[0]
            hidden[i, :n] = t["hidden"]
            mask[i, :n] = t["mask"].to(torch.int8)
        batch["text_hidden"], batch["text_mask"] = hidden, mask
        if all("pooled" in t for t in texts):
            batch["text_pooled"] = torch.stack([t["pooled"] for t in texts])  # (B, D)
    return batch
