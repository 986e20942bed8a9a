"""The training loop: one explicit function that reads top to bottom (EDM/torchtitan style).

Progress is counted in samples, so schedules survive a change of batch size or world size. Every random draw
of a step (timestep, noise, condition dropout) comes from its own sample's counter-based stream on the device,
keyed by (seed, optimizer step, sample key) (``diffusion/rng.py``): a resumed run replays the uninterrupted one
bit for bit without any RNG hand-off, and gradient accumulation or another world size trains on the same draws.

The host never waits for the device in a step that does not log: draws are made on the device, batches are
copied from pinned memory without blocking, a non-finite loss poisons the backward on the device
(``torch.where``), and the step's one all-reduce (stop, out of time, loss sums, checkpoint writers) stays on the
device. The loop reads it every ``train.host_sync_every_steps`` steps and at log lines (``agreed``); stopping and
checkpoint commits are decided there, identically on every rank. DeepSpeed's own overflow check still reads
the gradient norm inside ``engine.step()`` (that is how it skips a step on every rank alike).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from tessera.device import device_peak_flops
from tessera.log import progress
from tessera.trainer import faults
from tessera.trainer import train_state as TS
from tessera.trainer import zero_state as Z
from tessera.trainer.checkpoint import CheckpointManager
from tessera.trainer.components import Frozen, batch_to_inputs, control_input, empty_url, precomputed_ids
from tessera.trainer.compile import compile_blocks
from tessera.trainer.config import TrainJobConfig
from tessera.trainer.data import build_loader
from tessera.trainer.data.prior import PairedLoader
from tessera.trainer.diffusion.cfg_dropout import drop_condition
from tessera.trainer.diffusion.objectives import build_objective
from tessera.trainer.distributed import barrier, collective_device, reduce_on_device, to_device
from tessera.trainer.ema import ShardedEMA
from tessera.trainer.diffusion.rng import KeyedRNG
from tessera.trainer.engine import build_engine, set_lr
from tessera.trainer.grids import TrainHooks, log_sample_grid, run_eval_hook
from tessera.trainer.guard import EXIT_PREEMPTED, PreemptionFlag, after_step, rollback
from tessera.trainer.metrics import Meter, grad_norm, memory_gb
from tessera.trainer.models import model_flops
from tessera.trainer.probes import probe_every, run_probe
from tessera.trainer.schedule import crossed, lr_at
from tessera.trainer.session import start_session

log = logging.getLogger("tessera.train")


@dataclass
class StepResult:
    """What one optimizer step reports back to the loop."""

    loss_per: torch.Tensor  # (n,) this rank's per-sample losses over the step's micro-batches
    t: torch.Tensor  # (n,) their noise levels in [0, 1]
    global_loss: torch.Tensor  # (2,) (sum, count) of the loss over every rank, on the device
    agreed: torch.Tensor  # the step's all-reduced [non-finite, stop, out of time, loss sum, count, writers...]
    skipped: bool  # no update was applied (non-finite loss or gradient on some rank): DeepSpeed's counter
    on_the_fly: dict
    n_dropped: torch.Tensor | int  # on the device
    shape: tuple[int, int, int]  # (latent h, latent w, text tokens) of the last micro-batch, for FLOPs


class Agreed:
    """What every rank agreed on in a step's all-reduce, read on the host (``StepResult.agreed``)."""

    def __init__(self, values: list[float]) -> None:
        self.bad, self.stop, self.out_of_time = values[0] > 0, values[1] > 0, values[2] > 0
        self.ckpt = values[5:]  # every rank's checkpoint-writer state (``Checkpointer.status``), summed

    @classmethod
    def read(cls, agreed: torch.Tensor) -> "Agreed":
        """The host's one read of a step's agreed vector (a sync: the loop calls it only on sync steps)."""
        return cls(agreed.tolist())


