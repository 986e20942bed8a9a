"""What a training checkpoint holds and how the ranks save and restore it (the collective choreography).

Save (``Checkpointer.save``, called by every rank at the same step):

1. the previous save is finished first: at most one is in flight;
2. rank 0 clears the staging directory and sends its url to the others (nobody writes before it is ready);
3. each rank plans its shard and sends the layout (a few numbers per parameter, no tensors) to rank 0;
4. each rank copies its own slices of weights, Adam moments and EMA into its host buffer (the only time the loop
   is blocked) and starts its background write: its shard, its loader and RNG JSON (rank 0 also ``config.yaml``);
5. each step the ranks exchange their writer's state in the step's one all-reduce (``status`` -> ``settle``).
   Once every rank has written, rank 0 commits on its writer thread (``index.json``, ``trainer_state.json``,
   ``COMPLETE``, rename, ``latest``); when any write failed, every rank raises at that same step, naming the
   rank and its error, so no rank is left waiting in a collective.

Restore (``load``): every rank reads only the byte ranges of its own slices (``shards.ShardIndex``), whatever
world size and ZeRO stage wrote them, and writes them into DeepSpeed's partitions (``zero_state.restore``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from tessera import storage
from tessera.trainer import checkpoint as C
from tessera.trainer import shards as S
from tessera.trainer import zero_state as Z
from tessera.trainer.distributed import all_gather_dealt_json, all_reduce_sum, collective_device, gather_to_rank0, rank, \
    world_size

log = logging.getLogger("tessera.train")

FORMAT = "tessera-ckpt/3"


@dataclass
class TrainState:
    """Counters saved with every checkpoint."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    samples: int = 0  # samples consumed, summed over ranks
    skipped: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    consecutive_skips: int = 0
    rollbacks: int = 0
    ema_decay: float = 0.0


class CheckpointWriteError(RuntimeError):
    """A rank failed to write its part of a checkpoint; raised on every rank at the same step."""


@dataclass
class _Save:
    """The save in flight: ``write`` (every rank writing) -> ``commit`` (rank 0 committing) -> done."""

    step: int
    url: str
    t0: float
    stall_s: float
    phase: str = "write"
    slowest: tuple[float, int] = (0.0, 0)  # (seconds, rank) of the slowest rank's write
    meta: dict = field(default_factory=dict)  # rank 0: index.json and trainer_state.json, less the timings


