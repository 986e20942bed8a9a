"""The ``attributes`` captioner on real images: Noto Color Emoji glyphs drawn as the emoji source draws them (on
white, at training size) and Debian openclipart PNGs (transparent backgrounds, several shapes)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from tessera.config import from_dict, to_dict
from tessera.data_pipeline.sources.emoji_src import render
from tessera.recaption.attributes import measure, name_colour, phrase
from tessera.recaption.captioners import build_captioner, prepare_batch
from tessera.recaption.config import AttributesConfig, CaptionerConfig

EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
CLIPART = Path("/usr/share/openclipart/png/food")
KNOWN = {"❤️": "red", "😀": "yellow", "💙": "blue", "🍊": "orange", "🌳": "green", "🍆": "purple",
         "🐷": "pink", "⚫": "black"}


def glyph_png(e: str, size: int = 32) -> bytes:
    """The emoji on white as ingest draws it, downsized to ``size`` px, as PNG bytes (what a shard holds)."""
    img = Image.open(io.BytesIO(render(e, EMOJI_FONT, 160, (255, 255, 255)))).convert("RGB")
    buf = io.BytesIO()
    img.resize((size, size), Image.BICUBIC).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def attributes() -> tuple[CaptionerConfig, object]:
    cfg = from_dict(CaptionerConfig, {"name": "attributes", "variant": "attributes"}, "test")
    return cfg, build_captioner(cfg)


def test_known_glyphs_are_captioned_with_their_colour(attributes):
    cfg, cap = attributes
    emoji = list(KNOWN)
    prepared = prepare_batch(to_dict(cfg), [glyph_png(e) for e in emoji])
    gens = cap.generate(prepared, [f"a {e} emoji" for e in emoji], seed=0, temperature=None)
    for e, g in zip(emoji, gens):
        measured = g.detail["measured"]
        assert measured["colours"][0][0] == KNOWN[e], (e, measured)
        assert measured["background"] == "white" and measured["orientation"] == "square"
        assert g.text.startswith(f"a {e} emoji, {KNOWN[e]}") and g.text.endswith("on a white background, square format")
        assert g.finish_reason == "stop"


def test_the_red_heart_caption_reads_as_the_issue_says():
    plain = {"name": "attributes", "variant": "attributes", "attributes": {"parts": ["colours", "background"],
                                                                            "max_colours": 1}}
    cap = build_captioner(from_dict(CaptionerConfig, plain, "test"))
    prepared = prepare_batch(plain, [glyph_png("❤️")])
    [g] = cap.generate(prepared, ["a red heart emoji"], seed=0, temperature=None)
    assert g.text == "a red heart emoji, red, on a white background"
    [g] = cap.generate(prepared, [""], seed=0, temperature=None)  # an image kept without a caption: words alone
    assert g.text == "red, on a white background"


def test_openclipart_transparency_orientation_and_tone():
    cfg = AttributesConfig()
    burrito = Image.open(CLIPART / "burrito_ganson.png")  # RGBA, 246x159, a yellow tortilla
    m = measure(burrito, cfg)
    assert m["background"] == "transparent" and m["orientation"] == "landscape"
    assert m["colours"][0][0] == "yellow" and m["tone"] == "light"
    cake = Image.open(CLIPART / "cake_and_candle_anton_fr_01.png")  # 794x1123
    assert measure(cake, cfg)["orientation"] == "portrait"
    on_white = Image.new("RGB", burrito.size, (255, 255, 255))
    on_white.paste(burrito, mask=burrito.getchannel("A"))
    assert measure(on_white, cfg)["background"] == "white"  # as ingest composites it
    busy = Image.effect_noise((32, 32), 80).convert("RGB")  # no uniform border
    assert measure(busy, cfg)["background"] == "busy"
    dark = Image.new("RGB", (32, 32), (255, 255, 255))
    dark.paste((20, 20, 20), (6, 6, 26, 26))
    m = measure(dark, cfg)
    assert m["tone"] == "dark" and m["colours"] == [("black", 1.0)] and m["background"] == "white"


def test_name_colour_uses_the_shared_palette():
    assert [name_colour(c) for c in [(1, 1, 1), (0, 0, 0), (0.5, 0.5, 0.5), (1, 0, 0), (0, 0, 1), (1, 0.85, 0)]] == \
        ["white", "black", "grey", "red", "blue", "yellow"]


def test_phrase_follows_the_configured_parts():
    m = {"colours": [("yellow", 0.6), ("red", 0.2), ("brown", 0.1)], "tone": "light", "background": "white",
         "orientation": "portrait"}
    assert phrase(m, ["colours", "tone", "background", "orientation"]) == \
        "yellow, red and brown, light tones, on a white background, portrait format"
    assert phrase(m, ["orientation", "colours"]) == "portrait format, yellow, red and brown"
    assert phrase({**m, "colours": [], "tone": None}, ["colours", "tone", "background"]) == "on a white background"
