"""Tessera ingest vs img2dataset on the same job: same images, cores, processes, threads, size, quality.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ingest_vs_img2dataset.py --images 2200 --processes 2 --threads 16

1. Builds (once, cached in --work-dir) real JPEGs (see ``bench/ingest_data.py``) and serves them over
   HTTP on 127.0.0.1 from a subprocess.
2. Alternates (img2dataset, tessera, ...) ``--repeats`` times through ``bench/harness.py``:
   img2dataset writes webdataset shards (256 px centre crop, area downscale, JPEG quality 90, sha256)
   with N processes x T threads; Tessera ingests the same list (urls source, Ray with N CPUs, T
   download threads per task, ~256x256-pixel aspect buckets, area resample, JPEG quality 90) and also
   computes sha256 + a 64-bit pHash, deduplicates within the run and writes a manifest.
   The rate is inputs / wall seconds. img2dataset's wall time includes its own start-up (its worker
   processes); Tessera's excludes Ray's start-up (``ensure_ray``), which is recorded per run and
   counted in a second comparison. Both tools' own output goes to ``--work-dir``/logs/.
3. Crossover: both run again on a small job (``--small`` images) to get each side's fixed cost; with
   wall(N) = fixed + N * per-sample on each side, it prints the job size from which Tessera, Ray start-up
   counted, is as fast as img2dataset (and twice as fast).
4. Ray's per-task overhead and start-up (``bench/ray_overhead.py``), and the output each side wrote
   (mean pixels and JPEG bytes per sample), are recorded in ``bench/results/ingest_vs_img2dataset.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Comparison, Report  # noqa: E402
from ingest_data import build_images, served, write_url_list  # noqa: E402


def run_img2dataset(urls: Path, out: Path, args: argparse.Namespace) -> float:
    """img2dataset wall seconds for the list (webdataset output, its multiprocessing distributor)."""
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


def run_tessera(urls: Path, out: Path, args: argparse.Namespace) -> tuple[float, dict, float]:
    """(run_ingest wall seconds, manifest, Ray start-up seconds) on a fresh embedded Ray runtime."""
    import ray

    from tessera.config import from_dict
    from tessera.data_pipeline.ingest import IngestConfig, run_ingest
    from tessera.ray_runtime import RayConfig, ensure_ray

    shutil.rmtree(out, ignore_errors=True)
    ray_cfg = {"num_cpus": args.processes, "object_store_memory_mb": 256}
    t0 = time.perf_counter()
    ensure_ray(RayConfig(**ray_cfg))
    startup = time.perf_counter() - t0
    cfg = from_dict(IngestConfig, {
        "sources": [{"name": "urls", "path": str(urls), "urls": {"threads": args.threads, "timeout_s": 10, "retries": 0}}],
        "output": str(out), "samples_per_shard": args.samples_per_shard, "executor": "ray", "ray": ray_cfg,
        "process": {"min_side": 1, "max_aspect": 100.0, "quality": 90, "resample": "area",
                    "buckets": {"base_resolution": args.image_size, "multiple": 32}},
    }, "bench")  # fmt: skip
    try:
        t0 = time.perf_counter()
        manifest = run_ingest(cfg)
        return time.perf_counter() - t0, manifest, startup
    finally:
        ray.shutdown()


def output_stats(out: Path) -> dict:
    """Samples, mean pixels and mean JPEG bytes per sample over the .tar shards under ``out``."""
    from PIL import Image

    n, pixels, nbytes = 0, 0, 0
    for tar_path in sorted(out.rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for info in tar:
                if info.name.endswith(".jpg"):
                    data = tar.extractfile(info).read()
                    w, h = Image.open(io.BytesIO(data)).size
                    n, pixels, nbytes = n + 1, pixels + w * h, nbytes + len(data)
    return {"samples": n, "mean_pixels": round(pixels / max(n, 1)), "mean_jpeg_bytes": round(nbytes / max(n, 1))}


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Send this process's (and its children's) stdout and stderr to ``log``: both tools print progress."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def make_sides(work: Path, urls: Path, n: int, args: argparse.Namespace, record: dict):
    """The two run callables for ``n`` inputs; each returns (samples/s, details). ``record`` collects walls."""
    record.update(i2d=[], tessera=[], startup=[])
    log = work / "logs" / f"{n}.log"

    def peer() -> tuple[float, dict]:
        time.sleep(args.settle)  # let the previous run's processes exit
        with output_to(log):
            secs = run_img2dataset(urls, work / "out_img2dataset", args)
        record["i2d"].append(secs)
        return n / secs, {"seconds": round(secs, 2)}

    def ours() -> tuple[float, dict]:
        time.sleep(args.settle)
        with output_to(log):
            secs, m, startup = run_tessera(urls, work / "out_tessera", args)
        record["tessera"].append(secs)
        record["startup"].append(startup)
        t = m["totals"]
        return n / secs, {"seconds": round(secs, 2), "ray_startup_s": round(startup, 2), "written": t["written"],
                          "reasons": m["reasons"]}

    return peer, ours


def crossover(fixed_t: float, per_t: float, fixed_i: float, per_i: float, factor: float) -> float | None:
    """Smallest job size N at which Tessera's wall (start-up counted) is 1/factor of img2dataset's."""
    # fixed_t + N per_t <= (fixed_i + N per_i) / factor
    if fixed_t * factor <= fixed_i:
        return 0.0
    if per_i <= factor * per_t:
        return None  # never, at this per-sample cost
    return (factor * fixed_t - fixed_i) / (per_i - factor * per_t)


def main(argv: list[str] | None = None) -> int:
    """Build and serve the images, alternate both tools, analyse start-up and the crossover, write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--images", type=int, default=2200)
    p.add_argument("--small", type=int, default=100, help="job size of the fixed-cost runs (0: skip)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--samples-per-shard", type=int, default=250)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--settle", type=float, default=1.0, help="seconds of pause before each run")
    p.add_argument("--work-dir", default="/tmp/tessera_bench")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # albumentations (imported by each img2dataset worker) otherwise asks PyPI for a newer version.
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    work = Path(args.work_dir)
    report = Report("ingest_vs_img2dataset", vars(args),
                    ["img2dataset", "ray", "pillow", "opencv-python", "opencv-python-headless", "simplejpeg", "numpy"])
    t0 = time.perf_counter()
    img_dir = build_images(work, max(args.images, args.small), args.processes)
    print(f"images ready in {time.perf_counter() - t0:.1f}s in {img_dir}", flush=True)
    with served(img_dir) as base:
        big: dict = {}
        peer, ours = make_sides(work, write_url_list(work, base, args.images), args.images, args, big)
        job = f"{args.images} JPEGs over HTTP, {args.processes} processes x {args.threads} threads"
        cmp = Comparison(name=f"ingest, {job}, Ray start-up not counted", metric="samples/s",
                         higher_is_better=True, peer="img2dataset")
        report.compare(cmp, peer, ours, repeats=args.repeats)
        report.note("output", {"img2dataset": output_stats(work / "out_img2dataset"),
                               "tessera": output_stats(work / "out_tessera")})
        with_startup = [args.images / (s + u) for s, u in zip(big["tessera"], big["startup"])]
        report.summarise(Comparison(name=f"ingest, {job}, Ray start-up counted", metric="samples/s",
                                    higher_is_better=True, peer="img2dataset"),
                         [args.images / s for s in big["i2d"]], with_startup)
        if args.small:
            small: dict = {}
            peer, ours = make_sides(work, write_url_list(work, base, args.small), args.small, args, small)
            report.compare(Comparison(name=f"ingest, {args.small} JPEGs (fixed costs)", metric="samples/s",
                                      higher_is_better=True, peer="img2dataset"), peer, ours, repeats=args.repeats)
            report_crossover(report, args, big, small)
    from ray_overhead import measure

    report.note("ray_overhead", measure(args.processes, 200, 1))
    report.write()
    return 0


def report_crossover(report: Report, args: argparse.Namespace, big: dict, small: dict) -> None:
    """Fit wall(N) = fixed + N * per-sample to each side's medians at both sizes; note the crossover sizes."""
    med = statistics.median
    dn = args.images - args.small
    per_i = (med(big["i2d"]) - med(small["i2d"])) / dn
    per_t = (med(big["tessera"]) - med(small["tessera"])) / dn
    fixed_i = med(small["i2d"]) - per_i * args.small
    fixed_t = med(small["tessera"]) - per_t * args.small + med(big["startup"] + small["startup"])
    fit = {"img2dataset": {"fixed_s": round(fixed_i, 2), "per_sample_ms": round(per_i * 1e3, 3)},
           "tessera_with_ray_startup": {"fixed_s": round(fixed_t, 2), "per_sample_ms": round(per_t * 1e3, 3)}}
    report.note("wall_model", fit)
    for factor in (1.0, 2.0):
        n = crossover(fixed_t, per_t, fixed_i, per_i, factor)
        text = "never at these per-sample costs" if n is None else f"from {n:.0f} images"
        report.note(f"tessera_{factor:g}x_img2dataset_with_startup", text)


if __name__ == "__main__":
    raise SystemExit(main())
