"""The ``attributes`` captioner: measure the image and say what was measured, appended to its caption.

    "a yellow heart emoji" -> "a yellow heart emoji, yellow and red, light tones, on a white background, square format"

No weights: the dominant colours are named by :mod:`tessera.evaluation.colour` (the one colour-naming function,
shared with colour adherence and the ``colour_match`` reward: nearest CIELAB anchor of the basic colour terms, by
foreground share, background left out); tone is the foreground's mean luma; the background is transparent, a
named uniform colour (the colour filling the border) or busy; orientation comes from the image's sides. Colour
words are what small text-to-image models learn first, and this runs offline on any CPU.
"""

from __future__ import annotations

from typing import Any

from tessera.evaluation.colour import name_colour
from tessera.recaption.captioners import CAPTIONERS, Generation
from tessera.recaption.config import AttributesConfig, CaptionerConfig

LIGHT, DARK = 0.65, 0.35  # foreground mean luma (0-1) above/below which the tones are light/dark
SQUARE_TOLERANCE = 1.1  # sides within this ratio are square
MIN_BACKGROUND = 0.05  # share of the image the background must cover to be named
MEASURE_SIDE = 128  # images are measured at most this large: shares need no more, and large images stay cheap


def measure(img: Any, cfg: AttributesConfig) -> dict:
    """What the caption will say about one PIL image: colours (name, share), tone, background, orientation."""
    import torch
    from PIL import Image

    from tessera.evaluation.colour import dominant_colours, foreground_weights, to_tensor

    width, height = img.size
    if max(width, height) > MEASURE_SIDE:
        img = img.copy()
        img.thumbnail((MEASURE_SIDE, MEASURE_SIDE), Image.BICUBIC)
    x, alpha = to_tensor(img)  # (1, 3, H, W) in [-1, 1], (1, H, W) or None
    rgb = ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)  # (1, H, W, 3)
    w = foreground_weights(rgb, alpha)[0]  # (H, W): 0 on the background, 1 on the subject
    luma = rgb[0] @ torch.tensor([0.2126, 0.7152, 0.0722])  # (H, W)
    fg = float(w.sum())
    tone = None
    if fg > 0:
        mean = float((luma * w).sum()) / fg
        tone = "light" if mean > LIGHT else "dark" if mean < DARK else None
    bg_mask = w == 0  # (H, W)
    if alpha is not None and bool((alpha[0] < 0.5).any()):
        background = "transparent"
    elif float(bg_mask.float().mean()) >= MIN_BACKGROUND:
        background = name_colour(tuple(rgb[0][bg_mask].mean(0).tolist()))
    else:
        background = "busy"
    ratio = width / height
    orientation = "square" if 1 / SQUARE_TOLERANCE <= ratio <= SQUARE_TOLERANCE else \
        "landscape" if ratio > 1 else "portrait"
    colours = [(n, round(s, 3)) for n, s in dominant_colours(img, k=cfg.max_colours, min_share=cfg.min_share)]
    return {"colours": colours, "tone": tone, "background": background, "orientation": orientation}


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def phrase(measured: dict, parts: list[str]) -> str:
    """The measured attributes in words, in the order of ``parts``."""
    out = []
    for part in parts:
        if part == "colours" and measured["colours"]:
            out.append(_and([n for n, _ in measured["colours"]]))
        elif part == "tone" and measured["tone"]:
            out.append(f"{measured['tone']} tones")
        elif part == "background":
            out.append(f"on a {measured['background']} background")
        elif part == "orientation":
            out.append(f"{measured['orientation']} format")
    return ", ".join(out)


@CAPTIONERS.register("attributes")
class AttributesCaptioner:
    """Deterministic: a retry would say the same, so rejected captions are dropped at once."""

    stochastic = False

    def __init__(self, cfg: CaptionerConfig) -> None:
        self.cfg = cfg
        self.source_variant = cfg.attributes.source

    @staticmethod
    def preparer(cfg: CaptionerConfig) -> Any:
        """The CPU half does all the work: one measurement per image."""
        a = cfg.attributes
        return lambda images: [measure(img, a) for img in images]

    def provenance(self) -> dict:
        """The captioner, the caption it extends and the parts it says."""
        a = self.cfg.attributes
        return {"captioner": "attributes", "source": a.source, "parts": list(a.parts), "max_colours": a.max_colours,
                "min_share": a.min_share}

    def generate(self, prepared: list[dict], alts: list[str], seed: int, temperature: float | None) -> list[Generation]:
        """``alt, measured words`` per image (the words alone where the caption is empty)."""
        out = []
        for measured, alt in zip(prepared, alts):
            words = phrase(measured, self.cfg.attributes.parts)
            text = ", ".join(t for t in (alt.strip(), words) if t)
            out.append(Generation(text=text, tokens=0, finish_reason="stop", detail={"measured": measured}))
        return out
