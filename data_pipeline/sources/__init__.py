"""Input sources: a registry of named sources, each splitting its input into deterministic partitions.

A partition is a JSON-serialisable description of work (row range, file list, one tar...). Reading it
yields every input exactly once, in a fixed order, failures included as ``RawSample(error=...)``, so
the accounting invariant (written + rejected == inputs) holds per partition.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Protocol

import tessera
from tessera.data_pipeline.sample import RawSample
from tessera.registry import Registry

DEFAULT_USER_AGENT = f"tessera/{tessera.__version__} (+https://github.com/tessera)"
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"  # Debian: fonts-noto-color-emoji
OPENCLIPART_ROOT = "/usr/share/openclipart/png"  # Debian: openclipart-png
_BUILTIN_PATHS = {"emoji": EMOJI_FONT, "openclipart": OPENCLIPART_ROOT}
BUILT_IN = ("urls", "folder", "webdataset", "emoji", "openclipart")


@dataclass(kw_only=True)
class UrlsSourceConfig:
    """``urls``: img2dataset-compatible tables (a .json file is one JSON array, .jsonl one object per line)."""

    format: Literal["auto", "parquet", "arrow", "csv", "csv.gz", "tsv", "tsv.gz", "txt", "txt.gz", "json", "json.gz",
                    "jsonl", "jsonl.gz"] = "auto"  # auto: from the file extension
    url_col: str = "url"
    caption_col: str = "caption"
    extra_cols: list[str] | None = None  # kept in meta; None -> every other column
    timeout_s: float = 10.0  # per connect and per read
    # Extra attempts on 429/5xx and connection errors (urllib3's Retry): exponential backoff from backoff_s with
    # jitter, or the server's Retry-After when it sends one, capped at max_retry_after_s.
    retries: int = 2
    backoff_s: float = 0.5
    backoff_jitter_s: float = 0.25
    max_retry_after_s: float = 30.0
    threads: int = 16  # concurrent downloads per partition (per worker)
    user_agent: str = DEFAULT_USER_AGENT
    max_redirects: int = 5  # more -> redirect_loop
    max_bytes: int = 64 * 2**20  # larger responses -> too_large
    # X-Robots-Tag opt-outs, as img2dataset: its default directives (noai, noimageai, noindex, noimageindex) plus these
    respect_optout: bool = True
    extra_optout_directives: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.threads < 1 or self.retries < 0 or self.timeout_s <= 0 or self.max_redirects < 0:
            raise ValueError("urls: threads >= 1, retries >= 0, timeout_s > 0 and max_redirects >= 0 are required")
        if self.backoff_s < 0 or self.backoff_jitter_s < 0 or self.max_retry_after_s < 0:
            raise ValueError("urls: backoff_s, backoff_jitter_s and max_retry_after_s must be >= 0")


@dataclass(kw_only=True)
class FolderSourceConfig:
    """``folder``: images with sidecar .txt/.json captions, or one CSV of (file, caption)."""

    captions_csv: str | None = None


@dataclass(kw_only=True)
class WebdatasetSourceConfig:
    """``webdataset``: tars of KEY.{jpg,png,...} + KEY.{txt,json}; nothing to set."""


@dataclass(kw_only=True)
class EmojiSourceConfig:
    """``emoji``: every emoji of the colour font rendered on a square canvas, captioned by its CLDR name."""

    canvas: int = 160  # square canvas side, pixels (the glyph is 136x128 at font size 109)
    set: Literal["all", "single_codepoint"] = "all"  # fully-qualified emoji, or 1 codepoint only
    background: list[int] = field(default_factory=lambda: [255, 255, 255])

    def __post_init__(self) -> None:
        if len(self.background) != 3 or any(not 0 <= c <= 255 for c in self.background):
            raise ValueError(f"emoji.background must be 3 ints in [0, 255], got {self.background}")
        if self.canvas < 136:
            raise ValueError(f"emoji.canvas must be >= 136 (the glyph width), got {self.canvas}")


@dataclass(kw_only=True)
class OpenclipartSourceConfig:
    """``openclipart``: the Debian package's PNGs, captioned from file and directory names."""

    categories: list[str] | None = None  # top-level directories (e.g. [food, animals]); None -> all


