"""Fixtures for data_pipeline tests: the loopback HTTP server and small image builders."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from tests.data_pipeline.http_server import FixtureHTTPServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def image_bytes(size: tuple[int, int] = (320, 240), fmt: str = "JPEG", mode: str = "RGB", seed: int = 0,
                **save) -> bytes:  # fmt: skip
    """A textured test image (smooth gradient + blobs, so pHash has structure) encoded as ``fmt``."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 6.28)
        chans.append(127 + 120 * np.sin(fx * 6.28 * xx / w + ph) * np.cos(fy * 6.28 * yy / h))
    arr = np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)  # (H, W, 3)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


@pytest.fixture
def http_server():
    """A fresh loopback HTTP server per test."""
    with FixtureHTTPServer() as srv:
        yield srv
