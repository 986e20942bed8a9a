"""What runs in a DataLoader worker: one reader's batches, segment after segment, with its shards prefetched.

Worker ``d`` of ``W`` is the rank's reader ``(consumed + d) % W``: the DataLoader hands out worker batches
round-robin, so item ``i`` of a segment is batch ``i // W`` of reader ``i % W`` however far the rank had got when
the workers started. Each worker rebuilds the plan itself (pure, from the manifest), reads only its reader's
shards and decodes only its reader's samples.
"""

from __future__ import annotations

import os
import signal
import tempfile
from collections import Counter
from collections.abc import Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from tessera import storage
from tessera.trainer.data.cache import ShardCache
from tessera.trainer.data.config import LoaderConfig
from tessera.trainer.data.plan import Segment
from tessera.trainer.data.samples import BatchStats, SampleSpec, SkipSample, collate, load_sample
from tessera.trainer.data.segments import Planner, worker_batches_consumed
from tessera.trainer.data.shards import Catalog, ShardReader
from tessera.trainer.data.stream import reader_batches, windows

MiB = 1 << 20


def ignore_preemption_signals(_worker_id: int) -> None:
    """Loader workers ignore SIGTERM/SIGUSR1: a scheduler signals every process of the job, and a worker killed
    by it would crash the trainer that is finishing its step to checkpoint. The trainer stops its workers."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


def node_cache(cfg: LoaderConfig, node: int) -> ShardCache:
    """This node's shard cache, as configured."""
    root = (cfg.cache_dir or os.path.join(tempfile.gettempdir(), "tessera-shard-cache")).replace("{node}", str(node))
    os.makedirs(root, exist_ok=True)
    if cfg.cache_gb is not None:
        bound = cfg.cache_gb * 2**30
    else:  # half of the disk the cache may use, counting what it holds, so every process of the node agrees
        held = sum(e.stat().st_size for e in os.scandir(root) if e.name.endswith(".tar"))
        bound = (storage_free(root) + held) // 2
    return ShardCache(root, int(bound), part_bytes=cfg.download_part_mb * MiB, threads=cfg.download_threads,
                      lock_timeout_s=cfg.lock_timeout_s)


def storage_free(root: str) -> int:
    """Free bytes on the disk of a directory."""
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize


class RankStream(IterableDataset):
    """The batches of one rank's readers from a segment and item on; each DataLoader worker serves one reader."""

    def __init__(self, cfg: LoaderConfig, catalog: Catalog, spec: SampleSpec, planner: Planner, rank: int,
                 seg: Segment, consumed: int) -> None:
        self.cfg, self.catalog, self.spec, self.planner = cfg, catalog, spec, planner
        self.rank, self.seg, self.consumed = rank, seg, consumed

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        d = info.id if info else 0
        lay = self.planner.layout
        w = (self.consumed + d) % lay.workers
        x = self.rank * lay.workers + w
        s3 = any(storage.is_s3(u) for u in self.catalog.urls)
        cache = node_cache(self.cfg, lay.node(self.rank)) if s3 else None
        reader = ShardReader(self.catalog, verify=self.cfg.verify, seed=self.cfg.seed,
                             shuffle_size=self.cfg.shuffle_buffer, cache=cache)
        seg, start = self.seg, worker_batches_consumed(self.consumed, lay.workers, w)
        seen = Counter()
        try:
            while self.cfg.epochs is None or seg.epoch < self.cfg.epochs:
                reader.new_epoch()
                for n, k, slots, wi in self._batches(reader, seg, x, start):
                    batch = self._batch(reader, seg, k, slots)
                    batch.update(index=n, reader=w, gen=seg.gen, epoch=seg.epoch)
                    if cache is not None:  # this worker's cache counters since its last batch
                        now = cache.snapshot()
                        batch["stats"]["shard_cache"], seen = dict(now - seen), now
                    yield batch
                seg, start = self.planner.advance(seg, [x]), 0
        finally:
            reader.close()

    def _batches(self, reader: ShardReader, seg: Segment, x: int, start: int):
        """The reader's batches; on entering a window, its shards and the next ones go to the prefetcher."""
        wins = windows(self.planner.streams, seg.pieces[x], seg.window)
        shards = [list(dict.fromkeys(p[2] for p in win)) for win in wins]
        current = -1
        for n, k, slots, wi in reader_batches(self.planner.streams, seg, x, start):
            if wi != current:
                current = wi
                ahead = [s for win in shards[wi + 1:] for s in win]
                reader.retain(shards[wi])  # older shards go back to the cache (evictable) before new ones come in
                reader.keep_open = len(shards[wi]) + 1
                reader.prefetch(shards[wi] + list(dict.fromkeys(ahead))[: self.cfg.prefetch_shards])
            yield n, k, slots, wi

    def _batch(self, reader: ShardReader, seg: Segment, k: int, slots: np.ndarray) -> dict:
        """Build one batch from its slots, counting every hole."""
        bucket = self.catalog.buckets[k]
        stats, samples = BatchStats(), []
        for slot in slots:
            idx, key, reason = reader.resolve(slot, bucket)
            if key is not None:
                try:
                    samples.append(load_sample(self.spec, reader, idx, key, bucket, seg.epoch, stats))
                    continue
                except SkipSample as e:
                    reason = e.args[0]
            if not self.cfg.drop_invalid:
                raise RuntimeError(f"invalid sample in epoch {seg.epoch} ({bucket}): {reason}, slot {slot.tolist()} "
                                   f"of shard {self.catalog.names[int(slot[1])]}")
            stats.skipped[reason] += 1
        for s in samples:
            stats.variants[s["variant"]] += 1
        batch = collate(samples, bucket)
        out = stats.as_dict()
        out["samples"] = len(samples)
        out["bad_shards"], reader.new_bad = dict(reader.new_bad), []
        batch["stats"] = out
        return batch
