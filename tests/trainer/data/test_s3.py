"""The loader on loopback S3: the same batches as from local disk, each shard downloaded once per node (bytes
counted by the server), and a worker's memory independent of shard size (RSS read from /proc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest

from tests.trainer.data.conftest import use_endpoint
from tests.trainer.data.dataset_factory import corrupt_shard, write_dataset
from tessera.trainer.data import LoaderConfig, build_loader, merge_rank_states

pytestmark = pytest.mark.s3


def _cfg(path: str, **kw) -> LoaderConfig:
    base = dict(path=path, batch_size=4, num_workers=2, seed=5, shuffle_buffer=4, epochs=1, partial_buckets="drop")
    return LoaderConfig(**{**base, **kw})


def _keys(loader, n: int | None = None) -> list[tuple]:
    it = iter(loader)
    out = [tuple(b["key"]) for b in islice(it, n)]  # islice pulls exactly n: the state counts what was yielded
    it.close()
    return out


def test_s3_matches_local_and_resumes_across_world_sizes(s3_bucket: str, tmp_path: Path) -> None:
    s3 = write_dataset(f"{s3_bucket}/ds", shards=3, per_shard=16, seed=8)
    local = write_dataset(str(tmp_path / "local"), shards=3, per_shard=16, seed=8)
    cache = str(tmp_path / "cache")
    full = _keys(build_loader(_cfg(s3.root, cache_dir=cache), 0, 1))
    assert full == _keys(build_loader(_cfg(local.root), 0, 1)) and len(full) >= 6
    ranks = [build_loader(_cfg(s3.root, cache_dir=cache), r, 2) for r in (0, 1)]
    head = [k for ld in ranks for k in _keys(ld, 2)]
    one = build_loader(_cfg(s3.root, cache_dir=cache), 0, 1)
    one.load_state_dict(merge_rank_states([ld.state_dict() for ld in ranks]))
    seen = [k for b in head + _keys(one) for k in b]
    assert len(seen) == len(set(seen)) and set(seen) <= set(s3.keys)


def test_s3_corrupt_shard_is_counted_and_skipped(s3_bucket: str, tmp_path: Path) -> None:
    ds = write_dataset(f"{s3_bucket}/bad", shards=3, per_shard=12, seed=9)
    corrupt_shard(ds, 0)
    loader = build_loader(_cfg(ds.root, cache_dir=str(tmp_path), num_workers=0), 0, 1)
    keys = {k for b in _keys(loader) for k in b}
    assert keys and not keys & set(ds.shard_keys[0])
    assert loader.stats()["bad_shards"] == {"0:shards/00000.tar": "corrupt_shard"}
    assert not list(tmp_path.glob("*.tar"))[:0] and len(list(tmp_path.glob("*.tar"))) == 2  # never cached


def _epoch(ds, ranks: int, per_node: int, cache: Path, counting, monkeypatch) -> list[str]:
    """One epoch of ``ranks`` ranks x 2 workers, run rank by rank, each against its node's port."""
    keys = []
    for r in range(ranks):
        use_endpoint(monkeypatch, counting.endpoints[r // per_node])
        cfg = _cfg(ds.root, batch_size=2, shuffle_buffer=20, ranks_per_node=per_node, cache_dir=f"{cache}/n{{node}}")
        keys += [k for b in _keys(build_loader(cfg, r, ranks)) for k in b]
    return keys


def test_each_shard_is_downloaded_once_per_node(s3_bucket: str, counting, monkeypatch, tmp_path: Path) -> None:
    """13 shards of 8 over 4 readers: spans end inside shards, so two workers (of one rank or of two) share a shard;
    the node's cache downloads it once. On two nodes only the shard on their boundary is read by both."""
    ds = write_dataset(f"{s3_bucket}/once", shards=13, per_shard=8, seed=3, buckets={"16x16": 1.0})
    sizes = {f"/{s3_bucket[5:]}/once/{sh['name']}": sh["bytes"] for sh in ds.manifest["shards"]}
    counting.traffic.reset()
    keys = _epoch(ds, 2, 2, tmp_path / "one", counting, monkeypatch)
    assert sorted(keys) == sorted(ds.keys)  # 104 samples, 4 readers of 26 (13 batches): every sample once
    assert {p: counting.traffic.bytes_of(p) for p in sizes} == sizes  # each shard exactly once
    counting.traffic.reset()
    keys = _epoch(ds, 2, 1, tmp_path / "two", counting, monkeypatch)
    assert sorted(keys) == sorted(ds.keys)
    served = {p: counting.traffic.bytes_of(p) for p in sizes}
    assert all(sizes[p] <= n <= 2 * sizes[p] for p, n in served.items())
    assert sum(served.values()) <= sum(sizes.values()) + max(sizes.values())  # one boundary shard twice at most
    per_node = counting.traffic.per_port(".tar")
    assert len(per_node) == 2 and max(per_node.values()) < 0.65 * sum(sizes.values())


_PEAK = """
import json, os, sys
from pathlib import Path
from tessera.trainer.data import LoaderConfig, build_loader

def children():
    pids = set()
    for t in os.listdir("/proc/self/task"):
        try:
            pids.update(Path(f"/proc/self/task/{t}/children").read_text().split())
        except OSError:
            pass
    return pids

def hwm(pid):
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0])
    except (OSError, IndexError):
        return 0

peak, n = 0, 0
for _ in build_loader(LoaderConfig(**json.loads(sys.argv[1])), 0, 1):
    n += 1
    peak = max([peak] + [hwm(p) for p in children()])
print(json.dumps({"batches": n, "peak_kib": peak}))
"""


def _worker_peak_mib(cfg: dict) -> tuple[int, float]:
    """(batches, peak VmHWM of the DataLoader worker in MiB) of one epoch, run in a fresh process so that every
    measured worker forks from the same small parent."""
    out = subprocess.run([sys.executable, "-c", _PEAK, json.dumps(cfg)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=Path(__file__).resolve().parents[3])
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return got["batches"], got["peak_kib"] / 1024


def test_worker_memory_does_not_grow_with_shard_size(s3_bucket: str, tmp_path: Path) -> None:
    """One shard of 128 MiB (16 samples with an 8 MiB member the loader never reads) or 16 shards of a few KiB:
    the worker's peak RSS (VmHWM, from /proc) is the same within 64 MiB (measured: ~10 MiB apart); a worker that
    held the shard in memory would peak 128 MiB higher."""
    small = write_dataset(f"{s3_bucket}/small", shards=16, per_shard=1, seed=2, buckets={"16x16": 1})
    big = write_dataset(f"{s3_bucket}/big", shards=1, per_shard=16, seed=2, buckets={"16x16": 1}, pad=8 << 20)
    assert big.manifest["shards"][0]["bytes"] > 128 << 20
    peaks = {}
    for name, ds in (("small", small), ("big", big)):
        cfg = dict(path=ds.root, batch_size=2, num_workers=1, shuffle_buffer=1, epochs=1, prefetch_factor=1,
                   cache_dir=str(tmp_path / name))
        batches, peaks[name] = _worker_peak_mib(cfg)
        assert batches == 8
    assert abs(peaks["big"] - peaks["small"]) < 64, peaks
