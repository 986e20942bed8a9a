"""The records that flow between sources, per-sample processing and the shard writer."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

# Keys are 24 hex chars (96 bits) of sha1(source_id): no dots, tar/filesystem safe, and the birthday
# collision odds stay ~1e-11 at a billion samples (64 bits would be ~3% at that scale).
KEY_HEX_CHARS = 24


def sample_key(source_id: str) -> str:
    """Deterministic shard key of a sample: hex digest prefix of sha1(source_id)."""
    return hashlib.sha1(source_id.encode("utf-8")).hexdigest()[:KEY_HEX_CHARS]


@dataclass
class RawSample:
    """One input as a source yields it, before any decoding or checks."""

    source: str  # source kind name, e.g. "emoji"
    source_id: str  # stable unique id within the run, e.g. "emoji:1f417"
    data: bytes | None  # image bytes; None if fetching failed
    caption: bytes | str | None  # raw caption; bytes allowed because decoding is a processing stage
    meta: dict  # "url" or "path", extra columns, "captions": {variant: text} when there are several
    error: str | None = None  # fetch-time reject reason ("http_404", "timeout", "opt_out", ...)
    error_detail: str = ""


@dataclass
class Processed:
    """A sample that passed every stage: bucketed, encoded, hashed and scored."""

    key: str  # sample_key(source_id)
    image: bytes  # encoded bytes, already resized/cropped to the bucket
    ext: str  # "jpg" | "webp" | "png"
    caption: str
    meta: dict  # the KEY.json payload minus "key" (docs/CONTRACTS.md)
    bucket: str  # "HxW"
    sha256: str  # of the original input bytes
    phash: int  # 64-bit DCT perceptual hash of the decoded image


@dataclass
class Rejected:
    """An input that will not be written, with the reason it is counted under."""

    source_id: str
    reason: str
    detail: str = ""
    meta: dict = field(default_factory=dict)  # url/path
