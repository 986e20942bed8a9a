"""Bad-input corpus: every kind has a documented outcome, and written + rejected == inputs.

Local files go through the ``folder`` source (sidecar .txt captions are raw bytes, so caption byte
checks and UTF-8 decoding are exercised); HTTP kinds go through the ``urls`` source against the
loopback server. Within-run dedup is the driver's decision: here the duplicate pair must simply be
written with identical sha256 and phash, which is what the driver dedups on.
"""

from __future__ import annotations

import collections
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tessera.data_pipeline.process import ProcessConfig, SampleProcessor
from tessera.data_pipeline.sample import Processed, Rejected
from tessera.data_pipeline.sources import SourceConfig, UrlsSourceConfig, build_source
from tests.data_pipeline.conftest import image_bytes

# kind -> (expected status, expected reject reason or None). Checks on written samples are below.
EXPECTED: dict[str, tuple[str, str | None]] = {
    "ok_jpeg": ("written", None),
    "truncated_jpeg": ("rejected", "truncated_image"),  # load() fails; never padded with grey
    "zero_byte": ("rejected", "empty_file"),
    "not_an_image": ("rejected", "not_an_image"),  # HTML bytes with a .jpg name
    "cmyk_jpeg": ("written", None),  # converted to RGB
    "png16_alpha": ("written", None),  # 16-bit RGBA: 8-bit RGB, transparent half on the background
    "png16_gray": ("written", None),  # I;16 -> 8-bit
    "palette_transparency": ("written", None),  # P + tRNS: transparent index -> background
    "one_by_10000": ("rejected", "too_small"),  # min side 1 < 64 (checked before aspect ratio)
    "bomb_header": ("rejected", "decompression_bomb"),  # IHDR claims 100000x100000; nothing allocated
    "animated_gif": ("written", None),  # first frame (red), not the second (blue)
    "exif_rotated": ("written", None),  # stored 400x200 + orientation 6 -> written portrait, orig 200x400
    "empty_caption": ("rejected", "caption_empty"),  # whitespace only
    "non_utf8_caption": ("rejected", "caption_not_utf8"),
    "huge_caption": ("rejected", "caption_too_long"),  # 1 MB, rejected on its byte size before decoding
    "duplicate_a": ("written", None),  # same bytes as duplicate_b: equal sha256 and phash
    "duplicate_b": ("written", None),
    "http_ok": ("written", None),
    "http_404": ("rejected", "http_404"),
    "http_timeout": ("rejected", "timeout"),  # server stalls 3 s, timeout_s 0.5
    "http_redirect_loop": ("rejected", "redirect_loop"),
    "http_optout": ("rejected", "opt_out"),  # X-Robots-Tag: noai
    "http_optout_imageai": ("rejected", "opt_out"),  # X-Robots-Tag: noindex, noimageai
    "http_500": ("rejected", "http_500"),  # after the configured retries
}


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def raw_png(w: int, h: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (lets a header claim any size without allocating pixels)."""
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def png16_alpha(w: int = 128, h: int = 96) -> bytes:
    """16-bit RGBA: left half opaque red, right half fully transparent blue."""
    px = np.zeros((h, w, 4), dtype=">u2")
    px[:, : w // 2] = (65535, 0, 0, 65535)
    px[:, w // 2 :] = (0, 0, 65535, 0)
    rows = b"".join(b"\x00" + px[y].tobytes() for y in range(h))  # filter type 0 per row
    return raw_png(w, h, 16, 6, rows)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def local_corpus() -> dict[str, tuple[bytes, bytes, str]]:
    """kind -> (file bytes, caption bytes, file extension)."""
    ok = image_bytes((320, 240), seed=11)
    big = image_bytes((800, 600), seed=12)
    pal = Image.new("P", (120, 90), 0)
    pal.putpalette([255, 255, 255, 0, 128, 0] + [0] * 762)
    pal.paste(1, (0, 0, 60, 90))  # left half green (index 1), right half index 0 = transparent
    gif = [Image.new("RGB", (100, 100), c) for c in ((255, 0, 0), (0, 0, 255))]
    rotated = Image.fromarray(np.asarray(Image.open(io.BytesIO(image_bytes((400, 200), seed=13)))))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    gray16 = Image.fromarray((np.linspace(0, 65535, 200 * 150).reshape(150, 200)).astype(np.uint16))
    c = b"a caption"
    return {
        "ok_jpeg": (ok, c, "jpg"),
        "truncated_jpeg": (big[: len(big) // 2], c, "jpg"),
        "zero_byte": (b"", c, "jpg"),
        "not_an_image": (b"<html><body>404 not found</body></html>", c, "jpg"),
        "cmyk_jpeg": (_save(Image.new("CMYK", (200, 150), (0, 255, 255, 0)), "JPEG"), c, "jpg"),  # red
        "png16_alpha": (png16_alpha(), c, "png"),
        "png16_gray": (_save(gray16, "PNG"), c, "png"),
        "palette_transparency": (_save(pal, "PNG", transparency=0), c, "png"),
        "one_by_10000": (_save(Image.new("RGB", (1, 10000), (9, 9, 9)), "PNG"), c, "png"),
        "bomb_header": (raw_png(100_000, 100_000, 8, 2, b""), c, "png"),
        "animated_gif": (_save(gif[0], "GIF", save_all=True, append_images=gif[1:], duration=100), c, "gif"),
        "exif_rotated": (_save(rotated, "JPEG", exif=exif.tobytes()), c, "jpg"),
        "empty_caption": (ok, b" \n\t ", "jpg"),
        "non_utf8_caption": (ok, b"caf\xe9 \xff\xfe", "jpg"),
        "huge_caption": (ok, b"x" * 1_000_000, "jpg"),
        "duplicate_a": (big, c, "jpg"),
        "duplicate_b": (big, c, "jpg"),
    }


def http_corpus(srv) -> list[dict]:
    """Rows of a url table, each url with a programmed server behaviour."""
    img = image_bytes((300, 300), seed=21)
    routes = {
        "http_ok": {"body": img},
        "http_404": {"body": b"", "status": 404},
        "http_timeout": {"body": img, "delay_s": 3.0},
        "http_redirect_loop": {"redirect": "/http_redirect_loop"},
        "http_optout": {"body": img, "headers": {"X-Robots-Tag": "noai"}},
        "http_optout_imageai": {"body": img, "headers": {"X-Robots-Tag": "noindex, noimageai"}},
        "http_500": {"body": b"", "status": 500},
    }
    return [{"url": srv.add(f"/{k}", **v), "caption": "a caption", "kind": k} for k, v in routes.items()]


def test_bad_input_corpus(http_server, tmp_path: Path) -> None:
    files = local_corpus()
    folder = tmp_path / "corpus"
    folder.mkdir()
    for kind, (data, caption, ext) in files.items():
        (folder / f"{kind}.{ext}").write_bytes(data)
        (folder / f"{kind}.txt").write_bytes(caption)
    table = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(http_corpus(http_server)), table)

    raws = []
    for cfg in (
        SourceConfig(name="folder", path=str(folder)),
        SourceConfig(name="urls", path=str(table),
                     urls=UrlsSourceConfig(timeout_s=0.5, retries=1, backoff_s=0.01, threads=8)),
    ):
        src = build_source(cfg)
        raws += [r for p in src.partitions(5) for r in src.read(p)]
    outs = SampleProcessor(ProcessConfig()).process_batch(raws)

    # Every input is exactly one of written / rejected(reason), and the counts add up.
    assert len(outs) == len(raws) == len(EXPECTED)
    by_kind: dict[str, Processed | Rejected] = {}
    for r, o in zip(raws, outs):
        kind = r.meta.get("kind") or Path(r.meta["path"]).stem
        assert o.source_id == r.source_id if isinstance(o, Rejected) else o.meta["source_id"] == r.source_id
        by_kind[kind] = o
    assert set(by_kind) == set(EXPECTED)
    for kind, (status, reason) in EXPECTED.items():
        o = by_kind[kind]
        got = ("written", None) if isinstance(o, Processed) else ("rejected", o.reason)
        assert got == (status, reason), (kind, got, getattr(o, "detail", ""))
    written = sum(isinstance(o, Processed) for o in outs)
    reasons = collections.Counter(o.reason for o in outs if isinstance(o, Rejected))
    assert written + sum(reasons.values()) == len(raws)
    assert written == sum(s == "written" for s, _ in EXPECTED.values())

    def rgb(kind: str) -> Image.Image:
        img = Image.open(io.BytesIO(by_kind[kind].image))
        assert img.mode == "RGB"
        return img

    def pixel(kind: str, fx: float, fy: float) -> tuple[int, ...]:
        img = rgb(kind)
        return img.getpixel((int(fx * (img.width - 1)), int(fy * (img.height - 1))))

    def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 40) -> bool:
        return all(abs(x - y) <= tol for x, y in zip(a, b))

    assert close(pixel("cmyk_jpeg", 0.5, 0.5), (255, 0, 0))
    assert close(pixel("png16_alpha", 0.1, 0.5), (255, 0, 0)) and close(pixel("png16_alpha", 0.9, 0.5), (255,) * 3)
    assert close(pixel("palette_transparency", 0.1, 0.5), (0, 128, 0))
    assert close(pixel("palette_transparency", 0.9, 0.5), (255, 255, 255))
    assert close(pixel("animated_gif", 0.5, 0.5), (255, 0, 0))
    g = rgb("png16_gray").convert("L")
    assert g.getpixel((0, g.height // 2)) < g.getpixel((g.width - 1, g.height // 2))  # ramp survives
    ex = by_kind["exif_rotated"]
    assert ex.meta["orig_size"] == [200, 400] and rgb("exif_rotated").height > rgb("exif_rotated").width
    a, b = by_kind["duplicate_a"], by_kind["duplicate_b"]
    assert a.sha256 == b.sha256 and a.phash == b.phash and a.key != b.key
    assert by_kind["http_ok"].meta["url"].endswith("/http_ok")
    assert http_server.hits["/http_500"] == 2  # one retry, then counted


def test_bomb_limit_is_configurable() -> None:
    header_only = raw_png(1200, 1000, 8, 2, b"")  # 1.2 MP claimed, no pixel data
    from tessera.data_pipeline.sample import RawSample

    proc = SampleProcessor(ProcessConfig(max_pixels=1_000_000))
    out = proc.process(RawSample("t", "t:0", header_only, "c", {}))
    assert isinstance(out, Rejected) and out.reason == "decompression_bomb"
    out = SampleProcessor(ProcessConfig()).process(RawSample("t", "t:0", header_only, "c", {}))
    assert isinstance(out, Rejected) and out.reason == "truncated_image"  # passes the header, no data
