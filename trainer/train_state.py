"""What a training checkpoint holds and how the loop saves and restores it (the collective choreography).

Save: every rank joins the gathers (weights, Adam moments, EMA reduced to rank 0 bucket by bucket) and sends
its small loader/RNG states to rank 0; rank 0 hands host copies to the background writer and training goes
on. Restore: rank 0 picks the checkpoint and tells the others (a pending write could otherwise make ranks see
different ``latest``); each rank reads only its own slices.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch.distributed as dist

from tessera import storage
from tessera.trainer import checkpoint as C
from tessera.trainer import zero_state as Z
from tessera.trainer.data import merge_rank_states
from tessera.trainer.distributed import gather_to_rank0, rank, world_size

log = logging.getLogger("tessera.train")

FORMAT = "tessera-ckpt/2"


@dataclass
class TrainState:
    """Counters saved with every checkpoint."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    samples: int = 0  # samples consumed, summed over ranks
    skipped: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    consecutive_skips: int = 0
    rollbacks: int = 0
    ema_decay: float = 0.0


@dataclass
class Checkpointer:
    """The loop's handle on checkpoints: where they go, what is in flight."""

    mgr: C.CheckpointManager
    writer: C.AsyncWriter
    config_url: str  # the run's config.yaml, copied into every checkpoint
    config_hash: str
    pause: Callable[[], None] = lambda: None  # between files: fault drills widen the write window
    # Rank 0: the weight files of a checkpoint from the gathered trainable weights (default: model.safetensors).
    # Fine-tuning's seam: a LoRA run writes its adapter for resuming, the merged model for sampling, PEFT's files.
    files: Callable[[dict], dict[str, Any]] | None = None

    def save(self, engine, frags, ema, loader, st: TrainState) -> None:
        """Collective: gather the state to rank 0 and start writing it in the background there."""
        weights = Z.gather_to_rank0(frags, lambda f: f.view())
        moments = {f"{key}/{name}": t for key in Z.MOMENTS
                   for name, t in Z.gather_to_rank0(frags, lambda f, k=key: f.view(k)).items()}
        ema_full = ema.gather() if ema is not None else None
        small = gather_to_rank0({"loader": loader.state_dict(), "rng": C.rng_state()})
        if rank() != 0:
            return
        for name, b in engine.module.named_buffers():
            weights[f"buffer/{name}"] = b.detach().to("cpu", copy=True)
        state = {"format": FORMAT, "trainer": dataclasses.asdict(st), "world_size": world_size(),
                 "zero_stage": engine.zero_optimization_stage(), "adam_step": Z.adam_step(engine),
                 "config_hash": self.config_hash}
        files = self.files(weights) if self.files is not None else {"model.safetensors": weights}
        job = CheckpointFiles(st.step, files, moments, ema_full, small, state)
        self.writer.submit(st.step, lambda: write_checkpoint(self.mgr, job, self.config_url, self.pause))

    def committed(self, step: int) -> bool:
        """True on every rank when this run's checkpoint root holds a complete checkpoint of ``step`` (rank 0
        decides after its pending write, and tells the others)."""
        if rank() == 0:
            self.writer.wait()
        box = [step in self.mgr.complete_steps() if rank() == 0 else None]
        if world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        return bool(box[0])

    def resolve(self, resume: str) -> str | None:
        """The checkpoint to resume from, decided on rank 0 (after its pending write) and shared."""
        if rank() == 0:
            self.writer.wait()
        box = [self.mgr.resolve(resume) if rank() == 0 else None]
        if world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]



@dataclass
class CheckpointFiles:
    """Host copies of everything one checkpoint holds, ready to be written."""

    step: int
    weights: dict  # file name -> {name: full fp32 tensor (plus buffer/<name>)} or text (e.g. a JSON config)
    moments: dict  # exp_avg/<name>, exp_avg_sq/<name>
    ema: dict | None
    ranks: list[dict]  # per rank: {"loader": ..., "rng": ...}
    state: dict  # trainer_state.json


def write_checkpoint(mgr: C.CheckpointManager, job: CheckpointFiles, config_url: str,
                     pause: Callable[[], None] = lambda: None) -> None:
    """Write one checkpoint directory and commit it (``COMPLETE``, rename, ``latest``): a kill at any point leaves
    the previous complete checkpoint the newest one."""
    url = mgr.prepare(job.step)
    for name, content in job.weights.items():
        if isinstance(content, str):
            storage.write_text(storage.join(url, name), content)
        else:
            C.write_tensors(storage.join(url, name), content, {"format": FORMAT})
        pause()
    C.write_tensors(storage.join(url, "optimizer.safetensors"), job.moments)
    pause()
    if job.ema is not None:
        C.write_tensors(storage.join(url, "ema.safetensors"), job.ema)
        pause()
    for r, s in enumerate(job.ranks):
        C.write_json(storage.join(url, "loader", f"rank{r}.json"), s["loader"])
        C.write_json(storage.join(url, "rng", f"rank{r}.json"), s["rng"])
    C.write_json(storage.join(url, "trainer_state.json"), job.state)
    storage.copy(config_url, storage.join(url, "config.yaml"))
    pause()
    mgr.commit(job.step)


def load(url: str, engine, frags, ema, loader, st: TrainState, restore_loader: bool = True,
         weights_file: str = "model.safetensors") -> None:
    """Restore weights (the trainable ones, from ``weights_file``), Adam moments, EMA, counters, RNG and (same or
    other world size) loader state."""
    state = C.read_json(storage.join(url, "trainer_state.json"))
    weights, moments = C.TensorFile(storage.join(url, weights_file)), \
        C.TensorFile(storage.join(url, "optimizer.safetensors"))
    try:
        Z.restore(engine, weights.get, moments.maybe, state["adam_step"])
        for name, b in engine.module.named_buffers():
            t = weights.maybe(f"buffer/{name}")
            if t is not None:
                b.data.copy_(t)
    finally:
        weights.close()
        moments.close()
    if ema is not None and storage.exists(storage.join(url, "ema.safetensors")):
        ema_file = C.TensorFile(storage.join(url, "ema.safetensors"))
        try:
            ema.load_full(ema_file.get)
        finally:
            ema_file.close()
    for k, v in state["trainer"].items():
        setattr(st, k, v)
    same_world = state["world_size"] == world_size()
    if restore_loader:
        states = [C.read_json(storage.join(url, "loader", f"rank{r}.json")) for r in range(state["world_size"])]
        if same_world:
            loader.load_state_dict(states[rank()])
        else:
            log.info("world size changed %d -> %d: merging loader states", state["world_size"], world_size())
            loader.load_state_dict(merge_rank_states(states))
    rng_url = storage.join(url, "rng", f"rank{rank()}.json")
    if same_world and storage.exists(rng_url):
        C.set_rng_state(C.read_json(rng_url))
