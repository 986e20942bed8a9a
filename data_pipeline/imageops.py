"""Image operations of the per-sample stages: header checks, DCT-domain scaled decode, mode
normalisation, resize-and-centre-crop to a bucket, encode. Each raises ImageReject with the counted reason.

Pixels travel as uint8 (H, W, 3) RGB arrays. The speed comes from libjpeg-turbo: a JPEG is decoded
at 1/2, 1/4 or 1/8 scale in the DCT domain (simplejpeg, the same pixels as PIL's ``draft``), so the
resize that follows shrinks by less than 2x, which "area" does with OpenCV (see ``resize_crop``), and
JPEG output is encoded by simplejpeg. Other formats and odd JPEGs (CMYK, or anything simplejpeg
refuses) take the PIL path, which also names the reject reason of a broken file. The pixels are
checked against a full-resolution reference in tests/data_pipeline/test_resize_quality.py.
"""

from __future__ import annotations

import io
import math
import warnings

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# PIL's antialiased filters (the kernel widens with the shrink factor). "area" is not here but in OpenCV:
# PIL's BOX samples its kernel at pixel centres, which for a fractional factor is not an area average.
PIL_RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}
PIL_FORMAT = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that transpose width and height
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImageReject(Exception):
    """A bad image; ``reason`` is the counted reject reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def setup_worker(max_pixels: int) -> None:
    """Per-process settings: PIL's bomb guard no stricter than ours, single-threaded OpenCV."""
    # Parallelism comes from the executor's tasks; OpenCV's own thread pool would only oversubscribe.
    cv2.setNumThreads(1)
    # Image.open raises DecompressionBombError above 2 * MAX_IMAGE_PIXELS; our configurable limit
    # is the one that counts, so PIL's must not be lower. This is process-global on purpose.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    # A truncated file must be rejected, not silently padded with grey.
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def open_header(data: bytes, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and check the claimed size before any pixel is decoded."""
    if not data:
        raise ImageReject("empty_file")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageReject("decompression_bomb", str(e)) from None
    except UnidentifiedImageError as e:
        raise ImageReject("not_an_image", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # corrupt header chunks
        raise ImageReject("not_an_image", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageReject("not_an_image", f"size {w}x{h}")
    if w * h > max_pixels:
        raise ImageReject("decompression_bomb", f"{w}x{h} > {max_pixels} pixels")
    return img


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1-8) from the header; 1 when absent or unreadable."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a malformed EXIF block must not kill the sample; exif_transpose decides later
        return 1
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(W, H) after EXIF orientation, read from the header (no decode)."""
    w, h = img.size
    return (h, w) if exif_orientation(img) in _SWAPPING_ORIENTATIONS else (w, h)


def cover_size(w: int, h: int, bucket_hw: tuple[int, int]) -> tuple[int, int]:
    """Smallest (W, H) with the image's aspect ratio that covers the bucket."""
    bh, bw = bucket_hw
    s = max(bw / w, bh / h)
    return max(1, math.ceil(w * s)), max(1, math.ceil(h * s))


def _stored_target(img: Image.Image, target_wh: tuple[int, int]) -> tuple[int, int]:
    """target_wh in stored (pre-rotation) coordinates, where the JPEG decoder works."""
    tw, th = target_wh
    return (th, tw) if exif_orientation(img) in _SWAPPING_ORIENTATIONS else (tw, th)


def draft_factor(img: Image.Image, target_wh: tuple[int, int]) -> int:
    """1, 2, 4 or 8: the largest DCT-domain shrink keeping the image >= target_wh (PIL ``draft``'s choice)."""
    tw, th = _stored_target(img, target_wh)
    ratio = min(img.size[0] // max(tw, 1), img.size[1] // max(th, 1))
    return 8 if ratio >= 8 else 4 if ratio >= 4 else 2 if ratio >= 2 else 1


def decode(img: Image.Image, target_wh: tuple[int, int] | None) -> Image.Image:
    """PIL decode (JPEG draft-scaled to >= target_wh when shrinking), then EXIF transpose."""
    if target_wh is not None and img.format == "JPEG" and draft_factor(img, target_wh) > 1:
        # DCT-domain downscale by 1/2, 1/4 or 1/8: the JPEG decoder skips most of the work.
        img.draft("RGB" if img.mode == "RGB" else None, _stored_target(img, target_wh))
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageReject("decompression_bomb", str(e)) from None
    except (OSError, EOFError, SyntaxError, ValueError) as e:
        msg = f"{type(e).__name__}: {e}"
        truncated = isinstance(e, EOFError) or "truncated" in str(e) or "broken data stream" in str(e)
        raise ImageReject("truncated_image" if truncated else "decode_error", msg) from None
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception as e:  # noqa: BLE001 - PIL raises assorted errors on malformed EXIF
        raise ImageReject("decode_error", f"exif_transpose: {type(e).__name__}: {e}") from None


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8-bit "L" (16-bit range assumed for integer modes)."""
    arr = np.asarray(img)
    if img.mode == "F":
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo or 1.0) * 255.0
    else:  # I;16*, I: PNG stores 16-bit grayscale as 0..65535
        arr = arr.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Normalise any mode to 8-bit RGB; transparency is composited onto ``background``."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    has_alpha = img.mode in _ALPHA_MODES or "transparency" in img.info
    if not has_alpha:
        return img if img.mode == "RGB" else img.convert("RGB")
    rgba = img.convert("RGBA")  # handles P/L/RGB + tRNS transparency and premultiplied modes
    out = Image.new("RGB", rgba.size, background)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


# EXIF orientation -> the same transform as ImageOps.exif_transpose, on an (H, W, C) array.
_ORIENT = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
    6: lambda a: np.rot90(a, -1),  # ROTATE_270 (90 degrees clockwise)
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # TRANSVERSE
    8: lambda a: np.rot90(a, 1),  # ROTATE_90 (counter-clockwise)
}


def _decode_jpeg_scaled(data: bytes, img: Image.Image, target_wh: tuple[int, int]) -> np.ndarray | None:
    """libjpeg-turbo decode at 1/draft_factor scale, EXIF-oriented: (H, W, 3) uint8; None if refused."""
    k = draft_factor(img, target_wh)
    w, h = img.size
    try:
        # The smallest libjpeg scale M/8 whose output covers ceil(size / k) is exactly 1/k.
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=-(-w // k), min_height=-(-h // k))
    except ValueError:  # corrupt or truncated (strict mode): PIL's path decides and names the reason
        return None
    orientation = exif_orientation(img)
    return np.ascontiguousarray(_ORIENT[orientation](arr)) if orientation in _ORIENT else arr


def decode_rgb(data: bytes, img: Image.Image, target_wh: tuple[int, int],
               background: tuple[int, int, int]) -> np.ndarray:  # fmt: skip
    """Decode (DCT-scaled to >= target_wh when a JPEG), EXIF-orient, 8-bit RGB: (H, W, 3) uint8."""
    if img.format == "JPEG" and img.mode in ("RGB", "L"):
        arr = _decode_jpeg_scaled(data, img, target_wh)
        if arr is not None:
            return arr
    return np.asarray(to_rgb(decode(img, target_wh), background))


def _same_parity(n: int, target: float) -> int:
    """The integer in [1, n] nearest ``target`` with the parity of ``n`` (so (n - result) / 2 is whole)."""
    c = min(n, max(1, round(target)))
    if (n - c) % 2:
        c = min((x for x in (c - 1, c + 1) if 1 <= x <= n), key=lambda x: abs(x - target))
    return c


def crop_box(w: int, h: int, bucket_hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centred source box (x0, y0, x1, y1) with the bucket's aspect ratio."""
    bh, bw = bucket_hw
    s = min(w / bw, h / bh)
    cw, ch = bw * s, bh * s
    # Clamped: float rounding can put an edge at -3e-14 or w + 3e-14, which PIL rejects.
    return max(0.0, (w - cw) / 2), max(0.0, (h - ch) / 2), min(w, (w + cw) / 2), min(h, (h + ch) / 2)


def resize_crop(rgb: np.ndarray, bucket_hw: tuple[int, int], resample: str) -> np.ndarray:
    """Resize and centre-crop (H, W, 3) uint8 to exactly (bh, bw, 3) = bucket_hw in one resampling pass."""
    bh, bw = bucket_hw
    h, w = rgb.shape[:2]
    if resample == "area":
        # A whole-pixel crop centred exactly (the same parity as the side); its aspect ratio is off the
        # bucket's by under one source pixel, far below what the resize itself changes.
        x0, y0, x1, y1 = crop_box(w, h, bucket_hw)
        cw, ch = _same_parity(w, x1 - x0), _same_parity(h, y1 - y0)
        crop = rgb[(h - ch) // 2 : (h + ch) // 2, (w - cw) // 2 : (w + cw) // 2]
        # INTER_AREA averages over each output pixel's exact footprint. Below a 2x shrink (always, after
        # a JPEG's DCT-domain reduction) bilinear gives the same pixels at 1x and 2x, stays close between
        # (PSNR >= 30 dB against the exact average on a sharp photo) and costs a third: INTER_AREA
        # has no fast path for fractional factors. Enlarging, INTER_AREA is bilinear anyway.
        shrink = max(cw / bw, ch / bh)
        return cv2.resize(crop, (bw, bh), interpolation=cv2.INTER_AREA if shrink >= 2 else cv2.INTER_LINEAR)
    if resample not in PIL_RESAMPLE:
        raise ValueError(f"unknown resample {resample!r} (known: area, {', '.join(PIL_RESAMPLE)})")
    # The fractional box maps exactly onto the bucket. reducing_gap: an integer box reduce first, then
    # the filter on the remainder; quality equals a direct filter within ~1 level, for a fraction of the cost.
    img = Image.fromarray(rgb, "RGB")
    out = img.resize((bw, bh), PIL_RESAMPLE[resample], box=crop_box(w, h, bucket_hw), reducing_gap=3.0)
    return np.asarray(out)


def encode(rgb: np.ndarray, ext: str, quality: int) -> bytes:
    """Encode (H, W, 3) uint8 RGB to jpg/webp/png bytes."""
    if ext == "jpg":
        # libjpeg-turbo with PIL's defaults at this quality: 4:2:0 chroma, the accurate integer DCT.
        return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality, "RGB", "420", fastdct=False)
    buf = io.BytesIO()
    img = Image.fromarray(rgb, "RGB")
    if ext == "webp":
        img.save(buf, "WEBP", quality=quality, method=4)
    else:
        img.save(buf, "PNG", compress_level=6)
    return buf.getvalue()
