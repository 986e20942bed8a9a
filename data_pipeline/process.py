"""Per-sample stages: RawSample -> Processed | Rejected(reason). Never raises on bad input.

Order (cheap checks first, so bad inputs cost as little as possible):
fetch error -> caption (byte cap before decoding, UTF-8, empty) -> empty file -> sha256 ->
header (not an image, decompression bomb) -> min side / aspect ratio on header dims -> bucket ->
decode (JPEG: DCT-domain 1/2-1/8 scale) -> EXIF orientation -> 8-bit RGB on background -> resize +
centre crop -> pHash of that bucketed image -> encode -> score filters (batched). Exact/near dedup
across the run is decided by the driver.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

from tessera.data_pipeline import imageops
from tessera.data_pipeline.buckets import BucketConfig, assign_bucket, bucket_name, bucket_table
from tessera.data_pipeline.imageops import ImageReject
from tessera.data_pipeline.phash import phash, phash_hex
from tessera.data_pipeline.sample import Processed, RawSample, Rejected, sample_key
from tessera.data_pipeline.scoring import ScoreFilter, ScoreFilterConfig, build_score_filters

_LOCATION_KEYS = ("url", "path")


@dataclass(kw_only=True)
class ProcessConfig:
    """Filters, bucketing and encoding of the per-sample stages."""

    min_side: int = 64  # shorter side of the (oriented) original, in pixels
    max_aspect: float = 4.0  # long side / short side
    max_pixels: int = 89_478_485  # header-claimed W*H above this -> decompression_bomb (PIL's default)
    caption_max_bytes: int = 4096  # checked on the raw bytes, before any decoding
    min_caption_chars: int = 1  # after stripping whitespace; 0 chars is always caption_empty
    # False: an image whose caption is missing, empty or too short is kept with an empty alt (counted as
    # kept_without_caption) for `tessera data recaption` to caption; training never uses an empty caption.
    require_caption: bool = True
    buckets: BucketConfig = field(default_factory=BucketConfig)
    image_format: Literal["jpg", "webp", "png"] = "jpg"
    quality: int = 90
    background: list[int] = field(default_factory=lambda: [255, 255, 255])  # alpha composited on it
    resample: Literal["lanczos", "area", "bicubic"] = "lanczos"
    score_filters: list[ScoreFilterConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")
        if self.max_aspect < 1.0:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")
        if self.max_pixels < 1 or self.caption_max_bytes < 1:
            raise ValueError("max_pixels and caption_max_bytes must be positive")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {self.quality}")
        if len(self.background) != 3 or any(not 0 <= c <= 255 for c in self.background):
            raise ValueError(f"background must be 3 ints in [0, 255], got {self.background}")


def _jsonable(value: Any) -> Any:
    """Coerce extra-column values (numpy scalars, datetimes, bytes) to JSON-safe types."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy scalar
        return _jsonable(value.item())
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


@dataclass
class _Staged:
    """A sample that passed the image stages, waiting for the (batched) score filters."""

    processed: Processed
    image: np.ndarray  # (H, W, 3) uint8 RGB, the bucketed pixels that were encoded


