"""Where a sample's time goes in ingest: the previous PIL pipeline vs today's, stage by stage.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ingest_profile.py [--images 600] [--resample area] [--repeats 3]

Both pipelines run in this process over the same cached JPEGs (``bench/ingest_data.py``), bucketed at
256 px, alternating (previous, today, ...) through ``bench/harness.py``. Each run is one pass over the
images; its value is CPU ms per sample (``time.process_time``, steadier than wall time on a shared
machine), and its details hold the per-stage split. Tar writing (``TarShardWriter``, three members per
sample, as the staging and final shards each do) is timed once for the encoded samples. Download, HTTP
and Ray costs are not here: see ``bench/ray_overhead.py`` and ``bench/ingest_vs_img2dataset.py``.

The previous pipeline is kept below as it was (PIL draft decode, exif_transpose, convert, pHash with
scipy's DCT on the full decoded image, PIL resize with reducing_gap, PIL JPEG save), as the baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Comparison, Report  # noqa: E402
from ingest_data import build_images  # noqa: E402

_PREVIOUS_FILTER = {"lanczos": Image.Resampling.LANCZOS, "area": Image.Resampling.BOX,
                    "bicubic": Image.Resampling.BICUBIC}


def previous_phash(img: Image.Image) -> int:
    """The previous pHash: PIL LANCZOS to 32x32 grayscale of the full decoded image, scipy dctn."""
    from scipy.fft import dctn

    gray = img.convert("L").resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=2.0)
    coeffs = dctn(np.asarray(gray, dtype=np.float64), type=2, norm="ortho")[:8, :8]
    return int.from_bytes(np.packbits((coeffs > np.median(coeffs)).ravel()).tobytes(), "big")


def previous_pipeline(data: bytes, table, resample: str, clock: dict) -> bytes:
    """The previous per-sample image path (PIL throughout), adding each stage's seconds to ``clock``."""
    from PIL import ImageOps

    from tessera.data_pipeline import imageops
    from tessera.data_pipeline.buckets import assign_bucket

    t0 = time.process_time()
    hashlib.sha256(data).hexdigest()
    t1 = time.process_time()
    img = imageops.open_header(data, 10**9)
    w, h = imageops.oriented_size(img)
    bucket = assign_bucket(w, h, table)
    t2 = time.process_time()
    tw, th = imageops.cover_size(w, h, bucket)
    if (w, h) != img.size:
        tw, th = th, tw
    if img.size[0] >= 2 * tw and img.size[1] >= 2 * th:
        img.draft("RGB" if img.mode == "RGB" else None, (tw, th))
    img.load()
    img = ImageOps.exif_transpose(img) or img
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    t3 = time.process_time()
    previous_phash(rgb)
    t4 = time.process_time()
    x0, y0, x1, y1 = imageops.crop_box(*rgb.size, bucket)
    out = rgb.resize((bucket[1], bucket[0]), _PREVIOUS_FILTER[resample], box=(x0, y0, x1, y1), reducing_gap=3.0)
    t5 = time.process_time()
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=90)
    t6 = time.process_time()
    for stage, secs in zip(("sha256", "header+exif+bucket", "decode", "phash", "resize", "encode"),
                           (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
        clock[stage] = clock.get(stage, 0.0) + secs
    return buf.getvalue()


def current_pipeline(data: bytes, table, resample: str, clock: dict) -> bytes:
    """Today's per-sample image path (``SampleProcessor._image``'s stages), timed per stage."""
    from tessera.data_pipeline import imageops
    from tessera.data_pipeline.buckets import assign_bucket
    from tessera.data_pipeline.phash import phash

    t0 = time.process_time()
    hashlib.sha256(data).hexdigest()
    t1 = time.process_time()
    img = imageops.open_header(data, 10**9)
    w, h = imageops.oriented_size(img)
    bucket = assign_bucket(w, h, table)
    t2 = time.process_time()
    rgb = imageops.decode_rgb(data, img, imageops.cover_size(w, h, bucket), (255, 255, 255))
    t3 = time.process_time()
    out = imageops.resize_crop(rgb, bucket, resample)
    t4 = time.process_time()
    phash(out)
    t5 = time.process_time()
    encoded = imageops.encode(out, "jpg", 90)
    t6 = time.process_time()
    for stage, secs in zip(("sha256", "header+exif+bucket", "decode", "resize", "phash", "encode"),
                           (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
        clock[stage] = clock.get(stage, 0.0) + secs
    return encoded


def tar_ms_per_sample(encoded: list[bytes]) -> float:
    """CPU ms per sample to write image + caption + JSON members with the shard writer, in memory."""
    from tessera.data_pipeline.shards import TarShardWriter, sample_members

    meta = {"source": "urls", "caption": "a caption", "sha256": "0" * 64, "phash": "0" * 16, "bucket": "256x256"}
    t0 = time.process_time()
    writer = TarShardWriter(io.BytesIO())
    for i, data in enumerate(encoded):
        writer.add_sample(sample_members(f"{i:09d}", data, "jpg", "a caption", meta))
    writer.close()
    return (time.process_time() - t0) * 1e3 / len(encoded)


def main(argv: list[str] | None = None) -> int:
    """Profile both pipelines alternately; print the per-stage split; write bench/results/ingest_profile.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--resample", choices=["area", "lanczos", "bicubic"], default="area")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work-dir", default="/tmp/tessera_bench")
    args = ap.parse_args(argv)

    from tessera.data_pipeline import imageops
    from tessera.data_pipeline.buckets import BucketConfig, bucket_table

    work = Path(args.work_dir)
    img_dir = build_images(work, args.images, 2)
    names = [n for n, _ in json.loads((work / "captions.json").read_text())][: args.images]
    datas = [(img_dir / n).read_bytes() for n in names]
    table = bucket_table(BucketConfig(base_resolution=256, multiple=32))
    imageops.setup_worker(10**9)
    report = Report("ingest_profile", vars(args), ["pillow", "opencv-python", "opencv-python-headless", "simplejpeg",
                                                   "numpy", "scipy"])
    encoded: list[bytes] = []

    def run(pipeline):
        def go() -> tuple[float, dict]:
            clock: dict = {}
            t0 = time.process_time()
            out = [pipeline(d, table, args.resample, clock) for d in datas]
            total = (time.process_time() - t0) * 1e3 / len(datas)
            encoded[:] = out
            return total, {k: round(v * 1e3 / len(datas), 3) for k, v in clock.items()}
        return go

    cmp = Comparison(name=f"image stages, {len(datas)} JPEGs, resample {args.resample}", metric="CPU ms/sample",
                     higher_is_better=False, peer="previous PIL")
    result = report.compare(cmp, run(previous_pipeline), run(current_pipeline), repeats=args.repeats)
    for side in ("peer_runs", "ours_runs"):
        details = result[side]["details"]
        split = {k: round(statistics.median(d[k] for d in details), 3) for k in details[0]}
        report.note(f"stages_ms_{result[side]['label'].replace(' ', '_')}", split)
    report.note("tar_write_ms_per_sample", round(tar_ms_per_sample(encoded), 3))
    report.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
