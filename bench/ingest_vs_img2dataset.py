"""Tessera ingest vs img2dataset on the same images, cores, processes and threads.

    .venv/bin/python bench/ingest_vs_img2dataset.py --images 2200 --processes 2 --threads 16

1. Builds (once, cached in --work-dir) 2,000+ real JPEGs: openclipart clip art composited on white
   and Noto emoji, re-encoded at random sizes (long side 300-1200 px), plus a parquet of url+caption.
2. Serves them from a threaded HTTP server on 127.0.0.1 (a subprocess: it does not share our GIL).
3. Runs img2dataset (webdataset output, 256 px center crop, area downscale) with N processes x T
   threads, then Tessera's ingest (urls source, Ray with N CPUs, T download threads per task, 256 px
   base-resolution aspect buckets) on the same list, and prints samples/s and the ratio.

Tessera does more work per sample than img2dataset here (sha256 + a 64-bit pHash + within-run
dedup), and Ray's start-up (seconds) is reported separately, not counted in its rate.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLIPART = "/usr/share/openclipart/png"


def _reencode(job: tuple[str, bytes | str, int, str]) -> tuple[str, str] | None:
    """Composite on white, resize so the long side is ``long_side``, save as JPEG; return (name, caption)."""
    from PIL import Image

    name, src, long_side, caption = job
    try:
        im = Image.open(src if isinstance(src, str) else io.BytesIO(src))
        im.draft("RGB", (long_side, long_side))
        im = im.convert("RGBA")
        rgb = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im).convert("RGB")
    except Exception:  # noqa: BLE001 - the odd unreadable clip art is simply not used
        return None
    w, h = rgb.size
    s = long_side / max(w, h)
    rgb = rgb.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
    rgb.save(_OUT_DIR / name, "JPEG", quality=random.Random(name).randint(80, 95))
    return name, caption


_OUT_DIR = Path(".")


def _init(out_dir: Path) -> None:
    global _OUT_DIR
    _OUT_DIR = out_dir


def build_images(work: Path, n: int, procs: int) -> Path:
    """Create ``work/images/*.jpg`` and ``work/urls.parquet`` (captions), cached across runs."""
    img_dir, table = work / "images", work / "captions.json"
    if table.exists() and len(json.loads(table.read_text())) >= n:
        return img_dir
    img_dir.mkdir(parents=True, exist_ok=True)
    from tessera.data_pipeline.sources.emoji_src import emoji_caption, emoji_list, render

    rng = random.Random(0)
    clip = sorted(str(p) for p in Path(CLIPART).rglob("*.png"))
    rng.shuffle(clip)
    n_emoji = n // 3
    jobs = []
    for i, e in enumerate(emoji_list(single_codepoint=False)[:n_emoji]):
        png = render(e, "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf", 160, (255, 255, 255))
        if png is not None:
            jobs.append((f"emoji_{i:05d}.jpg", png, rng.randint(300, 1200), emoji_caption(e)[0]))
    for i, p in enumerate(clip[: int((n - len(jobs)) * 1.05)]):  # a few spare for unreadable files
        cap = f"a clip art of {Path(p).stem.replace('_', ' ').replace('-', ' ')}"
        jobs.append((f"clip_{i:05d}.jpg", p, rng.randint(300, 1200), cap))
    with ProcessPoolExecutor(procs, initializer=_init, initargs=(img_dir,)) as pool:
        done = [r for r in pool.map(_reencode, jobs, chunksize=16) if r is not None][:n]
    table.write_text(json.dumps(done))
    return img_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(img_dir: Path) -> tuple[subprocess.Popen, str]:
    """``python -m http.server`` (ThreadingHTTPServer) bound to 127.0.0.1 in a subprocess."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(img_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, base
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("HTTP server did not start")


def write_url_list(work: Path, base: str, n: int) -> Path:
    """Parquet with ``url`` and ``caption`` columns (img2dataset's input format)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = json.loads((work / "captions.json").read_text())[:n]
    path = work / "urls.parquet"
    pq.write_table(pa.table({"url": [f"{base}/{name}" for name, _ in rows], "caption": [c for _, c in rows]}), path)
    return path


def run_img2dataset(urls: Path, out: Path, args) -> float:
    """img2dataset wall time (seconds) for the list."""
    from img2dataset import download

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    download(url_list=str(urls), input_format="parquet", url_col="url", caption_col="caption",
             output_format="webdataset", output_folder=str(out), image_size=args.image_size,
             resize_mode="center_crop", downscale_interpolation="area", encode_format="jpg", encode_quality=90,
             processes_count=args.processes, thread_count=args.threads,
             number_sample_per_shard=args.samples_per_shard, distributor="multiprocessing", timeout=10,
             retries=0, compute_hash="sha256", enable_wandb=False)
    return time.perf_counter() - t0


def img2dataset_success(out: Path) -> int:
    """Samples img2dataset wrote, from its per-shard stats files."""
    return sum(json.loads(p.read_text()).get("successes", 0) for p in out.glob("*_stats.json"))


def run_tessera(urls: Path, out: Path, args) -> tuple[float, dict, float]:
    """(wall seconds excluding Ray start-up, manifest, Ray start-up seconds)."""
    import ray

    from tessera.data_pipeline.ingest import IngestConfig, run_ingest
    from tessera.config import from_dict

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    ray.init(num_cpus=args.processes, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
    startup = time.perf_counter() - t0
    cfg = from_dict(IngestConfig, {
        "sources": [{"kind": "urls", "path": str(urls), "threads": args.threads, "timeout_s": 10, "retries": 0}],
        "output": str(out), "samples_per_shard": args.samples_per_shard, "executor": "ray",
        "process": {"min_side": 1, "max_aspect": 100.0, "quality": 90, "resample": "area",
                    "buckets": {"base_resolution": args.image_size, "multiple": 32}},
    }, "bench")  # fmt: skip
    try:
        t0 = time.perf_counter()
        manifest = run_ingest(cfg)
        return time.perf_counter() - t0, manifest, startup
    finally:
        ray.shutdown()


def main() -> int:
    """Build the images, serve them, run both tools, print samples/s and the ratio."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2200)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--samples-per-shard", type=int, default=250)
    p.add_argument("--work-dir", default="/tmp/tessera_bench")
    p.add_argument("--only", choices=["both", "tessera", "img2dataset"], default="both")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(args.work_dir)
    t0 = time.perf_counter()
    img_dir = build_images(work, args.images, args.processes)
    print(f"images ready in {time.perf_counter() - t0:.1f}s: {len(list(img_dir.glob('*.jpg')))} JPEGs in {img_dir}")
    server, base = serve(img_dir)
    try:
        urls = write_url_list(work, base, args.images)
        results = {}
        if args.only in ("both", "img2dataset"):
            secs = run_img2dataset(urls, work / "out_img2dataset", args)
            ok = img2dataset_success(work / "out_img2dataset")
            results["img2dataset"] = args.images / secs
            print(f"img2dataset: {args.images} inputs, {ok} written in {secs:.1f}s = {results['img2dataset']:.1f} samples/s")
        if args.only in ("both", "tessera"):
            secs, m, startup = run_tessera(urls, work / "out_tessera", args)
            results["tessera"] = args.images / secs
            t = m["totals"]
            print(f"tessera:     {t['input']} inputs, {t['written']} written, reasons {m['reasons']} in {secs:.1f}s "
                  f"= {results['tessera']:.1f} samples/s (+{startup:.1f}s Ray start-up, not counted)")
        if len(results) == 2:
            print(f"ratio tessera / img2dataset = {results['tessera'] / results['img2dataset']:.2f}x "
                  f"({args.processes} processes x {args.threads} threads, {os.cpu_count()} cores)")
    finally:
        server.kill()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
