"""Per-sample stages, bucket table properties, pHash stability and score filters."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageOps

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


def _large_jpeg() -> bytes:
    small = Image.open(io.BytesIO(image_bytes((600, 400))))
    buf = io.BytesIO()
    small.resize((2400, 1600), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def test_draft_mode_used_for_large_jpeg() -> None:
    data = _large_jpeg()
    out = SampleProcessor(ProcessConfig()).process(raw(data))
    assert isinstance(out, Processed) and out.meta["orig_size"] == [2400, 1600]
    # The decode stage drafts to the largest 1/2^k scale that still covers the bucket's cover size.
    from tessera.data_pipeline import imageops

    target = imageops.cover_size(2400, 1600, (224, 320))
    img = imageops.decode(imageops.open_header(data, 10**8), target)
    assert img.size == (600, 400)
    # The libjpeg-turbo path decodes at the same scale to the same pixels as PIL's draft.
    fast = imageops.decode_rgb(data, imageops.open_header(data, 10**8), target, (255, 255, 255))
    assert fast.shape == (400, 600, 3) and fast.dtype == np.uint8
    np.testing.assert_array_equal(fast, np.asarray(img.convert("RGB")))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_fast_jpeg_decode_matches_pil_with_exif_orientation(orientation: int, mode: str, monkeypatch) -> None:
    from tessera.data_pipeline import imageops

    img = Image.open(io.BytesIO(image_bytes((320, 200), seed=orientation))).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    data = buf.getvalue()
    pil = imageops.decode(imageops.open_header(data, 10**8), (64, 64)).convert("RGB")  # draft + exif_transpose
    assert pil.size == ImageOps.exif_transpose(Image.open(io.BytesIO(data))).reduce(2).size
    header = imageops.open_header(data, 10**8)
    assert imageops.exif_orientation(header) == orientation
    monkeypatch.setattr(imageops, "decode", None)  # the PIL path must not be taken for these JPEGs
    fast = imageops.decode_rgb(data, header, (64, 64), (255, 255, 255))  # (H, W, 3), drafted to 1/2
    assert fast.shape[:2] == ((100, 160) if orientation < 5 else (160, 100))
    np.testing.assert_array_equal(fast, np.asarray(pil))


def test_corrupt_jpeg_falls_back_to_pil_for_the_reason() -> None:
    from tessera.data_pipeline import imageops

    data = image_bytes((640, 480))
    cut = data[: len(data) // 2]
    with pytest.raises(imageops.ImageReject) as e:
        imageops.decode_rgb(cut, imageops.open_header(cut, 10**8), (128, 128), (255, 255, 255))
    assert e.value.reason == "truncated_image"


@pytest.mark.parametrize("size", [(378, 208), (400, 223), (411, 234), (1000, 999), (97, 389), (2000, 300)])
@pytest.mark.parametrize("resample", ["lanczos", "area", "bicubic"])
def test_resize_crop_exact_bucket_sizes(size: tuple[int, int], resample: str) -> None:
    # (378, 208) etc. are real openclipart sizes whose crop box once came out at x = -3e-14.
    from tessera.data_pipeline import imageops

    table = bucket_table(BucketConfig())
    bucket = assign_bucket(*size, table)
    rgb = np.full((size[1], size[0], 3), (1, 2, 3), np.uint8)
    out = imageops.resize_crop(rgb, bucket, resample)
    assert out.shape == (bucket[0], bucket[1], 3) and out.dtype == np.uint8
    assert (out == (1, 2, 3)).all()  # a flat image stays flat: no border or offset artefacts


def test_area_crop_is_centred() -> None:
    # A bright 2-pixel column exactly in the middle must land in the middle of the output.
    from tessera.data_pipeline import imageops

    rgb = np.zeros((300, 601, 3), np.uint8)
    rgb[:, 299:302] = 255
    out = imageops.resize_crop(rgb, (256, 256), "area")
    profile = out[:, :, 0].mean(axis=0)  # (256,)
    centre = (profile * np.arange(256)).sum() / profile.sum()
    assert abs(centre - 127.5) < 0.5


def test_resample_filters_all_work() -> None:
    for resample in ("lanczos", "area", "bicubic"):
        out = SampleProcessor(ProcessConfig(resample=resample)).process(raw(image_bytes((900, 700))))
        assert isinstance(out, Processed)


def test_phash_is_the_dct_definition() -> None:
    # 64 bits = the top-left 8x8 orthonormal DCT-II of the 32x32 area-averaged luma, above their median.
    import cv2
    from scipy.fft import dctn

    rgb = np.asarray(Image.open(io.BytesIO(image_bytes((256, 256), seed=7))))
    gray = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float64)  # (256, 256)
    small = gray.reshape(32, 8, 32, 8).mean(axis=(1, 3))  # exact 8x8 block average
    coeffs = dctn(small, type=2, norm="ortho")[:8, :8]
    bits = (coeffs > np.median(coeffs)).ravel()
    expected = int("".join("1" if b else "0" for b in bits), 2)
    assert hamming(phash(rgb), expected) <= 2  # luma/area rounding to uint8 may flip a borderline bit
    assert phash(rgb) == phash(Image.fromarray(rgb)) == phash(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))


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
