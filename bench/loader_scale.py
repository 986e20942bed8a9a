"""Benchmark: Tessera's loader against plain webdataset on one S3 epoch, 4 ranks x 2 workers on 2 "nodes".

Both sides read the same shards from a loopback S3 server (moto behind tests/trainer/data/s3_counting.py) that adds
``--latency-ms`` to every request and caps each response at ``--stream-mbps`` (one stream), on one port per node,
and counts the bytes it serves. The peer is webdataset's own pipeline: ``SimpleShardList(urls, seed=epoch)``,
``split_by_node``, ``split_by_worker``, each shard streamed with one GET (boto3, through tessera.storage),
``tarfile_to_samples``, ``shuffle(--shuffle)``, PIL decode, batches of ``--batch-size``. Ours: ``build_loader`` with
its node caches (cold each run), concurrent ranged GETs and prefetch, and the same shuffle window. Each side runs 4
rank processes at once (RANK/WORLD_SIZE in the env, 2 DataLoader workers each); each rank polls its workers' VmHWM
from /proc. Per run: samples/s over the slowest rank's epoch, S3 bytes per node / dataset bytes, peak worker RSS,
and a shuffle-quality statistic (mean distinct shards per batch; higher mixes more). Runs alternate (peer, ours,
...) through bench/harness.py.

    OMP_NUM_THREADS=1 .venv/bin/python bench/loader_scale.py [--shards 24] [--per-shard 64] [--size 256]
        [--pad-kb 48] [--batch-size 16] [--shuffle 256] [--latency-ms 50] [--stream-mbps 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Comparison, Report  # noqa: E402

RANKS, PER_NODE, WORKERS = 4, 2, 2

_RANK = r"""
import json, os, sys, threading, time
from pathlib import Path
import numpy as np, torch
side, args = sys.argv[1], json.loads(sys.argv[2])
rank = int(os.environ["RANK"])

def children():
    pids = set()
    for t in os.listdir("/proc/self/task"):
        try:
            pids.update(Path(f"/proc/self/task/{t}/children").read_text().split())
        except OSError:
            pass
    return pids

peak = 0
def poll():
    global peak
    while True:
        for p in children():
            try:
                peak = max(peak, int(Path(f"/proc/{p}/status").read_text().split("VmHWM:")[1].split()[0]))
            except (OSError, IndexError):
                pass
        time.sleep(0.05)

def shard_of(key):
    return int(key.split("k")[0][1:])

def webdataset_batches():
    import webdataset as wds
    from tessera import storage

    def s3_open(src):
        for sample in src:
            yield dict(sample, stream=storage.open_read(sample["url"]))

    def to_uint8(sample):
        img, key = sample
        return torch.from_numpy(np.array(img.convert("RGB"))), key

    def to_float(batch):
        return batch[0].permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0), batch[1]

    pipe = wds.DataPipeline(wds.SimpleShardList(args["urls"], seed=0), wds.split_by_node, wds.split_by_worker,
                            s3_open, wds.tariterators.tar_file_expander, wds.tariterators.group_by_keys,
                            wds.shuffle(args["shuffle"]), wds.decode("pil"),
                            wds.to_tuple("jpg", "__key__"), wds.map(to_uint8), wds.batched(args["batch_size"]),
                            wds.map(to_float))
    for img, keys in wds.WebLoader(pipe, batch_size=None, num_workers=args["workers"], prefetch_factor=2):
        yield list(keys)

def tessera_batches():
    from tessera.trainer.data import LoaderConfig, build_loader
    cfg = LoaderConfig(path=args["root"], batch_size=args["batch_size"], num_workers=args["workers"], epochs=1,
                       shuffle_buffer=args["shuffle"], partial_buckets="drop", caption_variants={"alt": 1.0},
                       ranks_per_node=args["per_node"], cache_dir=args["cache"] + "/node{node}")
    for b in build_loader(cfg, rank, int(os.environ["WORLD_SIZE"])):
        yield b["key"]

print("ready", flush=True)
sys.stdin.readline()
threading.Thread(target=poll, daemon=True).start()
t0 = time.perf_counter()
n, distinct, batches = 0, [], 0
for keys in (webdataset_batches() if side == "webdataset" else tessera_batches()):
    n += len(keys)
    batches += 1
    distinct.append(len({shard_of(k) for k in keys}))
elapsed = time.perf_counter() - t0
time.sleep(0.1)
print(json.dumps({"rank": rank, "samples": n, "batches": batches, "seconds": elapsed, "peak_kib": peak,
                  "distinct_shards_per_batch": sum(distinct) / max(len(distinct), 1)}), flush=True)
