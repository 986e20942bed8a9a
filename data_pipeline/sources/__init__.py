"""Input sources: a registry of kinds, each splitting its input into deterministic partitions.

A partition is a JSON-serialisable description of work (row range, file list, one tar...). Reading it
yields every input exactly once, in a fixed order, failures included as ``RawSample(error=...)``, so
the accounting invariant (written + rejected == inputs) holds per partition.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Protocol

import tessera
from tessera.data_pipeline.sample import RawSample
from tessera.registry import Registry

DEFAULT_USER_AGENT = f"tessera/{tessera.__version__} (+https://github.com/tessera)"
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"  # Debian: fonts-noto-color-emoji
OPENCLIPART_ROOT = "/usr/share/openclipart/png"  # Debian: openclipart-png
_BUILTIN_PATHS = {"emoji": EMOJI_FONT, "openclipart": OPENCLIPART_ROOT}
SourceKind = Literal["urls", "folder", "webdataset", "emoji", "openclipart"]


@dataclass(kw_only=True)
class SourceConfig:
    """Where inputs come from. Flat: the options of other kinds keep their defaults (checked)."""

    kind: SourceKind
    # urls: a table file or a directory/prefix of them; folder: a directory; webdataset: a tar or a
    # directory/prefix of tars; emoji: the font file; openclipart: the PNG root. Local or s3://.
    path: str = ""
    limit: int | None = None  # first N inputs in source order (not for webdataset: tars are unsized)
    # urls (img2dataset-compatible tables; a .json file is one JSON array, .jsonl one object per line)
    format: Literal["auto", "parquet", "arrow", "csv", "csv.gz", "tsv", "tsv.gz", "txt", "txt.gz", "json", "json.gz",
                    "jsonl", "jsonl.gz"] = "auto"  # auto: from the file extension
    url_col: str = "url"
    caption_col: str = "caption"
    extra_cols: list[str] | None = None  # kept in meta; None -> every other column
    timeout_s: float = 10.0  # per connect and per read
    retries: int = 2  # extra attempts on 5xx / connection errors, exponential backoff
    backoff_s: float = 0.5  # first retry delay; doubles each attempt
    threads: int = 16  # concurrent downloads per partition (per worker)
    user_agent: str = DEFAULT_USER_AGENT
    max_redirects: int = 5  # more -> redirect_loop
    max_bytes: int = 64 * 2**20  # larger responses -> too_large
    # X-Robots-Tag opt-outs, as img2dataset: its default directives (noai, noimageai, noindex, noimageindex) plus these
    respect_optout: bool = True
    extra_optout_directives: list[str] = field(default_factory=list)
    # folder
    captions_csv: str | None = None  # a CSV (file,caption) instead of sidecar .txt/.json
    # emoji
    emoji_canvas: int = 160  # square canvas side, pixels (the glyph is 136x128 at font size 109)
    emoji_set: Literal["all", "single_codepoint"] = "all"  # fully-qualified emoji, or 1 codepoint only
    background: list[int] = field(default_factory=lambda: [255, 255, 255])
    # openclipart
    categories: list[str] | None = None  # top-level directories (e.g. [food, animals]); None -> all

    def __post_init__(self) -> None:
        if not self.path:
            if self.kind not in _BUILTIN_PATHS:
                raise ValueError(f"path is required for source kind {self.kind!r}")
            self.path = _BUILTIN_PATHS[self.kind]
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if self.limit is not None and self.kind == "webdataset":
            raise ValueError("limit is not supported for kind 'webdataset' (tar sizes are unknown up front)")
        if self.threads < 1 or self.retries < 0 or self.timeout_s <= 0 or self.max_redirects < 0:
            raise ValueError("threads >= 1, retries >= 0, timeout_s > 0 and max_redirects >= 0 are required")
        if len(self.background) != 3 or any(not 0 <= c <= 255 for c in self.background):
            raise ValueError(f"background must be 3 ints in [0, 255], got {self.background}")
        if self.emoji_canvas < 136:
            raise ValueError(f"emoji_canvas must be >= 136 (the glyph width), got {self.emoji_canvas}")


@dataclass
class Partition:
    """One unit of work: which source, its index, and a JSON-serialisable payload."""

    source: str
    index: int
    payload: dict


class Source(Protocol):
    """A source of raw samples, split into deterministic partitions."""

    def partitions(self, samples_per_partition: int) -> list[Partition]:
        """Cheap, deterministic list of partitions; the same on every run."""
        ...

    def read(self, part: Partition) -> Iterator[RawSample]:
        """Every input of the partition exactly once, in order (failures with ``error`` set)."""
        ...


SOURCES: Registry[Callable[[SourceConfig], Source]] = Registry("source")


def build_source(cfg: SourceConfig) -> Source:
    """Instantiate the configured source through the registry."""
    return SOURCES.get(cfg.kind)(cfg)


def range_partitions(kind: str, total: int, samples_per_partition: int) -> list[Partition]:
    """Partitions covering [0, total) in consecutive ranges of samples_per_partition."""
    if samples_per_partition < 1:
        raise ValueError(f"samples_per_partition must be >= 1, got {samples_per_partition}")
    return [
        Partition(kind, i, {"start": start, "end": min(start + samples_per_partition, total)})
        for i, start in enumerate(range(0, total, samples_per_partition))
    ]


def require_debian_path(path: str, package: str) -> None:
    """Raise a clear error naming the Debian package when a built-in source's files are absent."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: install the Debian package '{package}' (apt-get install {package}) "
            "or set source.path to its location"
        )


# Import the built-in kinds so that they register themselves (after SOURCES exists).
from tessera.data_pipeline.sources import emoji_src, folder, openclipart, urls, webdataset_src  # noqa: E402,F401
