"""Colour naming on real Noto Color Emoji glyphs (as the emoji source draws them, at training size), colour
words in prompts, and the soft (differentiable) shares that the colour_match reward backpropagates through."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from tessera.data_pipeline.sources.emoji_src import render
from tessera.evaluation.colour import NAMES, colour_shares, colour_words, dominant_colours, name_colour, to_tensor
from tests.evaluation.conftest import EMOJI_FONT

KNOWN = {"❤️": "red", "😀": "yellow", "💙": "blue", "🍊": "orange", "🌳": "green", "🍆": "purple", "🐷": "pink",
         "🐻": "brown", "⚫": "black", "⚪": "white", "🩶": "grey", "🌸": "pink", "🍌": "yellow", "🐘": "grey"}


def glyph(e: str, size: int = 32) -> Image.Image:
    """The emoji centred on white, as ingest draws it, downsized to ``size`` px."""
    return Image.open(io.BytesIO(render(e, str(EMOJI_FONT), 160, (255, 255, 255)))).convert("RGB").resize(
        (size, size), Image.BICUBIC)


@pytest.mark.parametrize("e,name", list(KNOWN.items()))
def test_known_glyphs_are_named_their_colour(e, name):
    colours = dominant_colours(glyph(e))
    assert colours and colours[0][0] == name, colours


def test_the_background_is_left_out_and_transparency_respected():
    red_on_white = glyph("❤️")
    assert "white" not in dict(dominant_colours(red_on_white))
    rgba = Image.new("RGBA", (16, 16), (0, 0, 255, 0))  # fully transparent blue ...
    rgba.paste((255, 0, 0, 255), (4, 4, 12, 12))  # ... around an opaque red square
    assert dominant_colours(rgba) == [("red", 1.0)]
    busy = Image.effect_noise((32, 32), 80).convert("RGB")  # no uniform border: nothing is background
    assert sum(s for _, s in dominant_colours(busy, k=len(NAMES), min_share=0)) == pytest.approx(1.0)


def test_colour_words_in_prompts():
    assert colour_words("A Gray cat and a VIOLET flower, red red") == ["grey", "purple", "red"]
    assert colour_words("a photo of a dog") == []
    assert colour_words("a reddish fox") == []  # whole words only


def test_soft_shares_match_hard_naming_and_have_gradients():
    batch = torch.cat([to_tensor(glyph(e))[0] for e in ("❤️", "💙", "🌳")])  # (3, 3, 32, 32)
    hard = colour_shares(batch)
    soft = colour_shares(batch, temperature=1.0)
    assert torch.equal(hard.argmax(1), soft.argmax(1))
    assert torch.allclose(soft.sum(1), torch.ones(3), atol=1e-5)
    x = batch.clone().requires_grad_(True)
    share_blue = colour_shares(x, temperature=20.0)[:, NAMES.index("blue")].sum()
    share_blue.backward()
    assert x.grad.abs().sum() > 0
    step = x + 1e-3 * x.grad / x.grad.abs().max()  # a small step up the gradient makes the batch bluer
    assert colour_shares(step.detach(), temperature=20.0)[:, NAMES.index("blue")].sum() > share_blue.detach()


def test_one_colour_is_named_like_a_pixel():
    assert name_colour((0.86, 0.08, 0.12)) == "red" and name_colour((1.0, 1.0, 1.0)) == "white"
    assert name_colour((0.26, 0.26, 0.26)) == "black" and name_colour((0.1, 0.46, 0.82)) == "blue"
