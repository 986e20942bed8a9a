"""Conditions in the loader (trainer/data/samples.py): a sample's KEY.cond.<name>.png comes with it at its bucket's
size, scaled like images; a missing or undecodable one makes the sample a counted hole; one of another size is an
error naming the key."""

from __future__ import annotations

import io
import numpy as np
import pytest
from PIL import Image

from tessera.trainer.data.samples import ConditionSizeError, SkipSample, _condition, collate


def png(h: int, w: int, value: int = 255) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w), value, np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


class Members:
    """A shard index and reader over in-memory members (what ``_condition`` reads through)."""

    def __init__(self, members: dict[str, dict[str, bytes]]) -> None:
        self.data = members
        self.members = {k: dict.fromkeys(v) for k, v in members.items()}

    def read(self, idx, key: str, ext: str) -> bytes:
        return self.data[key][ext]


def test_condition_loaded_at_bucket_size_and_holes_counted():
    m = Members({"a": {"cond.canny.png": png(16, 32)}, "b": {}, "c": {"cond.canny.png": b"not a png"},
                 "d": {"cond.canny.png": png(16, 16)}})
    got = _condition(m, m, "a", "canny", "16x32")
    assert got.shape == (16, 32, 3) and got.dtype == np.uint8
    for key, reason in (("b", "missing_condition"), ("c", "bad_condition")):
        with pytest.raises(SkipSample) as e:
            _condition(m, m, key, "canny", "16x32")
        assert e.value.args[0] == reason
    with pytest.raises(ConditionSizeError, match=r"sample d: condition 'canny' \(d.cond.canny.png\) is 16x16, its "
                                                  r"bucket is 16x32"):
        _condition(m, m, "d", "canny", "16x32")


def test_collate_scales_conditions_like_images():
    base = {"key": "k", "caption": "c", "variant": "alt", "image": np.zeros((4, 4, 3), np.uint8)}
    samples = [dict(base, cond={"canny": np.full((4, 4, 3), v, np.uint8)}) for v in (0, 255)]
    c = collate(samples, "4x4")["cond"]["canny"]
    assert tuple(c.shape) == (2, 3, 4, 4) and c[0].max() == -1.0 and c[1].min() == 1.0
