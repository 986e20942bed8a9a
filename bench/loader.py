"""Benchmark: samples/s of Tessera's training loader vs a plain ``webdataset`` loop over the same shards.

Both read the same local shards with the same DataLoader worker count and batch size, decode JPEGs with
PIL and convert them to float tensors in [-1, 1]. The plain loop is
``WebDataset(urls).decode("pil").to_tuple("jpg", "txt").map(to_uint8).batched(B).map(to_float)``: no verification,
no bucketing, no order plan. Through ``bench/harness.py`` the runs alternate (plain, ours, plain,
ours, ...) and the medians of wall-clock samples/s are compared; each run also records samples per
CPU-second (this process plus its joined workers), which is steadier when other jobs load the CPU.

    OMP_NUM_THREADS=1 .venv/bin/python bench/loader.py [--samples 3000] [--shards 12] [--workers 2]
        [--batch-size 32] [--repeats 3] [--data DIR]
"""

from __future__ import annotations

import argparse
import glob
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Comparison, Report  # noqa: E402


def plain_webdataset(data: str, workers: int, batch_size: int) -> int:
    """One pass of the plain webdataset loop; returns the number of samples."""
    import webdataset as wds

    def to_uint8(sample: tuple) -> tuple:
        img, txt = sample
        return torch.from_numpy(np.array(img.convert("RGB"))), txt  # (H, W, 3) uint8

    def to_float(batch: tuple) -> tuple:
        # the same conversion as ours: one float pass over the stacked batch
        return batch[0].permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0), batch[1]  # (B, 3, H, W) in [-1, 1]

    urls = sorted(glob.glob(os.path.join(data, "shards", "*.tar")))
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False)
          .decode("pil").to_tuple("jpg", "txt").map(to_uint8).batched(batch_size).map(to_float))
    dl = wds.WebLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)
    return sum(int(img.shape[0]) for img, _ in dl)


def tessera_loader(data: str, workers: int, batch_size: int) -> int:
    """One epoch of Tessera's loader (verification on, bucketed, planned order); returns samples."""
    from tessera.trainer.data import LoaderConfig, build_loader

    cfg = LoaderConfig(path=data, batch_size=batch_size, num_workers=workers, epochs=1, partial_buckets="drop",
                       shuffle_buffer=1000, caption_variants={"alt": 1.0})
    return sum(len(b["key"]) for b in build_loader(cfg, 0, 1))


def main() -> None:
    """Generate (or take) a dataset, time both loaders alternately, print samples/s and the ratio."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="an existing tessera-shards/1 dataset dir (single 256x256 bucket is fairest)")
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--shards", type=int, default=12)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.data is not None:
        return run(args, args.data)
    from tests.trainer.data.dataset_factory import write_dataset

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as data:
        t = time.perf_counter()
        write_dataset(data, shards=args.shards, per_shard=args.samples // args.shards, smooth=True,
                      buckets={f"{args.size}x{args.size}": 1.0}, variants={"alt": 1.0})
        print(f"wrote {args.samples} samples in {args.shards} shards to {data} ({time.perf_counter() - t:.1f} s)")
        return run(args, data)


def run(args: argparse.Namespace, data: str) -> None:
    """Time both loaders alternately on ``data`` and write bench/results/loader.json."""
    report = Report("loader", vars(args), ["torch", "webdataset", "pillow", "numpy"])

    def timed(fn):
        def run() -> tuple[float, dict]:
            t, c = time.perf_counter(), _cpu_seconds()
            n = fn(data, args.workers, args.batch_size)
            wall, cpu = time.perf_counter() - t, _cpu_seconds() - c
            return n / wall, {"samples": n, "seconds": round(wall, 3), "samples_per_cpu_s": round(n / cpu, 1)}
        return run

    cmp = Comparison(name=f"training loader, {args.samples} {args.size}px JPEGs, {args.workers} workers",
                     metric="samples/s", higher_is_better=True, peer="webdataset")
    result = report.compare(cmp, timed(plain_webdataset), timed(tessera_loader), repeats=args.repeats)
    per_cpu = [np.median([d["samples_per_cpu_s"] for d in result[k]["details"]]) for k in ("peer_runs", "ours_runs")]
    report.note("ratio_per_cpu_second", round(float(per_cpu[1] / per_cpu[0]), 3))
    report.note("torch_threads", torch.get_num_threads())
    report.write()


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the DataLoader workers, once joined)."""
    own = time.process_time()
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own + ch.ru_utime + ch.ru_stime


if __name__ == "__main__":
    main()