"""


def epoch(side: str, args: dict, endpoints: list[str]) -> list[dict]:
    """One epoch of 4 rank processes of one side, started together; their JSON results."""
    procs = []
    for r in range(RANKS):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(RANKS), LOCAL_WORLD_SIZE=str(PER_NODE),
                   AWS_ENDPOINT_URL=endpoints[r // PER_NODE], OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK, side, json.dumps(args)], env=env, cwd=ROOT,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    out = []
    for p in procs:
        line = p.stdout.read().strip().splitlines()[-1]
        if p.wait() != 0:
            raise RuntimeError(f"{side} rank failed")
        out.append(json.loads(line))
    return out


def _figures(ranks: list[dict], srv, total: int) -> dict:
    """One run's figures from its ranks' results and the server's byte counts."""
    per_node = srv.traffic.per_port(".tar")
    return {"samples": sum(r["samples"] for r in ranks), "epoch_s": round(max(r["seconds"] for r in ranks), 2),
            "s3_bytes_per_node_over_dataset": [round(per_node.get(int(e.rsplit(":", 1)[1]), 0) / total, 3)
                                               for e in srv.endpoints],
            "s3_bytes_over_dataset": round(sum(per_node.values()) / total, 3),
            "peak_worker_rss_mib": round(max(r["peak_kib"] for r in ranks) / 1024, 1),
            "distinct_shards_per_batch": round(statistics.mean(r["distinct_shards_per_batch"] for r in ranks), 2)}


def _dataset(a: argparse.Namespace):
    """The loopback server (no latency while uploading) and the dataset on it."""
    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ.setdefault(k, v)
    from tests.trainer.data.dataset_factory import write_dataset
    from tests.trainer.data.s3_counting import CountingS3
    from tessera import storage
    from tessera.storage import s3 as s3_backend

    srv = CountingS3(ports=2).start()
    os.environ["AWS_ENDPOINT_URL"] = srv.endpoints[0]
    storage.configure(storage.StorageConfig())
    s3_backend.client().create_bucket(Bucket="bench-loader-scale")
    t = time.perf_counter()
    ds = write_dataset("s3://bench-loader-scale/ds", shards=a.shards, per_shard=a.per_shard, smooth=True,
                       buckets={f"{a.size}x{a.size}": 1.0}, variants={"alt": 1.0}, pad=a.pad_kb * 1024)
    total = sum(sh["bytes"] for sh in ds.manifest["shards"])
    print(f"wrote {a.shards} shards x {a.per_shard} samples ({total / 2**20:.1f} MiB) in "
          f"{time.perf_counter() - t:.1f} s")
    srv.latency_s, srv.bytes_per_s = a.latency_ms / 1000, a.stream_mbps * 1e6
    return srv, ds, total


def main() -> None:
    """Start the server, write the dataset, run both sides alternately, write bench/results/loader_scale.json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=24)
    ap.add_argument("--per-shard", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--pad-kb", type=int, default=48, help="an unread member per sample (like an embedding)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shuffle", type=int, default=256, help="webdataset shuffle buffer = our shuffle window")
    ap.add_argument("--latency-ms", type=float, default=50)
    ap.add_argument("--stream-mbps", type=float, default=8, help="bandwidth cap of each response, MB/s")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    srv, ds, total = _dataset(a)
    report = Report("loader_scale", vars(a), ["torch", "webdataset", "moto", "boto3"])
    tmp = tempfile.mkdtemp(prefix="bench-loader-scale-")
    figures: dict[str, list[dict]] = {"webdataset": [], "tessera": []}

    def run(side: str):
        def go():
            srv.traffic.reset()
            args = {"urls": [ds.shard_url(i) for i in range(a.shards)], "root": ds.root, "batch_size": a.batch_size,
                    "workers": WORKERS, "shuffle": a.shuffle, "per_node": PER_NODE,
                    "cache": tempfile.mkdtemp(dir=tmp)}  # cold node caches every run, as webdataset's
            fig = _figures(epoch(side, args, srv.endpoints), srv, total)
            figures[side].append(fig)
            return fig["samples"] / fig["epoch_s"], fig
        return go

    try:
        cmp = Comparison(name=f"one S3 epoch, {RANKS} ranks x {WORKERS} workers on 2 nodes, {a.latency_ms:g} ms per "
                              f"request, {a.stream_mbps:g} MB/s per stream", metric="samples/s",
                         higher_is_better=True, peer="webdataset")
        report.compare(cmp, run("webdataset"), run("tessera"), repeats=a.repeats)
        for side, runs in figures.items():
            for key in ("s3_bytes_over_dataset", "peak_worker_rss_mib", "distinct_shards_per_batch"):
                report.note(f"{side}_{key}_median", statistics.median(r[key] for r in runs))
            report.note(f"{side}_s3_bytes_per_node_over_dataset_max",
                        max(max(r["s3_bytes_per_node_over_dataset"]) for r in runs))
        report.write()
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
