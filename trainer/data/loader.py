"""Aspect-ratio-bucketed training batches from ``tessera-shards/1`` datasets, with exact and elastic resume.

Design (long form: docs/data.md)
--------------------------------
**Shards are dealt, not batches.** Each epoch the shards, permuted by (seed, epoch), are cut into consecutive
spans, one per *reader* (a DataLoader worker of a rank), so each node reads one contiguous part of the data, each
S3 shard is downloaded once per node into its shard cache (``cache.py``) and members are streamed from the file
(``shards.py``); each reader mixes a window of its shards and forms one-bucket batches (``plan.py``,
``stream.py``). Batches name *slots*, so the plan needs only the manifest's per-shard bucket counts.

**Lockstep.** Every reader emits the same number of batches per epoch (the readers' minimum), so every rank yields
``workers x`` that many and DeepSpeed's collectives stay in step; a reader's partial buckets and surplus batches
are carried into the next epoch (pinned to that reader) or dropped, counted either way. Item ``i`` of a rank's
epoch is batch ``i // W`` of its reader ``i % W`` (the DataLoader's round-robin), and the main process checks it.

**State.** ``state_dict()`` is JSON: the segment (epoch, its per-reader counts, this rank's readers' pieces) and
how many of its items the rank consumed. Same world size and workers: each rank loads its own state and its
batches are bit for bit those of an uninterrupted run (the node count does not enter the plan). Otherwise
``merge_rank_states`` gathers, from every old reader, the samples it has not consumed -- the rest of the epoch --
and the new readers deal them among themselves: nothing repeated, nothing skipped; the rest of that epoch is
batched anew (docs/data.md says what changes).

**Holes.** A shard that is missing, cut off or corrupt, a corrupt member, a missing caption or an undecodable
image makes its slot a counted hole: the batch comes out short. A batch whose every slot is a hole is counted
(``empty_batches``) and not yielded; it still counts as consumed, so the state stays exact.

Trainer use::

    loader = build_loader(cfg, rank, world)
    # resume: loader.load_rank_states(all_saved_rank_states)   (own state or merged, as needed)
    for batch in loader: ...; ckpt["data"] = loader.state_dict()   # JSON
"""

from __future__ import annotations

import atexit
import weakref
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from tessera.trainer.data.config import LoaderConfig
from tessera.trainer.data.plan import Layout, Segment, Streams, ranks_per_node
from tessera.trainer.data.samples import SampleSpec
from tessera.trainer.data.segments import Planner, worker_batches_consumed
from tessera.trainer.data.shards import Catalog
from tessera.trainer.data.worker import RankStream, ignore_preemption_signals

STATE_FORMAT = "tessera-loader/2"
RUN_KEYS = ("format", "fingerprint", "seed", "batch_size", "partial_buckets", "shuffle_buffer")
COUNTERS = ("batches", "samples", "empty_batches", "variant_fallbacks", "partial_bucket_samples_carried",
            "partial_bucket_samples_dropped", "lockstep_samples_carried", "lockstep_samples_dropped")

# DataLoader iterators with live worker processes. The workers ignore SIGTERM (``worker.ignore_preemption_signals``),
# so when a run dies with an exception while a batch generator is suspended (its frame kept alive by the traceback),
# multiprocessing's exit handler would SIGTERM and then join them forever: the process hangs instead of exiting.
# This atexit hook, registered after multiprocessing's (torch imports it first) and so run before it, shuts them
# down the way the iterator's own ``__del__`` does.
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _shutdown_live_workers() -> None:
    for it in list(_LIVE_ITERATORS):
        getattr(it, "_shutdown_workers", lambda: None)()


def _spec(cfg: LoaderConfig, text_encoder_id: str | None, autoencoder_id: str | None) -> SampleSpec:
    ratios = {k: v for k, v in cfg.caption_variants.items() if v > 0}
    total = sum(ratios.values())
    cum = list(np.cumsum([r / total for r in ratios.values()]))
    cum[-1] = 1.0
    fallback = cfg.variant_fallback_order or sorted(cfg.caption_variants, key=lambda v: -cfg.caption_variants[v])
    return SampleSpec(seed=cfg.seed, variants=list(ratios), cum_ratios=cum, fallback=list(fallback),
                      text_encoder_id=cfg.text_encoder or (text_encoder_id if cfg.use_precomputed else None),
                      autoencoder_id=cfg.autoencoder or (autoencoder_id if cfg.use_precomputed else None),
                      conditions=list(cfg.conditions))


