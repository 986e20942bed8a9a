"""``emoji`` source: Noto Color Emoji glyphs drawn with PIL, captioned from the ``emoji`` package.

Order is the sorted list of fully-qualified emoji of ``emoji.EMOJI_DATA`` (deterministic for a given
package version). Glyphs the font lacks (newer Unicode versions, unsupported ZWJ sequences that
would render as several glyphs) are yielded as ``glyph_missing`` rejects, never silently skipped.
Samples are PNG bytes, so they go through the same decode path as any other input.
"""

from __future__ import annotations

import functools
import io
from typing import Iterator

from PIL import Image, ImageDraw, ImageFont

from tessera.data_pipeline.sample import RawSample
from tessera.data_pipeline.sources import SOURCES, Partition, SourceConfig, range_partitions, require_debian_path

FONT_SIZE = 109  # CBDT bitmap strikes exist only at 109 px; other sizes fail to load
GLYPH_WIDTH = 136  # advance of one emoji glyph at FONT_SIZE
_FULLY_QUALIFIED = 2  # emoji.STATUS["fully_qualified"]


def emoji_list(single_codepoint: bool = False) -> list[str]:
    """Fully-qualified emoji of the installed ``emoji`` package, sorted by codepoints."""
    import emoji

    out = [e for e, v in emoji.EMOJI_DATA.items() if v.get("status") == _FULLY_QUALIFIED]
    if single_codepoint:
        out = [e for e in out if len(e) == 1]
    return sorted(out)


def emoji_id(e: str) -> str:
    """Stable id from codepoints: '🐗' -> '1f417', '👍🏽' -> '1f44d-1f3fd'."""
    return "-".join(f"{ord(c):x}" for c in e)


def emoji_caption(e: str) -> tuple[str, str]:
    """(caption, name): ':boar:' -> ('a boar emoji', 'boar')."""
    import emoji

    name = emoji.EMOJI_DATA[e]["en"].strip(":").replace("_", " ").strip()
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name} emoji", name


@functools.lru_cache(maxsize=2)
def _font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, FONT_SIZE)


def render(e: str, font_path: str, canvas: int, background: tuple[int, int, int]) -> bytes | None:
    """PNG bytes of the emoji centred on a square canvas, or None if the font lacks the glyph."""
    font = _font(font_path)
    left, top, right, bottom = font.getbbox(e)
    # A missing glyph has an empty bitmap; an unsupported sequence falls apart into several glyphs.
    if bottom - top <= 0 or font.getlength(e) > 1.5 * GLYPH_WIDTH:
        return None
    img = Image.new("RGB", (canvas, canvas), background)
    x = (canvas - (right - left)) // 2 - left
    y = (canvas - (bottom - top)) // 2 - top
    ImageDraw.Draw(img).text((x, y), e, font=font, embedded_color=True)
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)  # fast: the pipeline re-encodes anyway
    return buf.getvalue()


class EmojiSource:
    """Every fully-qualified emoji, drawn with the Noto Color Emoji font."""

    def __init__(self, cfg: SourceConfig) -> None:
        require_debian_path(cfg.path, "fonts-noto-color-emoji")
        self.cfg, self.opts = cfg, cfg.section()
        self.items = emoji_list(self.opts.set == "single_codepoint")
        if cfg.limit is not None:
            self.items = self.items[: cfg.limit]

    def partitions(self, samples_per_partition: int) -> list[Partition]:
        """Consecutive ranges of the sorted emoji list."""
        return range_partitions("emoji", len(self.items), samples_per_partition)

    def read(self, part: Partition) -> Iterator[RawSample]:
        """Render each emoji of the range (glyph_missing when the font lacks it)."""
        bg = tuple(self.opts.background)
        for e in self.items[part.payload["start"] : part.payload["end"]]:
            sid = f"emoji:{emoji_id(e)}"
            caption, name = emoji_caption(e)
            meta = {"path": f"{self.cfg.path}#{emoji_id(e)}", "emoji": e, "captions": {"name": name}}
            data = render(e, self.cfg.path, self.opts.canvas, bg)  # type: ignore[arg-type]
            if data is None:
                yield RawSample("emoji", sid, None, caption, meta, "glyph_missing", f"{name} not in font")
            else:
                yield RawSample("emoji", sid, data, caption, meta)


@SOURCES.register("emoji")
def _build(cfg: SourceConfig) -> EmojiSource:
    return EmojiSource(cfg)
