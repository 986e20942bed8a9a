"""A dataset of coloured shapes with captions that name the colour ("a red circle"), in Tessera's shard format:
what a base model learns colour words from in seconds, so preference fine-tuning has something to sharpen.

Used by the fine-tuning tests and by ``bench/preference.py``."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 20, 30), "orange": (255, 140, 0), "yellow": (255, 220, 0), "green": (0, 160, 0),
           "blue": (30, 120, 230), "purple": (150, 60, 200), "pink": (255, 105, 180), "brown": (139, 69, 19)}
SHAPES = ["square", "circle", "triangle", "ring", "cross", "diamond", "bar", "dot"]
BACKGROUNDS = [(255, 255, 255), (235, 235, 235), (40, 40, 40)]


def draw(colour: str, shape: str, size: int, rnd: random.Random) -> Image.Image:
    """One ``size`` x ``size`` image: the shape in the colour on a plain background, jittered in place and size."""
    img = Image.new("RGB", (size, size), rnd.choice(BACKGROUNDS))
    d = ImageDraw.Draw(img)
    r = rnd.uniform(0.25, 0.4) * size
    cx, cy = size / 2 + rnd.uniform(-0.1, 0.1) * size, size / 2 + rnd.uniform(-0.1, 0.1) * size
    box, c = [cx - r, cy - r, cx + r, cy + r], COLOURS[colour]
    if shape == "square":
        d.rectangle(box, fill=c)
    elif shape == "circle":
        d.ellipse(box, fill=c)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=c)
    elif shape == "ring":
        d.ellipse(box, outline=c, width=max(2, size // 8))
    elif shape == "cross":
        d.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=c)
        d.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=c)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=c)
    elif shape == "bar":
        d.rectangle([cx - r, cy - r / 2.5, cx + r, cy + r / 2.5], fill=c)
    else:
        d.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=c)
    return img


def captions(colours=None, shapes=None) -> list[str]:
    """Every "a <colour> <shape>" caption."""
    return [f"a {c} {s}" for c in (colours or COLOURS) for s in (shapes or SHAPES)]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
    tf.addfile(ti, io.BytesIO(data))


def write_shapes(root: str | Path, *, n: int = 512, size: int = 16, shards: int = 4, seed: int = 0,
                 shapes: list[str] | None = None) -> Path:
    """Write ``n`` captioned shape images as a ``tessera-shards/1`` dataset (one bucket); returns ``root``."""
    rnd, items = random.Random(seed), []
    for s in range(shards):
        for i in range(s * n // shards, (s + 1) * n // shards):
            colour, shape = rnd.choice(list(COLOURS)), rnd.choice(shapes or SHAPES)
            items.append((f"s{s:03d}k{i:05d}", draw(colour, shape, size, rnd), f"a {colour} {shape}", {}))
    return write_samples(root, items, size, shards)


def write_samples(root: str | Path, items: list[tuple[str, Image.Image, str, dict]], size: int, shards: int = 4
                  ) -> Path:
    """Write (key, image, caption, meta) samples of one ``size`` x ``size`` bucket as a ``tessera-shards/1`` dataset
    of ``shards`` shards; ``meta`` lands in each KEY.json's ``meta`` (e.g. a ``label``). Returns ``root``."""
    root, n = Path(root), len(items)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    entries, bucket = [], f"{size}x{size}"
    for s in range(shards):
        buf, count = io.BytesIO(), 0
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for key, img, cap, extra in items[s * n // shards:(s + 1) * n // shards]:
                png = io.BytesIO()
                img.save(png, format="PNG")
                meta = {"key": key, "source": "shapes", "source_id": key, "path": f"/shapes/{key}.png",
                        "orig_size": [size, size], "bucket": bucket, "sha256": "", "phash": "",
                        "captions": {"alt": cap}, "scores": {}, "meta": dict(extra)}
                _add(tf, f"{key}.png", png.getvalue())
                _add(tf, f"{key}.txt", cap.encode())
                _add(tf, f"{key}.json", json.dumps(meta).encode())
                count += 1
        data = buf.getvalue()
        (root / f"shards/{s:05d}.tar").write_bytes(data)
        (root / f"shards/{s:05d}.stats.json").write_text(json.dumps({"samples": count}))
        entries.append({"name": f"shards/{s:05d}.tar", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                        "samples": count, "buckets": {bucket: count}})
    manifest = {"format": "tessera-shards/1", "tessera_version": "0.1.0", "created": "2026-01-01T00:00:00Z",
                "source_config_hash": "shapes", "config": {}, "shards": entries,
                "totals": {"input": n, "written": n, "rejected": 0}, "reasons": {}, "buckets": {bucket: n},
                "lineage": {"source": None, "source_manifest_sha256": None}, "caches": {"emb": [], "latent": []}}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def np_image(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of an image."""
    return np.asarray(img.convert("RGB"))