_SECTIONS = {"urls": UrlsSourceConfig, "folder": FolderSourceConfig, "webdataset": WebdatasetSourceConfig,
             "emoji": EmojiSourceConfig, "openclipart": OpenclipartSourceConfig}
# An old flat key -> where it lives now (configs written before sources had sections).
_MOVED = {f.name: f"{n}: {{{f.name}: ...}}" for n, c in _SECTIONS.items() for f in dataclasses.fields(c)}
_MOVED.update(emoji_canvas="emoji: {canvas: ...}", emoji_set="emoji: {set: ...}", background="emoji: {background: ...}")


@dataclass(kw_only=True)
class SourceConfig:
    """Where inputs come from: ``name`` picks the source, and its options live in the section of that name
    (``emoji: {canvas: 160}``), as every other component's do; a plugin source's options go in ``options``."""

    name: str = ""  # urls | folder | webdataset | emoji | openclipart, or a source an installed plugin registers
    # urls: a table file or a directory/prefix of them; folder: a directory; webdataset: a tar or a
    # directory/prefix of tars; emoji: the font file; openclipart: the PNG root. Local or s3://.
    path: str = ""
    limit: int | None = None  # first N inputs in source order (not for webdataset: tars are unsized)
    urls: UrlsSourceConfig | None = None
    folder: FolderSourceConfig | None = None
    webdataset: WebdatasetSourceConfig | None = None
    emoji: EmojiSourceConfig | None = None
    openclipart: OpenclipartSourceConfig | None = None
    options: dict[str, Any] | None = None  # a plugin source's own settings, passed to it as they are
    kind: str | None = None  # the old spelling of name: refused with what to write instead

    def __post_init__(self) -> None:
        if self.kind is not None:
            raise ValueError(f"sources: 'kind: {self.kind}' is now 'name: {self.kind}', and a source's own options "
                             f"go in its section (e.g. name: emoji, emoji: {{canvas: 160}}; name: urls, urls: "
                             "{url_col: URL, retries: 3}); path and limit stay where they are")
        if not self.name:
            raise ValueError(f"sources: name is required (one of {', '.join(BUILT_IN)}, or an installed plugin's)")
        set_sections = [n for n in _SECTIONS if getattr(self, n) is not None]
        extra = [n for n in set_sections if n != self.name]
        if extra:
            raise ValueError(f"sources: section(s) {', '.join(extra)} set but name is {self.name!r}")
        if self.options is not None and self.name in BUILT_IN:
            raise ValueError(f"sources: options is for plugin sources; {self.name!r} takes its section "
                             f"'{self.name}:' instead")
        if not self.path:
            if self.name not in _BUILTIN_PATHS:
                raise ValueError(f"sources: path is required for source {self.name!r}")
            self.path = _BUILTIN_PATHS[self.name]
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if self.limit is not None and self.name == "webdataset":
            raise ValueError("limit is not supported for source 'webdataset' (tar sizes are unknown up front)")

    def section(self) -> Any:
        """The selected built-in source's options (its defaults when the section is absent)."""
        cls = _SECTIONS.get(self.name)
        if cls is None:
            raise ValueError(f"source {self.name!r} is a plugin: its settings are source.options")
        return getattr(self, self.name) or cls()

    @staticmethod
    def moved_key(key: str) -> str | None:
        """Where an old flat source key lives now (the strict loader's hint), or None."""
        return f"it moved into the source's section: {_MOVED[key]}" if key in _MOVED else None


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
    return SOURCES.get(cfg.name)(cfg)


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


# Import the built-in sources so that they register themselves (after SOURCES exists).
from tessera.data_pipeline.sources import emoji_src, folder, openclipart, urls, webdataset_src  # noqa: E402,F401
