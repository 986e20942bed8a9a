"""Per-sample stages, bucket table properties, pHash stability and score filters."""

from __future__ import annotations

import io
import math

import pytest
from PIL import Image

from tessera.data_pipeline.buckets import BucketConfig, assign_bucket, bucket_table
from tessera.data_pipeline.phash import hamming, phash
from tessera.data_pipeline.process import ProcessConfig, SampleProcessor
from tessera.data_pipeline.sample import Processed, RawSample, Rejected, sample_key
from tessera.data_pipeline.scoring import ScoreFilterConfig
from tessera.evaluation.rewards import REWARDS
from tests.data_pipeline.conftest import image_bytes


def raw(data: bytes | None, caption: bytes | str | None = "a picture", sid: str = "t:0", **meta) -> RawSample:
    return RawSample("test", sid, data, caption, {"url": "http://x/y.jpg", **meta})


@pytest.mark.parametrize("base,multiple", [(256, 32), (256, 16), (512, 32), (1024, 32), (1024, 16)])
def test_bucket_table_properties(base: int, multiple: int) -> None:
    table = bucket_table(BucketConfig(base_resolution=base, multiple=multiple))
    assert (base, base) in table
    assert len(set(table)) == len(table) >= 9
    for h, w in table:
        assert h % multiple == 0 and w % multiple == 0
        # Rounding to the multiple costs at most ~1 step per side: area within 12% of base^2.
        assert abs(h * w / base**2 - 1) < 0.12, (h, w)
        assert max(h / w, w / h) <= 4.0 + 1e-9
    ratios = [h / w for h, w in table]
    assert ratios == sorted(ratios)
    assert (table[0][0] < table[0][1]) and (table[-1][0] > table[-1][1])  # landscape .. portrait


def test_bucket_assignment_closest_log_ratio() -> None:
    table = bucket_table(BucketConfig())
    assert assign_bucket(500, 500, table) == (256, 256)
    h, w = assign_bucket(1920, 1080, table)  # landscape 16:9
    assert w > h and abs(math.log((h / w) / (1080 / 1920))) < 0.1
    h, w = assign_bucket(1080, 1920, table)  # portrait
    assert h > w
    custom = bucket_table(BucketConfig(ratios=[1.0, 0.5, 2.0]))
    assert custom == [(192, 352), (256, 256), (352, 192)]
    with pytest.raises(ValueError):
        BucketConfig(base_resolution=32, multiple=32)


def test_process_jpeg_end_to_end() -> None:
    data = image_bytes((640, 360), seed=1)
    out = SampleProcessor(ProcessConfig()).process(raw(data, b"  a sunset  ", extra_col=7))
    assert isinstance(out, Processed), out
    img = Image.open(io.BytesIO(out.image))
    h, w = (int(x) for x in out.bucket.split("x"))
    assert img.size == (w, h) and img.format == "JPEG" and img.mode == "RGB" and w > h
    assert out.caption == "a sunset" and out.key == sample_key("t:0") and "." not in out.key
    m = out.meta
    assert m["orig_size"] == [640, 360] and m["bucket"] == out.bucket and m["url"] == "http://x/y.jpg"
    assert m["captions"] == {"alt": "a sunset"} and m["meta"] == {"extra_col": 7} and m["scores"] == {}
    assert m["phash"] == f"{out.phash:016x}" and len(m["sha256"]) == 64