def train_step(engine, objective, frozen: Frozen, micro_batches: list[dict], cfg: TrainJobConfig, step: int, rank: int,
               dtype: torch.dtype, comm_dev: torch.device, stop: bool, out_of_time: bool,
               ckpt_status: list[float]) -> StepResult:
    """One optimizer step over ``optim.grad_accum`` micro-batches: forward, loss and backward for each, with one
    small all-reduce before the last backward that carries (non-finite loss, stop, out of time, loss sum,
    count, each rank's checkpoint-writer state). A non-finite loss on any rank makes every rank poison that last
    backward on the device, so ZeRO's overflow check skips the step on every rank alike (weights and Adam state
    untouched); a non-finite gradient does the same. Nothing here reads a device tensor on the host."""
    device = next(engine.module.parameters()).device
    losses, ts, counts, dropped = [], [], {"text_encoded": 0, "latents_encoded": 0}, 0
    bad = torch.zeros((), dtype=torch.float64, device=comm_dev)
    empty = frozen.empty() if cfg.cfg_dropout.p > 0 else None
    host_flags = to_device([float(stop), float(out_of_time), *ckpt_status], comm_dev)  # pinned, non-blocking

    ctrl: dict = {}  # a control run's condition of the current micro-batch (model.control), for every model call

    def model_fn(x_t, timestep, c):
        # No autocast: the engine's weights are already in the compute dtype (bf16 engine or fp32), and autocast
        # over a bf16 engine only adds casts; the inputs are cast once here.
        return engine(x_t.to(dtype), timestep, c.hidden, c.mask, c.pooled, **ctrl).float()

    for i, batch in enumerate(micro_batches):
        x0, cond, on_the_fly = batch_to_inputs(batch, frozen, device, dtype)
        ctrl = control_input(batch, engine.module, cfg.model, frozen, cfg.train.seed, step, device, dtype, on_the_fly)
        gens = KeyedRNG.for_samples(cfg.train.seed, step, list(batch["key"]), device)
        cond, n_dropped = drop_condition(cfg.cfg_dropout, cond, empty, gens)
        loss_per, t = objective.loss(model_fn, x0, cond, gens)
        loss = loss_per.mean()
        if "prior" in batch:  # + weight x the class images' loss (their draws keyed apart from the subject's)
            px0, pcond, _ = batch_to_inputs(batch["prior"], frozen, device, dtype)
            pgens = KeyedRNG.for_samples(cfg.train.seed, step, [f"prior/{k}" for k in batch["prior"]["key"]], device)
            prior_per, _ = objective.loss(model_fn, px0, pcond, pgens)
            loss = loss + cfg.prior.weight * prior_per.mean()
        if faults.hits(cfg.debug, cfg.debug.nan_loss_at_steps, step, rank):
            loss, loss_per = faults.nan_like(loss), faults.nan_like(loss_per)
        bad = bad + (~torch.isfinite(loss)).to(comm_dev, torch.float64)
        losses.append(loss_per.detach())
        ts.append(t.detach())
        dropped = dropped + n_dropped
        for k, v in on_the_fly.items():
            counts[k] = counts.get(k, 0) + v
        if i == len(micro_batches) - 1:  # the step's one collective, before the backward that reduces gradients
            local = torch.cat(losses)
            mine = torch.stack([bad, host_flags[0], host_flags[1], local.double().nan_to_num(0.0).sum().to(comm_dev),
                                torch.full((), float(local.numel()), dtype=torch.float64, device=comm_dev)])
            agreed = reduce_on_device(torch.cat([mine, host_flags[2:]]))
            # On the device: times 1, or times NaN when some rank's loss was not finite (a constant factor, so the
            # backward scales the gradient by it; a where() over a NaN branch would leak NaN into good steps).
            loss = loss * torch.where(agreed[0] > 0, float("nan"), 1.0).to(loss.device, loss.dtype)
        engine.backward(loss)
        if i == len(micro_batches) - 1 and faults.hits(cfg.debug, cfg.debug.nan_grad_at_steps, step, rank):
            faults.poison_local_grads(engine)
        before = engine.skipped_steps
        engine.step()  # DeepSpeed applies the update only at the accumulation boundary
    skipped = engine.skipped_steps > before
    return StepResult(torch.cat(losses), torch.cat(ts), agreed[3:5], agreed, skipped, counts, dropped,
                      (x0.shape[-2], x0.shape[-1], cond.hidden.shape[1]))


