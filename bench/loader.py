"""Benchmark: samples/s of Tessera's training loader vs a plain ``webdataset`` loop over the same shards.

Both read the same local shards with the same DataLoader worker count and batch size, decode JPEGs with
PIL and convert them to float tensors in [-1, 1]. The plain loop is
``WebDataset(urls).decode("pil").to_tuple("jpg", "txt").map(to_uint8).batched(B).map(to_float)``: no verification,
no bucketing, no order plan. Runs alternate (plain, ours, plain, ours, ...) because the machine is
shared; the best run of each is compared, in wall-clock samples/s and in samples per CPU-second
(this process plus its joined workers), which is steadier when other jobs load the CPU.

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
    data = args.data
    if data is None:
        from tests.trainer.data.dataset_factory import write_dataset

        data = tempfile.mkdtemp(prefix="bench-loader-")
        t = time.perf_counter()
        write_dataset(data, shards=args.shards, per_shard=args.samples // args.shards, smooth=True,
                      buckets={f"{args.size}x{args.size}": 1.0}, variants={"alt": 1.0})
        print(f"wrote {args.samples} samples in {args.shards} shards to {data} ({time.perf_counter() - t:.1f} s)")
    runs: dict[str, list[float]] = {"webdataset": [], "tessera": []}
    cpu: dict[str, list[float]] = {"webdataset": [], "tessera": []}
    counts: dict[str, int] = {}
    fns = {"webdataset": plain_webdataset, "tessera": tessera_loader}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t, c = time.perf_counter(), _cpu_seconds()
            counts[name] = fn(data, args.workers, args.batch_size)
            runs[name].append(counts[name] / (time.perf_counter() - t))
            cpu[name].append(counts[name] / (_cpu_seconds() - c))
    for name, r in runs.items():
        print(f"{name:>10}: {max(r):8.1f} samples/s best  ({', '.join(f'{x:.1f}' for x in r)}); "
              f"{max(cpu[name]):.1f} samples per CPU-second best; {counts[name]} samples")
    print(f"ratio tessera/webdataset: wall best {max(runs['tessera']) / max(runs['webdataset']):.3f}, "
          f"wall median {np.median(runs['tessera']) / np.median(runs['webdataset']):.3f}, "
          f"per CPU-second {max(cpu['tessera']) / max(cpu['webdataset']):.3f}; "
          f"workers={args.workers} batch={args.batch_size} torch threads={torch.get_num_threads()}")


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the DataLoader workers, once joined)."""
    own = time.process_time()
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own + ch.ru_utime + ch.ru_stime


if __name__ == "__main__":
    main()