class SampleProcessor:
    """Runs the per-sample stages; one instance per worker (holds the bucket table and scorers)."""

    def __init__(self, cfg: ProcessConfig, scorers: list[ScoreFilter] | None = None) -> None:
        self.cfg = cfg
        self.table = bucket_table(cfg.buckets)
        self.background = tuple(cfg.background)
        self.filters = build_score_filters(cfg.score_filters) if scorers is None else list(scorers)
        imageops.setup_worker(cfg.max_pixels)

    def process(self, raw: RawSample) -> Processed | Rejected:
        """Process one input; every bad input becomes Rejected(reason)."""
        return self.process_batch([raw])[0]

    def process_batch(self, raws: list[RawSample]) -> list[Processed | Rejected]:
        """Process a batch in order; score filters run once over the batch's survivors."""
        staged = [self._stage(r) for r in raws]
        alive = [i for i, s in enumerate(staged) if isinstance(s, _Staged)]
        for flt in self.filters:
            alive = self._apply_filter(flt, staged, alive)
        return [s.processed if isinstance(s, _Staged) else s for s in staged]

    # ------------------------------------------------------------------ stages

    def _apply_filter(self, flt: ScoreFilter, staged: list, alive: list[int]) -> list[int]:
        """Score the survivors; out-of-range ones become Rejected(score_<name>)."""
        if not alive:
            return alive
        name = flt.cfg.name
        items = [staged[i] for i in alive]
        try:
            images = [Image.fromarray(s.image, "RGB") for s in items]
            scores = flt.scorer.score(images, [s.processed.caption for s in items])
            if len(scores) != len(items):
                raise RuntimeError(f"returned {len(scores)} scores for {len(items)} samples")
        except Exception as e:  # noqa: BLE001 - a scorer bug must not lose the batch silently
            for i in alive:
                staged[i] = self._reject_processed(staged[i], f"score_{name}_error", repr(e))
            return []
        kept = []
        for i, value in zip(alive, scores):
            staged[i].processed.meta["scores"][name] = float(value)
            if flt.keeps(float(value)):
                kept.append(i)
            else:
                staged[i] = self._reject_processed(staged[i], f"score_{name}", f"{name}={value:.4g}")
        return kept

    @staticmethod
    def _reject_processed(s: _Staged, reason: str, detail: str) -> Rejected:
        meta = {k: s.processed.meta[k] for k in _LOCATION_KEYS if k in s.processed.meta}
        return Rejected(s.processed.meta["source_id"], reason, detail, meta)

    def _stage(self, raw: RawSample) -> _Staged | Rejected:
        """All per-sample stages up to the encoded image; bad input -> Rejected."""
        location = {k: raw.meta[k] for k in _LOCATION_KEYS if k in raw.meta}
        if raw.error:
            return Rejected(raw.source_id, raw.error, raw.error_detail, location)
        try:
            caption = self._caption(raw.caption)
            return self._image(raw, caption)
        except ImageReject as e:
            return Rejected(raw.source_id, e.reason, e.detail, location)
        except Exception as e:  # noqa: BLE001 - an unforeseen failure is counted, never raised
            return Rejected(raw.source_id, "process_error", f"{type(e).__name__}: {e}", location)

    def _caption(self, caption: bytes | str | None) -> str:
        """Byte cap, strict UTF-8 decode, whitespace strip; "" for an unusable caption when none is required."""
        if caption is None:
            if not self.cfg.require_caption:
                return ""
            raise ImageReject("caption_missing")
        if isinstance(caption, str):
            # Already text: measure its UTF-8 size without keeping the copy beyond the check.
            size = len(caption.encode("utf-8", "surrogatepass"))
        else:
            size = len(caption)
        if size > self.cfg.caption_max_bytes:
            raise ImageReject("caption_too_long", f"{size} bytes > {self.cfg.caption_max_bytes}")
        if isinstance(caption, (bytes, bytearray, memoryview)):
            try:
                caption = bytes(caption).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ImageReject("caption_not_utf8", str(e)) from None
        text = caption.strip()
        if len(text) < max(1, self.cfg.min_caption_chars) and not self.cfg.require_caption:
            return ""
        if not text:
            raise ImageReject("caption_empty")
        if len(text) < self.cfg.min_caption_chars:
            raise ImageReject("caption_too_short", f"{len(text)} chars < {self.cfg.min_caption_chars}")
        return text

    def _image(self, raw: RawSample, caption: str) -> _Staged:
        """Header checks, decode, normalise, hash, bucket, resize/crop and encode."""
        cfg = self.cfg
        data = raw.data or b""
        if not data:
            raise ImageReject("empty_file")
        sha = hashlib.sha256(data).hexdigest()
        img = imageops.open_header(data, cfg.max_pixels)
        w, h = imageops.oriented_size(img)
        if min(w, h) < cfg.min_side:
            raise ImageReject("too_small", f"{w}x{h}, min side {cfg.min_side}")
        if max(w, h) / min(w, h) > cfg.max_aspect:
            raise ImageReject("aspect_ratio", f"{w}x{h}, max aspect {cfg.max_aspect}")
        bucket = assign_bucket(w, h, self.table)
        rgb = imageops.decode_rgb(data, img, imageops.cover_size(w, h, bucket), self.background)  # (H, W, 3)
        if not math.isclose(rgb.shape[1] / rgb.shape[0], w / h, rel_tol=0.05):
            # Orientation only visible after decode (e.g. a PNG eXIf chunk after IDAT): re-bucket.
            w, h = h, w
            bucket = assign_bucket(w, h, self.table)
        out = imageops.resize_crop(rgb, bucket, cfg.resample)  # (bh, bw, 3)
        ph = phash(out)  # of the pixels we store, and the small image: ~20x cheaper than the decoded one
        encoded = imageops.encode(out, cfg.image_format, cfg.quality)
        return _Staged(self._processed(raw, caption, encoded, (w, h), bucket, sha, ph), out)

    def _processed(self, raw: RawSample, caption: str, encoded: bytes, orig_wh: tuple[int, int],
                   bucket: tuple[int, int], sha: str, ph: int) -> Processed:  # fmt: skip
        """Assemble the Processed record and its KEY.json payload."""
        variants = raw.meta.get("captions") or {}
        captions = {"alt": caption}
        captions.update({str(k): v for k, v in variants.items() if isinstance(v, str) and k != "alt"})
        extra = {k: v for k, v in raw.meta.items() if k not in _LOCATION_KEYS and k != "captions"}
        name = bucket_name(bucket)
        meta = {
            "source": raw.source,
            "source_id": raw.source_id,
            **{k: raw.meta[k] for k in _LOCATION_KEYS if k in raw.meta},
            "orig_size": [orig_wh[0], orig_wh[1]],
            "bucket": name,
            "sha256": sha,
            "phash": phash_hex(ph),
            "captions": captions,
            "scores": {},
            "meta": _jsonable(extra),
        }
        key = sample_key(raw.source_id)
        return Processed(key, encoded, self.cfg.image_format, caption, meta, name, sha, ph)
