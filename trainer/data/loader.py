"""Aspect-ratio-bucketed training batches from ``tessera-shards/1`` datasets, with exact, elastic resume.

Design
------
**One global order.** Each epoch's batches are a pure function of (seed, epoch, manifest, carried-in
partial buckets) (``plan.py``): shard permutation, a seeded interleaving of each shard's bucket labels,
bucketed batching over that stream. Batches name *slots* ``(order_epoch, shard, bucket, j)`` rather than
keys, so the plan needs only the manifest's per-shard bucket counts: no rank or worker reads a shard to
learn the order. The worker that builds a batch resolves each slot by reading that shard's index and a
seeded shuffle buffer over the bucket's keys (``shards.py``). The epochs' batches, concatenated, form an
infinite global stream indexed by ``g``.

**Ranks and workers.** A *segment* is (``pos``, ``skip``, ``world_size``): the global batches ``g >= pos``
not in ``skip`` are dealt round-robin, the m-th to rank ``m % world_size``. Within a rank, DataLoader
worker ``d`` of ``W`` builds the rank's items ``k + d, k + d + W, ...`` (k = consumed so far); the
DataLoader's in-order round-robin over workers then yields the rank's items in order, and the main
process checks every batch's ``g`` against the plan. Each worker decodes only its own batches' samples.

**State.** ``state_dict()`` is (segment, rank, ``consumed``) plus the epoch base the plan starts from, all
JSON. Same world size: each rank loads its own state and continues with item ``consumed``, so the batches
are exactly those of an uninterrupted run. Other world size: ``merge_rank_states`` unions what every old
rank consumed (pure integer arithmetic) into a new segment (``pos`` = first unconsumed batch, ``skip`` =
consumed ones beyond it), which the new ranks deal among themselves: nothing repeated, nothing skipped,
and a batch never changes content, only its rank. Partial buckets carried into an epoch are slots in the
plan, so they survive any resume.

**Holes.** A corrupt shard (sha256 checked on first open, before any of its samples is used), a corrupt
member, a missing caption or an undecodable image makes its slot a counted hole: the batch comes out
short. A batch whose every slot is a hole is counted (``empty_batches``) and not yielded; it still counts
as consumed, so the state stays exact.

Trade-offs: a shard may be read by several ranks/workers (each needs the few samples its batches take,
and the hash needs the whole shard), so reads are amplified up to ranks x workers, while decoding is not;
with local shards this is cheap (page cache), with S3 it costs bandwidth. The plan costs O(samples) of
numpy per epoch and process, and a resume recomputes the plans from the state's base epoch.

Iteration is infinite over epochs (``LoaderConfig.epochs`` bounds it); each batch carries its ``epoch``,
its global ``index`` and ``stats`` (this batch's counters, built in the worker); ``loader.stats()`` holds
the rank's running totals. Trainer use::

    loader = build_loader(cfg, rank, world)
    # resume: same world size -> loader.load_state_dict(my_saved_state)
    #         other world size -> loader.load_state_dict(merge_rank_states(all_saved_rank_states))
    for batch in loader: ...; ckpt["data"] = loader.state_dict()   # JSON
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tessera.trainer.data.config import LoaderConfig
from tessera.trainer.data.plan import EpochPlan, Planner, consumed_by, rank_stream
from tessera.trainer.data.samples import BatchStats, SampleSpec, SkipSample, collate, load_sample
from tessera.trainer.data.shards import Catalog, ShardReader

STATE_FORMAT = "tessera-loader/1"
COUNTERS = ("batches", "samples", "empty_batches", "variant_fallbacks", "partial_bucket_samples_carried",
            "partial_bucket_samples_dropped")


def _spec(cfg: LoaderConfig, text_encoder_id: str | None, autoencoder_id: str | None) -> SampleSpec:
    ratios = {k: v for k, v in cfg.caption_variants.items() if v > 0}
    total = sum(ratios.values())
    cum = list(np.cumsum([r / total for r in ratios.values()]))
    cum[-1] = 1.0
    fallback = cfg.variant_fallback_order or sorted(cfg.caption_variants, key=lambda v: -cfg.caption_variants[v])
    return SampleSpec(seed=cfg.seed, variants=list(ratios), cum_ratios=cum, fallback=list(fallback),
                      text_encoder_id=cfg.text_encoder or (text_encoder_id if cfg.use_precomputed else None),
                      autoencoder_id=cfg.autoencoder or (autoencoder_id if cfg.use_precomputed else None))


def _ignore_preemption_signals(_worker_id: int) -> None:
    """Loader workers ignore SIGTERM/SIGUSR1: a scheduler signals every process of the job, and a worker killed
    by it would crash the trainer that is finishing its step to checkpoint. The trainer stops its workers."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