@pytest.mark.parametrize("fmt,pil", [("jpg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_output_formats(fmt: str, pil: str) -> None:
    out = SampleProcessor(ProcessConfig(image_format=fmt, quality=80)).process(raw(image_bytes()))
    assert isinstance(out, Processed) and out.ext == fmt
    assert Image.open(io.BytesIO(out.image)).format == pil


def test_caption_variants_kept() -> None:
    r = raw(image_bytes(), "short", captions={"long": "a much longer caption", "alt": "ignored"})
    out = SampleProcessor(ProcessConfig()).process(r)
    assert out.meta["captions"] == {"alt": "short", "long": "a much longer caption"}


@pytest.mark.parametrize(
    "size,reason", [((63, 200), "too_small"), ((400, 80), "aspect_ratio"), ((64, 64), None), ((256, 64), None)]
)
def test_size_filters(size: tuple[int, int], reason: str | None) -> None:
    out = SampleProcessor(ProcessConfig()).process(raw(image_bytes(size, "PNG")))
    if reason is None:
        assert isinstance(out, Processed), out
    else:
        assert isinstance(out, Rejected) and out.reason == reason


def test_draft_mode_used_for_large_jpeg() -> None:
    small = Image.open(io.BytesIO(image_bytes((600, 400))))
    buf = io.BytesIO()
    small.resize((2400, 1600), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=85)
    data = buf.getvalue()
    out = SampleProcessor(ProcessConfig()).process(raw(data))
    assert isinstance(out, Processed) and out.meta["orig_size"] == [2400, 1600]
    # The decode stage drafts to the largest 1/2^k scale that still covers the bucket's cover size.
    from tessera.data_pipeline import imageops

    img = imageops.decode(imageops.open_header(data, 10**8), imageops.cover_size(2400, 1600, (224, 320)))
    assert img.size == (600, 400)


@pytest.mark.parametrize("size", [(378, 208), (400, 223), (411, 234), (1000, 999), (97, 389)])
def test_resize_crop_exact_bucket_sizes(size: tuple[int, int]) -> None:
    # (378, 208) etc. are real openclipart sizes whose crop box once came out at x = -3e-14.
    from tessera.data_pipeline import imageops

    table = bucket_table(BucketConfig())
    bucket = assign_bucket(*size, table)
    out = imageops.resize_crop(Image.new("RGB", size, (1, 2, 3)), bucket, "lanczos")
    assert out.size == (bucket[1], bucket[0])


def test_resample_filters_all_work() -> None:
    for resample in ("lanczos", "area", "bicubic"):
        out = SampleProcessor(ProcessConfig(resample=resample)).process(raw(image_bytes((900, 700))))
        assert isinstance(out, Processed)


def test_phash_near_duplicate_stability() -> None:
    a = Image.open(io.BytesIO(image_bytes((640, 480), seed=3)))
    b_buf = io.BytesIO()
    a.resize((317, 238), Image.Resampling.BICUBIC).save(b_buf, "JPEG", quality=60)
    b = Image.open(io.BytesIO(b_buf.getvalue()))
    c = Image.open(io.BytesIO(image_bytes((640, 480), seed=4)))
    assert hamming(phash(a), phash(b)) <= 4
    assert hamming(phash(a), phash(c)) >= 16
    assert 0 <= phash(a) < 2**64


def test_score_filter_colorfulness() -> None:
    assert "colorfulness" in REWARDS
    grey = image_bytes(mode="L", fmt="PNG")
    colour = image_bytes(seed=5)
    cfg = ProcessConfig(score_filters=[ScoreFilterConfig(name="colorfulness", min=10.0)])
    outs = SampleProcessor(cfg).process_batch([raw(grey, sid="g"), raw(colour, sid="c")])
    assert isinstance(outs[0], Rejected) and outs[0].reason == "score_colorfulness"
    assert isinstance(outs[1], Processed) and outs[1].meta["scores"]["colorfulness"] > 10.0


def test_failing_scorer_is_counted_not_raised() -> None:
    class Broken:
        name = "broken"

        def score(self, images, captions):
            raise RuntimeError("boom")

    from tessera.data_pipeline.scoring import ScoreFilter

    proc = SampleProcessor(ProcessConfig(), scorers=[ScoreFilter(ScoreFilterConfig(name="broken"), Broken())])
    out = proc.process(raw(image_bytes()))
    assert isinstance(out, Rejected) and out.reason == "score_broken_error"
