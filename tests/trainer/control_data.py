"""Shapes that move: a dataset whose layout (where a shape sits and how big it is) varies while the caption names only
colour and shape, so a text-to-image base model cannot know the layout and a control branch can only learn it
from the condition. Used by the control tests and by ``bench/control.py``'s quick mode."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from tests.finetune.shapes import BACKGROUNDS, COLOURS, write_samples

SHAPES = ["square", "circle", "triangle", "diamond"]


def draw(colour: str, shape: str, size: int, rnd: random.Random) -> Image.Image:
    """One ``size`` x ``size`` image: the shape anywhere in the frame, at any of a range of sizes."""
    img = Image.new("RGB", (size, size), rnd.choice(BACKGROUNDS))
    d = ImageDraw.Draw(img)
    r = rnd.uniform(0.15, 0.3) * size
    cx, cy = rnd.uniform(r, size - r), rnd.uniform(r, size - r)
    box, c = [cx - r, cy - r, cx + r, cy + r], COLOURS[colour]
    if shape == "square":
        d.rectangle(box, fill=c)
    elif shape == "circle":
        d.ellipse(box, fill=c)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=c)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=c)
    return img


def write_moving_shapes(root: str | Path, *, n: int = 512, size: int = 32, shards: int = 4, seed: int = 0) -> Path:
    """``n`` captioned images ("a red circle") of shapes at random places and sizes, as a Tessera dataset."""
    rnd, items = random.Random(seed), []
    for i in range(n):
        colour, shape = rnd.choice(list(COLOURS)), rnd.choice(SHAPES)
        items.append((f"m{seed:02d}k{i:05d}", draw(colour, shape, size, rnd), f"a {colour} {shape}", {}))
    return write_samples(root, items, size, shards)