class _RankStream(IterableDataset):
    """The batches of one rank from item ``first`` on; each DataLoader worker builds every W-th."""

    def __init__(self, loader: TrainLoader) -> None:
        self.cfg, self.catalog, self.spec = loader.cfg, loader.catalog, loader.spec
        self.planner, self.seg = loader.planner, dict(loader.segment)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        d, w = (info.id, info.num_workers) if info else (0, 1)
        reader = ShardReader(catalog=self.catalog, verify=self.cfg.verify, seed=self.cfg.seed,
                             shuffle_size=self.cfg.shuffle_buffer, s3_cache_shards=self.cfg.s3_cache_shards)
        seg, epoch = self.seg, None
        try:
            for g, plan, b in rank_stream(self.planner, pos=seg["pos"], skip=seg["skip"], world=seg["world"],
                                          rank=seg["rank"], first=seg["consumed"] + d, stride=w,
                                          end_epoch=self.cfg.epochs):
                if plan.epoch != epoch:
                    reader.new_epoch()
                    epoch = plan.epoch
                yield self._batch(reader, plan, b, g)
        finally:
            reader.close()

    def _batch(self, reader: ShardReader, plan: EpochPlan, b: int, g: int) -> dict:
        """Build global batch g (batch b of ``plan``), counting every hole."""
        bucket = self.catalog.buckets[int(plan.batch_bucket[b])]
        stats, samples = BatchStats(), []
        for slot in plan.slots(b):
            idx, key, reason = reader.resolve(slot, bucket)
            if key is not None:
                try:
                    samples.append(load_sample(self.spec, reader, idx, key, bucket, plan.epoch, stats))
                    continue
                except SkipSample as e:
                    reason = e.args[0]
            if not self.cfg.drop_invalid:
                raise RuntimeError(f"invalid sample in global batch {g} ({bucket}): {reason}, slot {slot.tolist()}")
            stats.skipped[reason] += 1
        for s in samples:
            stats.variants[s["variant"]] += 1
        batch = collate(samples, bucket)
        out = stats.as_dict()
        out["samples"] = len(samples)
        out["corrupt_shards"], reader.new_corrupt = reader.new_corrupt, []
        if b == plan.num_batches - 1:  # exactly one rank consumes an epoch's last batch
            left = int(plan.leftover.shape[0])
            out["partial_bucket_samples_" + ("carried" if self.cfg.partial_buckets == "carry" else "dropped")] = left
        batch.update(index=g, epoch=plan.epoch, stats=out)
        return batch


class TrainLoader:
    """Iterable of batch dicts for one rank, with ``state_dict``/``load_state_dict``/``stats``."""

    def __init__(self, cfg: LoaderConfig, rank: int, world_size: int, text_encoder_id: str | None = None,
                 autoencoder_id: str | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.catalog = Catalog.load(cfg.paths)
        self.spec = _spec(cfg, text_encoder_id, autoencoder_id)
        self.planner = self._planner(0, 0, np.zeros((0, 4), np.int64))
        self.segment = {"pos": 0, "skip": set(), "world": world_size, "rank": rank, "consumed": 0}
        self._stats: Counter = Counter()
        self._reasons: Counter = Counter()
        self._variants: Counter = Counter()
        self._corrupt: set[str] = set()

    def _planner(self, epoch: int, start: int, carry: np.ndarray) -> Planner:
        return Planner(counts=self.catalog.counts, seed=self.cfg.seed, batch_size=self.cfg.batch_size,
                       partial_buckets=self.cfg.partial_buckets, base_epoch=epoch, base_start=start,
                       base_carry=carry)

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict]:
        """Batches from the current position on (infinite unless ``cfg.epochs`` is set)."""
        seg = self.segment
        self.planner.epoch_of(seg["pos"])  # warm the plan cache before forking workers
        expected = rank_stream(self.planner, pos=seg["pos"], skip=seg["skip"], world=seg["world"],
                               rank=seg["rank"], first=seg["consumed"], stride=1, end_epoch=self.cfg.epochs)
        workers = self.cfg.num_workers
        dl = DataLoader(_RankStream(self), batch_size=None, num_workers=workers,
                        prefetch_factor=self.cfg.prefetch_factor if workers else None,
                        pin_memory=torch.cuda.is_available(), persistent_workers=False,
                        worker_init_fn=_ignore_preemption_signals if workers else None)
        for batch in dl:
            g = next(expected)[0]
            if batch["index"] != g:  # the DataLoader must hand out worker batches round-robin, in order
                raise RuntimeError(f"loader order broken: got global batch {batch['index']}, expected {g}")
            seg["consumed"] += 1
            self._absorb(batch["stats"])
            if not batch["key"]:
                self._stats["empty_batches"] += 1
                continue
            yield batch

    def _absorb(self, s: dict) -> None:
        self._stats["batches"] += 1
        self._stats["samples"] += s["samples"]
        self._stats["variant_fallbacks"] += s["variant_fallbacks"]
        for k in ("partial_bucket_samples_carried", "partial_bucket_samples_dropped"):
            self._stats[k] += s.get(k, 0)
        self._reasons.update(s["skipped"])
        self._variants.update(s["variants"])
        self._corrupt.update(s["corrupt_shards"])

    def stats(self) -> dict:
        """Cumulative counters of the batches this rank consumed (JSON-friendly)."""
        out = {k: int(self._stats[k]) for k in COUNTERS}
        out["skipped_samples"] = dict(self._reasons)
        out["skipped_total"] = int(sum(self._reasons.values()))
        out["variants"] = dict(self._variants)
        out["corrupt_shards"] = len(self._corrupt)
        out["corrupt_shard_names"] = sorted(self._corrupt)
        return out

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """This rank's position, JSON-serialisable; see the module docstring."""
        p = self.planner
        seg = self.segment
        return {"format": STATE_FORMAT, "fingerprint": self.catalog.fingerprint, "seed": self.cfg.seed,
                "batch_size": self.cfg.batch_size, "partial_buckets": self.cfg.partial_buckets,
                "base": {"epoch": p.base_epoch, "start": p.base_start, "carry": p.base_carry.tolist()},
                "pos": seg["pos"], "skip": sorted(seg["skip"]), "world_size": seg["world"],
                "rank": seg["rank"], "consumed": seg["consumed"],
                "stats": {"counters": dict(self._stats), "skipped": dict(self._reasons),
                          "variants": dict(self._variants), "corrupt": sorted(self._corrupt)}}

    def load_state_dict(self, state: dict) -> None:
        """Resume from this rank's own state (same world size) or a ``merge_rank_states`` result."""
        for k, mine in (("format", STATE_FORMAT), ("fingerprint", self.catalog.fingerprint),
                        ("seed", self.cfg.seed), ("batch_size", self.cfg.batch_size),
                        ("partial_buckets", self.cfg.partial_buckets)):
            if state.get(k) != mine:
                raise ValueError(f"loader state {k}={state.get(k)!r} does not match this loader ({mine!r})")
        merged = state["world_size"] is None
        if not merged and (state["world_size"], state["rank"]) != (self.world_size, self.rank):
            raise ValueError(f"state of rank {state['rank']}/{state['world_size']} cannot resume rank "
                             f"{self.rank}/{self.world_size}: pass merge_rank_states(all ranks' states)")
        base = state["base"]
        self.planner = self._planner(base["epoch"], base["start"], np.asarray(base["carry"], np.int64).reshape(-1, 4))
        self.segment = {"pos": state["pos"], "skip": set(state["skip"]), "world": self.world_size,
                        "rank": self.rank, "consumed": 0 if merged else state["consumed"]}
        if merged:  # move the base up to the epoch holding pos, so later resumes replan less
            plan = self.planner.epoch_of(state["pos"])
            self.planner = self._planner(plan.epoch, plan.start, plan.carry_in)
        st = state.get("stats", {})
        keep = not merged or self.rank == 0  # merged totals go to rank 0, so ranks still sum to the total
        self._stats = Counter(st.get("counters", {}) if keep else {})
        self._reasons = Counter(st.get("skipped", {}) if keep else {})
        self._variants = Counter(st.get("variants", {}) if keep else {})
        self._corrupt = set(st.get("corrupt", []) if keep else [])