@dataclass
class Checkpointer:
    """The loop's handle on checkpoints: where they go and the save in flight."""

    mgr: C.CheckpointManager
    config_url: str  # the run's config.yaml, copied into every checkpoint
    config_hash: str
    # Called between a rank's files with the step: fault drills widen the write window or make a write fail.
    between_files: Callable[[int], None] = lambda step: None
    # Rank 0: extra files of a checkpoint (name -> tensors or text), taken at save time. Fine-tuning's seam: a LoRA
    # run adds the merged model (what sample/export/eval read) and PEFT's adapter folder.
    files: Callable[[], dict[str, Any]] | None = None
    device: torch.device = torch.device("cpu")  # where the status all-reduce runs (the loop's collective device)
    writer: C.AsyncWriter = field(default_factory=C.AsyncWriter)
    buffer: S.HostBuffer = field(default_factory=S.HostBuffer)
    _save: _Save | None = None
    _metrics: dict = field(default_factory=dict)

    def save(self, engine, frags, ema, loader, st: TrainState) -> None:
        """Collective: copy this rank's slices to host memory and write them in the background; rank 0 commits
        once every rank has written (``settle``/``finish``)."""
        self.finish()
        t0 = time.perf_counter()
        box = [self.mgr.prepare(st.step) if rank() == 0 else None]
        if world_size() > 1:  # also the sync point: no rank writes before the staging dir is ready
            dist.broadcast_object_list(box, src=0)
        url = box[0]
        buffers = dict(engine.module.named_buffers()) if rank() == 0 else {}
        kinds = ["weight", *Z.MOMENTS] + (["ema"] if ema is not None else [])
        plan = S.ShardPlan(rank(), [(f"{k}/{f.name}", f.start, f.numel) for k in kinds for f in frags],
                           {n: b.detach() for n, b in buffers.items()})
        layouts = gather_to_rank0(plan.layout())
        by_name = {f.name: f for f in frags}

        def source(key: str) -> torch.Tensor:
            kind, name = key.split("/", 1)
            if kind == "buffer":
                return buffers[name].detach()
            if kind == "ema":
                return ema.shadow[name]
            return by_name[name].view(None if kind == "weight" else kind)

        data = self.buffer.stage(plan, source)
        small = {"loader": loader.state_dict(), "rng": C.rng_state()}
        extra = self.files() if self.files is not None and rank() == 0 else {}
        step = st.step  # bound now: the loop moves on while the thread writes
        save = _Save(step, url, t0, 0.0)
        if rank() == 0:
            shapes = {f.name: list(f.shape) for f in frags}
            save.meta = {"index": S.build_index(layouts, shapes, format=FORMAT, world_size=world_size(),
                                                zero_stage=engine.zero_optimization_stage()),
                         "state": {"format": FORMAT, "trainer": dataclasses.asdict(st), "world_size": world_size(),
                                   "zero_stage": engine.zero_optimization_stage(), "adam_step": Z.adam_step(engine),
                                   "config_hash": self.config_hash}}
        save.stall_s = time.perf_counter() - t0
        if world_size() == 1:  # nobody to wait for: the writer commits right after its files
            save.phase = "commit"
            self.writer.submit(step, lambda: self._write_and_commit(save, plan, data, small, extra))
        else:
            self.writer.submit(step, lambda: self._write(url, step, plan, data, small, extra))
        self._save = save
        log.info("checkpoint step %d: %.1f MB of this rank's state staged in %.3f s, writing in the background",
                 st.step, plan.nbytes / 1e6, save.stall_s)

    def _write(self, url: str, step: int, plan: S.ShardPlan, data: torch.Tensor, small: dict, extra: dict) -> None:
        """This rank's files (background thread)."""
        r = rank()
        S.write_shard(storage.join(url, S.shard_file(r)), plan, data)
        self.between_files(step)
        C.write_json(storage.join(url, "loader", f"rank{r}.json"), small["loader"])
        C.write_json(storage.join(url, "rng", f"rank{r}.json"), small["rng"])
        self.between_files(step)
        if r == 0:
            storage.copy(self.config_url, storage.join(url, "config.yaml"))
            C.write_files(url, extra, {"format": FORMAT})
            self.between_files(step)

    def _write_and_commit(self, s: _Save, plan: S.ShardPlan, data: torch.Tensor, small: dict, extra: dict) -> None:
        """One rank alone: its files, then the commit, on the writer thread."""
        t0 = time.perf_counter()
        self._write(s.url, s.step, plan, data, small, extra)
        s.slowest = (time.perf_counter() - t0, 0)
        self._commit(s)

    def status(self) -> list[float]:
        """This rank's part of the vector the ranks sum each step: [its write failed, its write is done, rank 0's
        writer code (``AsyncWriter.code``)]. Three numbers whatever the world size: the step's all-reduce does not
        grow with the ranks; who failed and who was slowest is asked only when it happens (``settle``)."""
        if self._save is None:
            return [0.0, 0.0, 0.0]
        code = self.writer.code()
        return [float(code < 0), float(code > 0), code if rank() == 0 else 0.0]

    def _reduce(self, value: float, op) -> float:
        """One scalar reduced over the ranks (the rare paths of ``settle``: a failure, a finished write)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        if world_size() > 1:
            dist.all_reduce(t, op=op)
        return float(t.item())

    def settle(self, summed: list[float]) -> None:
        """Act on the ranks' summed ``status``, identically on every rank: raise when a write failed; when all have
        written, rank 0 starts the commit; when the commit is done, report it."""
        s = self._save
        if s is None:
            return
        failed, done, r0 = summed
        code = self.writer.code()
        if s.phase == "write" and failed > 0:  # who: the lowest failed rank names it (its error text lives there)
            first = int(self._reduce(rank() if code < 0 else world_size(), dist.ReduceOp.MIN))
            self._fail(s, first, int(failed))
        if s.phase == "commit" and r0 < 0:
            self._fail(s, 0, 1)
        if s.phase == "write" and int(done) == world_size():
            mine = code - 1.0
            seconds = self._reduce(mine, dist.ReduceOp.MAX)
            slowest = int(self._reduce(rank() if mine == seconds else world_size(), dist.ReduceOp.MIN))
            s.phase, s.slowest = "commit", (seconds, slowest)
            if rank() == 0:
                self.writer.submit(s.step, lambda: self._commit(s))
        elif s.phase == "commit" and r0 > 0:
            self._done(s, r0 - 1.0)

    def _fail(self, s: _Save, first: int, n: int) -> None:
        self._save = None
        box = [self.writer.error if rank() == first else None]
        if world_size() > 1:  # the error text lives on the failed rank only
            dist.broadcast_object_list(box, src=first)
        more = f" and {n - 1} other rank(s)" if n > 1 else ""
        raise CheckpointWriteError(f"checkpoint step {s.step}: writing failed on rank {first}{more}: {box[0]}")

    def _commit(self, s: _Save) -> None:
        """Rank 0's writer thread: metadata, then ``COMPLETE``, rename, ``latest``, prune."""
        state = dict(s.meta["state"], save=self._timing(s))
        storage.write_text(storage.join(s.url, "index.json"), json.dumps(s.meta["index"], indent=1))
        storage.write_text(storage.join(s.url, "trainer_state.json"), json.dumps(state, indent=1, sort_keys=True))
        self.between_files(s.step)
        self.mgr.commit(s.step)

    def _timing(self, s: _Save) -> dict:
        """How long the save took: what ``tessera submit`` checks the preemption grace period against."""
        nbytes = sum(lay["bytes"] for lay in s.meta.get("index", {}).get("shards", []))
        seconds, slowest = s.slowest
        return {"stall_s": round(s.stall_s, 4), "write_s": round(seconds, 4), "slowest_rank": slowest,
                "seconds": round(s.stall_s + seconds, 4), "shard_bytes": nbytes, "world_size": world_size()}

    def _done(self, s: _Save, commit_s: float) -> None:
        self._save = None
        t = self._timing(s)
        self._metrics = {"ckpt/step": s.step, "ckpt/stall_s": t["stall_s"], "ckpt/write_s": t["write_s"],
                         "ckpt/commit_s": round(commit_s, 4)}
        if rank() == 0:
            log.info("checkpoint step %d committed: loop blocked %.3f s, slowest write %.2f s (rank %d), commit "
                     "%.2f s, %.1f MB in %d shards", s.step, t["stall_s"], t["write_s"], t["slowest_rank"],
                     commit_s, t["shard_bytes"] / 1e6, t["world_size"])

    def _exchange(self) -> list[float]:
        return all_reduce_sum(torch.tensor(self.status(), dtype=torch.float64, device=self.device))

    def finish(self) -> None:
        """Collective: block until the save in flight is committed; raise on every rank if a write failed."""
        while self._save is not None:
            self.writer.join()
            self.settle(self._exchange())

    def metrics(self) -> dict:
        """The last committed save's timings (once), for the loop's metrics."""
        out, self._metrics = self._metrics, {}
        return out

    def committed(self, step: int) -> bool:
        """True on every rank when this run's checkpoint root holds a complete checkpoint of ``step``."""
        self.finish()
        box = [step in self.mgr.complete_steps() if rank() == 0 else None]
        if world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        return bool(box[0])

    def resolve(self, resume: str) -> str | None:
        """The checkpoint to resume from, decided on rank 0 once no save is in flight, and shared."""
        self.finish()
        box = [self.mgr.resolve(resume) if rank() == 0 else None]
        if world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]


