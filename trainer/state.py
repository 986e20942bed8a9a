"""The loop's helpers: counters, seeding, metrics meter, checkpoint save/load/rollback."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from tessera import storage
from tessera.trainer import checkpoint as C
from tessera.trainer.distributed import barrier

log = logging.getLogger("tessera.train")


@dataclass
class TrainerState:
    """Counters saved with every checkpoint."""

    step: int = 0  # loop iterations (micro-batches) done
    samples: int = 0  # samples consumed, summed over ranks
    skipped: int = 0  # steps skipped for non-finite loss/gradients
    consecutive_skips: int = 0
    rollbacks: int = 0
    ema_decay: float = 0.0


def seed_everything(seed: int, rank: int, deterministic: bool) -> None:
    """Seed python/numpy/torch per rank; in deterministic mode also pin kernels and threads."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def poison_local_grads(engine) -> None:
    """Fault injection: make this rank's local gradients infinite (tests the gradient-norm guard)."""
    opt = engine.optimizer
    touched = False
    for group in getattr(opt, "averaged_gradients", {}).values() or []:
        for g in group or []:
            g.fill_(float("inf"))
            touched = True
    for p in engine.module.parameters():
        if p.grad is not None:
            p.grad.fill_(float("inf"))
            touched = True
    ipg = getattr(opt, "single_partition_of_fp32_groups", None)
    if not touched and ipg:
        for fp32 in ipg:
            if fp32.grad is not None:
                fp32.grad.fill_(float("inf"))
                touched = True
    if not touched:
        raise RuntimeError("fault injection found no gradient to poison")


def step_was_skipped(engine) -> bool:
    """True if DeepSpeed skipped the last optimizer step (non-finite gradient norm)."""
    opt = engine.optimizer
    if getattr(opt, "overflow", False):
        return True
    gn = engine.get_global_grad_norm()
    return gn is not None and not np.isfinite(float(gn))


def grad_norm(engine) -> float:
    """Global gradient norm of the last step (before clipping)."""
    gn = engine.get_global_grad_norm()
    return float(gn) if gn is not None else float("nan")