def merge_rank_states(states: list[dict]) -> dict:
    """One world-size-portable state from every rank's state of the same run and step."""
    if not states:
        raise ValueError("merge_rank_states needs at least one state")
    first = states[0]
    world = first["world_size"]
    if world is None:
        raise ValueError("states are already merged")
    if sorted(s["rank"] for s in states) != list(range(world)):
        raise ValueError(f"need exactly one state per rank 0..{world - 1}, got ranks {[s['rank'] for s in states]}")
    for s in states:
        for k in ("format", "fingerprint", "seed", "batch_size", "partial_buckets", "base", "pos", "skip", "world_size"):
            if s[k] != first[k]:
                raise ValueError(f"rank states disagree on {k!r}: not from the same run/segment")
    skip = set(first["skip"])
    done = set(skip)
    for s in states:
        done.update(consumed_by(first["pos"], skip, world, s["rank"], s["consumed"]))
    pos = first["pos"]
    while pos in done:
        pos += 1
    stats = {"counters": Counter(), "skipped": Counter(), "variants": Counter(), "corrupt": set()}
    for s in states:
        st = s.get("stats", {})
        for k in ("counters", "skipped", "variants"):
            stats[k].update(st.get(k, {}))
        stats["corrupt"].update(st.get("corrupt", []))
    out = {k: first[k] for k in ("format", "fingerprint", "seed", "batch_size", "partial_buckets", "base")}
    out.update(pos=pos, skip=sorted(g for g in done if g > pos), world_size=None, rank=None, consumed=0,
               stats={"counters": dict(stats["counters"]), "skipped": dict(stats["skipped"]),
                      "variants": dict(stats["variants"]), "corrupt": sorted(stats["corrupt"])})
    return out


def build_loader(cfg: LoaderConfig, rank: int, world_size: int, text_encoder_id: str | None = None,
                 autoencoder_id: str | None = None) -> TrainLoader:
    """The loader of ``rank`` among ``world_size`` data-parallel ranks; batches carry the precomputed
    embeddings/latents of the given encoder ids (``cfg.text_encoder_id``/``autoencoder_id`` win when set)."""
    return TrainLoader(cfg, rank, world_size, text_encoder_id, autoencoder_id)