def load(url: str, engine, frags, ema, loader, st: TrainState, restore_loader: bool = True) -> None:
    """Restore this rank's slices of the weights, Adam moments and EMA (any world size and ZeRO stage), the buffers,
    counters, RNG and (same or other world size) loader state."""
    state = C.read_json(storage.join(url, "trainer_state.json"))
    if state.get("format") != FORMAT:
        raise ValueError(f"{url} is a {state.get('format')} checkpoint; resuming needs {FORMAT} (tessera sample, "
                         f"export and eval still read it)")
    index = S.ShardIndex(url, C.read_json(storage.join(url, "index.json")))
    for f in frags:
        saved = index.shapes.get(f.name)
        if saved is None or list(saved) != list(f.shape):
            raise ValueError(f"{url}: parameter {f.name} of shape {list(f.shape)} is "
                             f"{'missing' if saved is None else f'saved with shape {saved}'}")
    kinds = ["weight", *Z.MOMENTS] + (["ema"] if ema is not None and index.has("ema") else [])
    slices = {k: {f.name: torch.empty(f.numel, dtype=torch.float32) for f in frags if f.numel} for k in kinds}
    index.fill([(f"{k}/{f.name}", f.start, slices[k][f.name]) for k in kinds for f in frags if f.numel])
    Z.restore(engine, frags, slices, state["adam_step"])
    saved_buffers = index.buffer_tensors()
    with torch.no_grad():
        for name, b in engine.module.named_buffers():
            if name in saved_buffers:
                b.copy_(saved_buffers[name])
    if "ema" in slices:
        ema.load_slices(slices["ema"])
    for k, v in state["trainer"].items():
        setattr(st, k, v)
    same_world = state["world_size"] == world_size()
    if restore_loader:  # this rank's own state when every rank resumes exactly; else every rank's, merged
        mine = C.read_json(storage.join(url, "loader", f"rank{rank()}.json")) if same_world else None
        exact = mine is not None and loader.resumes_exactly(mine)
        comm = None
        if world_size() > 1:
            comm = collective_device(str(dist.get_backend()), getattr(engine, "device", torch.device("cpu")))
        if same_world and comm is not None:  # one decision for all: the merge below is collective
            exact = all_reduce_sum(torch.tensor([float(not exact)], device=comm))[0] == 0
        if exact:
            loader.load_state_dict(mine)
        else:
            log.info("layout changed (%d ranks -> %d): merging loader states", state["world_size"], world_size())
            # Each rank reads its dealt share of the old ranks' states and the ranks swap them: ceil(old / new)
            # reads per rank, not every rank reading all of them from the store.
            loader.load_rank_states(all_gather_dealt_json(
                state["world_size"], lambda r: C.read_json(storage.join(url, "loader", f"rank{r}.json")), comm))
    rng_url = storage.join(url, "rng", f"rank{rank()}.json")
    if same_world and storage.exists(rng_url):
        C.set_rng_state(C.read_json(rng_url))


def save_seconds(url: str) -> float | None:
    """How long the save of checkpoint ``url`` took (stall + slowest rank's write), when it was recorded."""
    save = C.read_json(storage.join(url, "trainer_state.json")).get("save") or {}
    return save.get("seconds")
