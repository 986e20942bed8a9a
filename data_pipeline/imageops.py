"""Image operations of the per-sample stages: header checks, draft decode, mode normalisation,
resize-and-centre-crop to a bucket, encode. Each raises ImageReject with the counted reason."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,  # BOX over the source footprint == area averaging when shrinking
    "bicubic": Image.Resampling.BICUBIC,
}
PIL_FORMAT = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that transpose width and height
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImageReject(Exception):
    """A bad image; ``reason`` is the counted reject reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def allow_pixels(max_pixels: int) -> None:
    """Make PIL's own bomb guard no stricter than ours and stop its warning (we check ourselves)."""
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


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(W, H) after EXIF orientation, read from the header (no decode)."""
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a malformed EXIF block must not kill the sample; exif_transpose decides later
        orientation = 1
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


def cover_size(w: int, h: int, bucket_hw: tuple[int, int]) -> tuple[int, int]:
    """Smallest (W, H) with the image's aspect ratio that covers the bucket."""
    bh, bw = bucket_hw
    s = max(bw / w, bh / h)
    return max(1, math.ceil(w * s)), max(1, math.ceil(h * s))


def decode(img: Image.Image, target_wh: tuple[int, int] | None) -> Image.Image:
    """Full decode (JPEG draft-scaled to >= target_wh when shrinking), then EXIF transpose."""
    if target_wh is not None and img.format == "JPEG":
        tw, th = target_wh
        if oriented_size(img) != img.size:  # draft works in stored (pre-rotation) coordinates
            tw, th = th, tw
        if img.size[0] >= 2 * tw and img.size[1] >= 2 * th:
            # DCT-domain downscale by 1/2, 1/4 or 1/8: the JPEG decoder skips most of the work.
            img.draft("RGB" if img.mode == "RGB" else None, (tw, th))
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


def resize_crop(img: Image.Image, bucket_hw: tuple[int, int], resample: str) -> Image.Image:
    """Resize and centre-crop to exactly (H, W) = bucket_hw in one resampling pass."""
    bh, bw = bucket_hw
    w, h = img.size
    # Source box with the bucket's aspect ratio, centred; resize maps it onto the bucket.
    s = min(w / bw, h / bh)
    cw, ch = bw * s, bh * s
    # Clamped: float rounding can put an edge at -3e-14 or w + 3e-14, which PIL rejects.
    box = (max(0.0, (w - cw) / 2), max(0.0, (h - ch) / 2), min(w, (w + cw) / 2), min(h, (h + ch) / 2))
    # reducing_gap: an integer box reduce first (Image.reduce), then the filter on the remainder;
    # quality equals a direct LANCZOS within ~1 level while costing a fraction for big shrinks.
    return img.resize((bw, bh), RESAMPLE[resample], box=box, reducing_gap=3.0)


def encode(img: Image.Image, ext: str, quality: int) -> bytes:
    """Encode an RGB image to jpg/webp/png bytes."""
    buf = io.BytesIO()
    if ext == "jpg":
        img.save(buf, "JPEG", quality=quality)
    elif ext == "webp":
        img.save(buf, "WEBP", quality=quality, method=4)
    else:
        img.save(buf, "PNG", compress_level=6)
    return buf.getvalue()