def planner_for(cfg: LoaderConfig, catalog: Catalog, layout: Layout) -> Planner:
    """The plan of a loader config over a catalog and layout."""
    return Planner(streams=Streams(catalog.counts, cfg.seed), seed=cfg.seed, batch_size=cfg.batch_size,
                   window=cfg.shuffle_buffer, partial_buckets=cfg.partial_buckets, layout=layout)


class TrainLoader:
    """Iterable of batch dicts for one rank, with ``state_dict``/``load_state_dict``/``stats``."""

    def __init__(self, cfg: LoaderConfig, rank: int, world_size: int, text_encoder_id: str | None = None,
                 autoencoder_id: str | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.catalog = Catalog.load(cfg.paths)
        self.spec = _spec(cfg, text_encoder_id, autoencoder_id)
        self.layout = Layout(world_size, max(cfg.num_workers, 1), ranks_per_node(cfg.ranks_per_node, world_size))
        self.planner = planner_for(cfg, self.catalog, self.layout)
        self.readers = self.layout.readers_of(rank)
        self.seg = self.planner.check(self.planner.fresh(0, None, {}, self.readers))
        self.consumed = 0  # items of self.seg this rank has consumed (W x seg.batches: all of it)
        self._stats: Counter = Counter()
        self._reasons: Counter = Counter()
        self._variants: Counter = Counter()
        self._bad: dict[str, str] = {}
        self._cache: Counter = Counter()

    # ------------------------------------------------------------------ iteration

    def _advance(self) -> None:
        """Past the end of the current segment: count its leftovers, move to the next epoch's."""
        partial, surplus = self.seg.leftover()
        mode = "carried" if self.cfg.partial_buckets == "carry" else "dropped"
        self._stats[f"partial_bucket_samples_{mode}"] += int(partial[self.readers].sum())
        self._stats[f"lockstep_samples_{mode}"] += int(surplus[self.readers].sum())
        self.seg, self.consumed = self.planner.advance(self.seg, self.readers), 0
        if self.cfg.epochs is None or self.seg.epoch < self.cfg.epochs:
            self.planner.check(self.seg)

    def _expected(self) -> Iterator[tuple[int, int, int, int]]:
        """(epoch, gen, worker, batch number) of each item this rank's DataLoader must hand out, in order. A finished
        segment is left only when the next item is asked for, so a state saved at an epoch's end is still in it."""
        w = self.layout.workers
        while self.cfg.epochs is None or self.seg.epoch < self.cfg.epochs:
            if self.consumed < w * self.seg.batches:
                yield self.seg.epoch, self.seg.gen, self.consumed % w, self.consumed // w
            else:
                self._advance()

    def __iter__(self) -> Iterator[dict]:
        """Batches from the current position on (infinite unless ``cfg.epochs`` is set)."""
        workers = self.cfg.num_workers
        stream = RankStream(self.cfg, self.catalog, self.spec, self.planner, self.rank, self.seg, self.consumed)
        dl = DataLoader(stream, batch_size=None, num_workers=workers,
                        prefetch_factor=self.cfg.prefetch_factor if workers else None,
                        pin_memory=torch.cuda.is_available(), persistent_workers=False,
                        worker_init_fn=ignore_preemption_signals if workers else None)
        expected, it = self._expected(), iter(dl)
        if workers:
            _LIVE_ITERATORS.add(it)
        try:
            for batch in it:
                want = next(expected, None)
                got = (batch["epoch"], batch["gen"], batch["reader"], batch["index"])
                if got != want:  # the DataLoader must hand out worker batches round-robin, in order
                    raise RuntimeError(f"loader order broken: got batch {got} (epoch, gen, worker, n), "
                                       f"expected {want}")
                self.consumed += 1
                self._absorb(batch["stats"])
                if not batch["key"]:
                    self._stats["empty_batches"] += 1
                    continue
                yield batch
            next(expected, None)  # count the leftovers of a bounded run's last epoch
        finally:
            # Shut the workers down now, also when an error (CacheFull) ends the loop: its traceback keeps the
            # DataLoader iterator alive, and workers that ignore SIGTERM would block the interpreter's exit joining
            # them. ``_shutdown_workers`` is what the iterator's own ``__del__`` calls.
            getattr(it, "_shutdown_workers", lambda: None)()

    def _absorb(self, s: dict) -> None:
        self._stats["batches"] += 1
        self._stats["samples"] += s["samples"]
        self._stats["variant_fallbacks"] += s["variant_fallbacks"]
        self._reasons.update(s["skipped"])
        self._variants.update(s["variants"])
        self._bad.update(s["bad_shards"])
        self._cache.update(s.get("shard_cache", {}))

    def stats(self) -> dict:
        """Cumulative counters of the batches this rank consumed (JSON-friendly)."""
        out = {k: int(self._stats[k]) for k in COUNTERS}
        out["skipped_samples"] = dict(self._reasons)
        out["skipped_total"] = int(sum(self._reasons.values()))
        out["variants"] = dict(self._variants)
        out["corrupt_shards"] = len(self._bad)
        out["corrupt_shard_names"] = sorted(self._bad)
        out["bad_shards"] = dict(self._bad)  # name -> reason (missing_shard, corrupt_shard, unreadable_shard)
        out["shard_cache"] = dict(self._cache)
        return out

    # ------------------------------------------------------------------ state

    def _run_keys(self) -> dict:
        return {"format": STATE_FORMAT, "fingerprint": self.catalog.fingerprint, "seed": self.cfg.seed,
                "batch_size": self.cfg.batch_size, "partial_buckets": self.cfg.partial_buckets,
                "shuffle_buffer": self.cfg.shuffle_buffer}

    def state_dict(self) -> dict:
        """This rank's position, JSON-serialisable; see the module docstring."""
        seg = self.seg
        return {**self._run_keys(), "merged": False, "world_size": self.world_size, "workers": self.layout.workers,
                "rank": self.rank, "epoch": seg.epoch, "gen": seg.gen, "counts": seg.counts.tolist(),
                "pieces": {str(x): seg.pieces[x] for x in self.readers}, "consumed": self.consumed,
                "stats": {"counters": dict(self._stats), "skipped": dict(self._reasons),
                          "variants": dict(self._variants), "bad": dict(self._bad), "cache": dict(self._cache)}}

    def resumes_exactly(self, state: dict) -> bool:
        """True if this rank can continue from ``state`` itself (same world size and workers, its own rank)."""
        return not state.get("merged") and (state.get("world_size"), state.get("workers"), state.get("rank")) == \
            (self.world_size, self.layout.workers, self.rank)

    def load_state_dict(self, state: dict) -> None:
        """Resume from this rank's own state (same world size and workers) or a ``merge_rank_states`` result."""
        for k, mine in self._run_keys().items():
            if state.get(k) != mine:
                raise ValueError(f"loader state {k}={state.get(k)!r} does not match this loader ({mine!r})")
        merged = bool(state["merged"])
        if not merged and not self.resumes_exactly(state):
            raise ValueError(f"state of rank {state['rank']} of {state['world_size']} x {state['workers']} workers "
                             f"cannot resume rank {self.rank} of {self.world_size} x {self.layout.workers} workers: "
                             "pass merge_rank_states(all ranks' states)")
        if merged:
            rest = _unconsumed(self.cfg, self.planner.streams, state)
            self.seg = self.planner.resumed(state["epoch"], state["gen"] + 1, rest, self.readers)
            self.consumed = 0
        else:
            pieces = {int(x): p for x, p in state["pieces"].items()}
            self.seg = Segment(epoch=state["epoch"], gen=state["gen"], counts=np.asarray(state["counts"], np.int64),
                               pieces=pieces, batch_size=self.cfg.batch_size, window=self.cfg.shuffle_buffer,
                               seed=self.cfg.seed)
            self.consumed = state["consumed"]
        st = state.get("stats", {})
        keep = not merged or self.rank == 0  # merged totals go to rank 0, so ranks still sum to the total
        self._stats = Counter(st.get("counters", {}) if keep else {})
        self._reasons = Counter(st.get("skipped", {}) if keep else {})
        self._variants = Counter(st.get("variants", {}) if keep else {})
        self._bad = dict(st.get("bad", {}) if keep else {})
        self._cache = Counter(st.get("cache", {}) if keep else {})

    def load_rank_states(self, states: list[dict]) -> None:
        """Resume from every rank's saved state: this rank's own if it resumes exactly, else their merge."""
        mine = next((s for s in states if s.get("rank") == self.rank), None)
        self.load_state_dict(mine if mine is not None and self.resumes_exactly(mine) else merge_rank_states(states))


def merge_rank_states(states: list[dict]) -> dict:
    """One layout-portable state from every rank's state of the same run and step (the new ranks deal the epoch's
    unconsumed rest among themselves when they load it). Ranks may be one epoch apart: a rank that skipped batches
    of holes runs ahead of the others."""
    if not states:
        raise ValueError("merge_rank_states needs at least one state")
    first = states[0]
    if first.get("merged"):
        raise ValueError("states are already merged")
    world = first["world_size"]
    if sorted(s["rank"] for s in states) != list(range(world)):
        raise ValueError(f"need exactly one state per rank 0..{world - 1}, got ranks {[s['rank'] for s in states]}")
    segments: dict[str, list] = {}
    for s in states:
        for k in (*RUN_KEYS, "world_size", "workers"):
            if s[k] != first[k]:
                raise ValueError(f"rank states disagree on {k!r} ({s[k]!r} vs {first[k]!r}): not from the same run")
        if segments.setdefault(f"{s['epoch']}:{s['gen']}", s["counts"]) != s["counts"]:
            raise ValueError(f"rank states disagree on the plan of epoch {s['epoch']}: not from the same run")
    epochs = {s["epoch"] for s in states}
    if max(epochs) - min(epochs) > 1 or len(segments) > len(epochs):
        raise ValueError(f"rank states are in segments {sorted(segments)} (epoch:gen): too far apart to merge")
    stats = {"counters": Counter(), "skipped": Counter(), "variants": Counter(), "bad": {}, "cache": Counter()}
    for s in states:
        st = s.get("stats", {})
        for k in ("counters", "skipped", "variants", "cache"):
            stats[k].update(st.get(k, {}))
        stats["bad"].update(st.get("bad", {}))
    old = [{k: s[k] for k in ("rank", "consumed", "pieces", "epoch", "gen")} for s in states]
    last = [s for s in states if s["epoch"] == max(epochs)][0]
    return {**{k: first[k] for k in RUN_KEYS}, "merged": True, "world_size": None, "workers": None, "rank": None,
            "epoch": last["epoch"], "gen": last["gen"], "old": {"workers": first["workers"], "segments": segments,
                                                                "ranks": old},
            "stats": {k: dict(v) for k, v in stats.items()}}


def _unconsumed(cfg: LoaderConfig, streams: Streams, state: dict) -> list[list]:
    """The pieces every old reader of a merged state has not consumed, in old reader order. A rank one epoch
    behind also brings its readers' spans of the next epoch (their carried pieces are in what it left)."""
    old, workers = state["old"], state["old"]["workers"]
    world = len(old["ranks"])
    planner = Planner(streams=streams, seed=cfg.seed, batch_size=cfg.batch_size, window=cfg.shuffle_buffer,
                      partial_buckets=cfg.partial_buckets, layout=Layout(world, workers, world))
    out: list[list] = []
    for r in sorted(old["ranks"], key=lambda r: r["rank"]):
        readers = [r["rank"] * workers + w for w in range(workers)]
        seg = Segment(epoch=r["epoch"], gen=r["gen"], counts=np.asarray(old["segments"][f"{r['epoch']}:{r['gen']}"]),
                      pieces={int(x): p for x, p in r["pieces"].items()}, batch_size=cfg.batch_size,
                      window=cfg.shuffle_buffer, seed=cfg.seed)
        for w, x in enumerate(readers):
            out += planner.remaining(seg, x, worker_batches_consumed(r["consumed"], workers, w))
        if r["epoch"] < state["epoch"]:
            left = seg.counts - seg.quota * seg.batch_size if cfg.partial_buckets == "carry" else None
            spans = planner.fresh(state["epoch"], left, {}, readers)
            for x in readers:
                out += spans.pieces[x]
    return out


def build_loader(cfg: LoaderConfig, rank: int, world_size: int, text_encoder_id: str | None = None,
                 autoencoder_id: str | None = None) -> TrainLoader:
    """The loader of ``rank`` among ``world_size`` data-parallel ranks; batches carry the precomputed
    embeddings/latents of the given encoder ids (``cfg.text_encoder_id``/``autoencoder_id`` win when set)."""
    return TrainLoader(cfg, rank, world_size, text_encoder_id, autoencoder_id)