def memory_gb(device: torch.device) -> float:
    """CUDA max allocated, or this process's RSS, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import psutil

    return psutil.Process().memory_info().rss / 1e9


class Meter:
    """Accumulates per-step values between log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new logging window."""
        self.losses, self.ts = [], []
        self.data_wait = 0.0
        self.n = 0
        self.dropped = 0
        self.counts: dict[str, float] = {}
        self.t0 = time.perf_counter()
        self.loader_stats: dict = {}

    def add(self, loss_per, t, t_data, batch, on_the_fly, n_dropped) -> None:
        """Record one step."""
        self.losses.append(loss_per.float().cpu())
        self.ts.append(t.float().cpu())
        self.data_wait += t_data
        self.n += loss_per.shape[0]
        self.dropped += int(n_dropped)
        for k, v in on_the_fly.items():
            self.counts[k] = self.counts.get(k, 0) + v
        if isinstance(batch.get("stats"), dict):
            self.loader_stats = batch["stats"]

    def flush(self, flops_per_step: float, peak: float, world: int) -> dict:
        """Metrics of the window: loss, loss per timestep quartile, throughput, data wait, MFU."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        loss, t = torch.cat(self.losses), torch.cat(self.ts)
        steps = len(self.losses)
        # The logged loss is the mean over all ranks (one all-reduce per log line, on every rank).
        m = {"loss": _global_mean(loss), "loss_rank0": float(loss.mean())}
        for q in range(4):
            sel = (t >= q / 4) & (t < (q + 1) / 4 if q < 3 else t <= 1.0)
            if sel.any():
                m[f"loss_q{q}"] = float(loss[sel].mean())
        sps = self.n * world / dt
        tflops = flops_per_step * steps / dt / 1e12
        m.update(samples_per_s=sps, data_wait_s=self.data_wait / steps, data_wait_frac=self.data_wait / dt,
                 tflops_per_s=tflops, mfu=(tflops * 1e12 / (peak * world)) if peak > 0 else 0.0,
                 cfg_dropped=self.dropped)
        m.update({f"onthefly/{k}": v for k, v in self.counts.items()})
        for k, v in self.loader_stats.items():
            if isinstance(v, (int, float)):
                m[f"data/{k}"] = v
            elif isinstance(v, dict):
                m.update({f"data/{k}/{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float))})
        self.reset()
        return m


def _global_mean(x: torch.Tensor) -> float:
    t = torch.tensor([float(x.sum()), float(x.numel())], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return float(t[0] / t[1])


def use_precomputed_caches(data_cfg, frozen) -> None:
    """Point the loader at precomputed embeddings/latents for the configured encoders when the dataset has them."""
    import json as _json

    if not data_cfg.use_precomputed:
        return
    manifest = _json.loads(storage.read_text(storage.join(data_cfg.paths[0], "manifest.json")))
    caches = manifest.get("caches") or {}
    if data_cfg.text_encoder_id is None and caches.get("emb"):
        tid = frozen.text.id
        if any(c.startswith(tid + ".") for c in caches["emb"]):
            data_cfg.text_encoder_id = tid
            log.info("using precomputed text embeddings %s", tid)
        else:
            log.warning("dataset has embeddings %s but not for %s: encoding captions on the fly", caches["emb"], tid)
    if data_cfg.autoencoder_id is None and caches.get("latent"):
        aid = frozen.ae.id
        if aid in caches["latent"]:
            data_cfg.autoencoder_id = aid
            log.info("using precomputed latents %s", aid)


def record_keys(run, rank: int, step: int, batch: dict) -> None:
    """Append this step's sample keys (data lineage) to ``keys/rank<R>.jsonl`` in the run's local dir."""
    import json as _json

    path = run.local_dir / "keys" / f"rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(_json.dumps({"step": step, "keys": list(batch["key"])}) + "\n")


def progress_bar(total: int, initial: int, rank: int):
    """Console progress bar in samples with rate and ETA (rank 0)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="sample", dynamic_ncols=True, mininterval=2.0,
                disable=rank != 0 or os.environ.get("TESSERA_NO_PROGRESS") == "1")


def save_checkpoint(mgr: C.CheckpointManager, engine, scheduler, ema, loader, st: TrainerState, rank: int,
                    run, config_hash: str) -> None:
    """Collective: gather state, write every rank's files, commit on rank 0."""
    weights, moments = C.gather_state(engine)
    url = mgr.prepare(st.step)
    barrier()
    C.CheckpointManager.write_json(storage.join(url, "loader", f"rank{rank}.json"), loader.state_dict())
    C.CheckpointManager.write_json(storage.join(url, "rng", f"rank{rank}.json"), C.rng_state())
    if rank == 0:
        mgr.write_tensors(storage.join(url, "model.safetensors"), weights, {"format": "tessera-ckpt/1"})
        mgr.write_tensors(storage.join(url, "optimizer.safetensors"), moments)
        if ema is not None:
            mgr.write_tensors(storage.join(url, "ema.safetensors"), ema.state_dict())
        world = dist.get_world_size() if dist.is_initialized() else 1
        state = {"trainer": dataclasses.asdict(st), "world_size": world, "zero_stage": engine.zero_optimization_stage(),
                 "opt_steps": int(engine.global_steps), "adam_step": C.adam_step(engine), "scheduler": scheduler.state_dict() if scheduler else None,
                 "config_hash": config_hash}
        mgr.write_json(storage.join(url, "trainer_state.json"), state)
        storage.copy(run.path("config.yaml"), storage.join(url, "config.yaml"))
    barrier()
    if rank == 0:
        mgr.commit(st.step)
    barrier()


def load_checkpoint(url: str, engine, scheduler, ema, loader, st: TrainerState, rank: int,
                    restore_loader: bool = True) -> None:
    """Restore weights, optimizer, EMA, counters, RNG and (same or different world size) loader state."""
    state = C.read_json(storage.join(url, "trainer_state.json"))
    C.restore_state(engine, C.read_tensors(storage.join(url, "model.safetensors")),
                    C.read_tensors(storage.join(url, "optimizer.safetensors")), state["adam_step"])
    engine.global_steps = state["opt_steps"]
    engine.global_samples = state["trainer"]["samples"]
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if ema is not None and storage.exists(storage.join(url, "ema.safetensors")):
        ema.load_state_dict(C.read_tensors(storage.join(url, "ema.safetensors")))
    for k, v in state["trainer"].items():
        setattr(st, k, v)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if restore_loader:
        loader_states = [C.read_json(storage.join(url, "loader", f"rank{r}.json")) for r in range(state["world_size"])]
        if state["world_size"] == world:
            loader.load_state_dict(loader_states[rank])
        else:
            log.info("world size changed %d -> %d: merging loader states", state["world_size"], world)
            from tessera.trainer.data import merge_rank_states

            loader.load_state_dict(merge_rank_states(loader_states))
    rng_url = storage.join(url, "rng", f"rank{rank}.json")
    if state["world_size"] == world and storage.exists(rng_url):
        C.set_rng_state(C.read_json(rng_url))


def rollback(mgr: C.CheckpointManager, engine, scheduler, ema, st: TrainerState, rank: int) -> bool:
    """Reload weights/optimizer/EMA from the newest checkpoint but keep moving forward through the data."""
    url = mgr.resolve("auto")
    if url is None:
        return False
    keep = dataclasses.replace(st)
    load_checkpoint(url, engine, scheduler, ema, None, st, rank, restore_loader=False)
    # Data position and counters move on: replaying the batches that blew up would likely blow up again.
    st.step, st.samples, st.skipped = keep.step, keep.samples, keep.skipped
    st.consecutive_skips, st.rollbacks = 0, keep.rollbacks + 1
    log.warning("rolled back weights and optimizer to %s (rollback #%d)", url, st.rollbacks)
    return True