def train(cfg: TrainJobConfig, hooks: TrainHooks | None = None) -> int:
    """Train until ``train.total_samples`` (or the time budget); returns the process exit code.

    ``hooks`` carries what lives above the trainer (in-training evaluation), built by the CLI."""
    hooks = hooks or TrainHooks()
    if cfg.eval.every_samples and hooks.evaluate is None:
        raise ValueError("eval.every_samples is set but no evaluation hook was given: run through `tessera train` "
                         "(or pass evaluation.in_training.training_hooks(cfg))")
    lc, session = cfg.train, start_session(cfg)
    rank, world, device, run, tracker = session.rank, session.world, session.device, session.run, session.tracker

    ids = precomputed_ids(cfg.data, cfg.text_encoder, cfg.autoencoder)
    # With precomputed embeddings the dataset also holds the empty prompt's: no rank loads the encoder for it.
    frozen = Frozen(cfg.text_encoder, cfg.autoencoder, device,
                    empty_url=empty_url(cfg.data.paths[0], ids["text_encoder_id"]) if ids["text_encoder_id"] else None)
    loader = build_loader(cfg.data, rank=rank, world_size=world, **ids)
    if cfg.prior is not None:  # DreamBooth prior preservation: each batch carries a class batch
        loader = PairedLoader(loader, build_loader(cfg.prior.loader_config(cfg.data), rank=rank, world_size=world,
                                                   **ids))
    model = cfg.model.build()
    if lc.activation_checkpointing:
        model.set_gradient_checkpointing(True)
    objective = build_objective(cfg.objective)
    engine, dtype = build_engine(model, cfg, world, device)
    compile_blocks(engine.module, lc.compile, device, engine.zero_optimization_stage())
    if rank == 0:
        for warning in cfg.cadence_warnings(world):
            log.warning("cadence: %s", warning)
    log.info("engine: ZeRO-%d, %s, optimizer %s", engine.zero_optimization_stage(),
             "bf16" if dtype == torch.bfloat16 else "fp32",
             "offloaded to cpu" if engine.zero_cpu_offload() else f"states on {device.type}")
    comm_dev = collective_device(torch.distributed.get_backend(), device)
    frags = Z.fragments(engine)
    ema = ShardedEMA(cfg.ema, frags) if cfg.ema.enabled else None
    ckpt = TS.Checkpointer(CheckpointManager(lc.ckpt_root or run.path("checkpoints"), lc.keep_last),
                           run.path("config.yaml"), session.config_hash, faults.checkpoint_drill(cfg.debug, rank),
                           device=comm_dev)
    st = TS.TrainState()
    resume_url = ckpt.resolve(lc.resume)
    if resume_url:
        TS.load(resume_url, engine, frags, ema, loader, st)
        if hasattr(engine.module, "check_base"):  # a control branch resumes only onto the base it was trained on
            engine.module.check_base(engine.module.base_fingerprint, f"checkpoint {resume_url}")
        log.info("resumed from %s at step %d (%d samples)", resume_url, st.step, st.samples)

    accum, step_samples = cfg.optim.grad_accum, cfg.data.batch_size * world * cfg.optim.grad_accum
    preempt, meter = PreemptionFlag(hooks.preemption), Meter()
    peak = device_peak_flops(device, lc.cpu_peak_tflops)
    t_start, exit_code, late = time.time(), 0, False
    bar = progress(total=lc.total_samples - st.samples, desc="train", unit="sample")
    data_iter = iter(loader)
    while st.samples < lc.total_samples:
        t0 = time.perf_counter()
        micro_batches = [next(data_iter) for _ in range(accum)]
        t_data = time.perf_counter() - t0
        set_lr(engine, lr_at(cfg.optim, st.samples + step_samples, lc.total_samples))
        res = train_step(engine, objective, frozen, micro_batches, cfg, st.step, rank, dtype, comm_dev,
                         preempt.requested, late, ckpt.status())
        st.step, st.samples = st.step + 1, st.samples + step_samples
        logs = crossed(st.samples, step_samples, lc.log_every_samples)
        saves = crossed(st.samples, step_samples, lc.ckpt_every_samples)
        # The host reads what the ranks agreed on only here (the same steps on every rank); elsewhere it never
        # waits for the device. A skipped step reads it too, to name the reason (rare).
        agreed = (Agreed.read(res.agreed) if logs or saves or res.skipped or st.step % lc.host_sync_every_steps == 0
                  else None)
        if agreed is not None:
            ckpt.settle(agreed.ckpt)  # a failed checkpoint write on any rank raises here on every rank
        after_step(st, res.skipped, "loss" if agreed is not None and agreed.bad else "gradient norm",
                   lc.max_consecutive_skips, lc.on_nonfinite, lambda: rollback(ckpt, engine, frags, ema, st))
        if ema is not None and not res.skipped and st.step % cfg.ema.update_every == 0:
            st.ema_decay = ema.update(st.step)
        if cfg.debug.record_keys:
            faults.record_keys(run.local_dir, rank, st.step, [k for b in micro_batches for k in b["key"]])

        flops = 3 * model_flops(engine.module, *res.shape) * step_samples  # forward + backward (2x forward)
        meter.add(res.loss_per, res.t, res.global_loss, step_samples, flops, t_data, res.on_the_fly, res.n_dropped,
                  micro_batches[-1].get("stats"))
        # The caption probe (no gradient, its own draws) runs on every rank on probe steps only.
        probed = (run_probe(engine, objective, frozen, micro_batches, cfg, st.step, dtype, comm_dev)
                  if crossed(st.samples, step_samples, probe_every(cfg)) else {})
        if logs:
            metrics = meter.flush(peak, world)
            metrics.update(lr=engine.optimizer.param_groups[0]["lr"], skipped_steps=st.skipped, rollbacks=st.rollbacks,
                           grad_norm=grad_norm(engine), samples=st.samples, memory_gb=memory_gb(device),
                           ema_decay=st.ema_decay, **probed, **ckpt.metrics())
            tracker.log(metrics, step=st.step)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", sps=f"{metrics['samples_per_s']:.1f}")
        elif probed:
            tracker.log(dict(probed, samples=st.samples), step=st.step)
        bar.update(step_samples)

        if cfg.samples.enabled and crossed(st.samples, step_samples, cfg.samples.every_samples):
            log_sample_grid(cfg, ema, frags, frozen, tracker, run, st.step, rank, device)
        if crossed(st.samples, step_samples, cfg.eval.every_samples):
            run_eval_hook(hooks, cfg, ema, frags, frozen, tracker, st.step, rank, device)
        # The time budget is checked locally and agreed on in the next step's all-reduce (one step late).
        late = lc.max_minutes is not None and (time.time() - t_start) / 60 >= lc.max_minutes
        stop, out_of_time = (agreed.stop, agreed.out_of_time) if agreed is not None else (False, False)
        if stop or out_of_time or saves:
            ckpt.save(engine, frags, ema, loader, st)
        if stop:
            log.warning("preempted: checkpoint at step %d written, exiting %d", st.step, EXIT_PREEMPTED)
            exit_code = EXIT_PREEMPTED
            break
        if out_of_time:
            log.info("time budget of %.1f min reached at step %d", lc.max_minutes, st.step)
            break

    if exit_code == 0:
        if not ckpt.committed(st.step):  # e.g. a resume into another checkpoint root saves the restored state
            ckpt.save(engine, frags, ema, loader, st)
        if cfg.samples.enabled:
            log_sample_grid(cfg, ema, frags, frozen, tracker, run, st.step, rank, device)
    ckpt.finish()  # the last checkpoint is committed before the process reports success or preemption
    bar.close()
    tracker.finish()
    run.close()
    barrier()
    return exit_code
