"""The distillation loop: one explicit function, like the training loop, counted in samples.

The run directory is a training run's: ``config.yaml`` (this job), ``model_config.yaml`` (the training config the
student's checkpoints carry: the teacher's model and encoders with the student's objective and sampler, so ``tessera
sample/export/eval`` sample the student with its own few-step sampler), ``metrics.jsonl``, W&B, ``logs/`` and
``checkpoints/step_*`` written by the trainer's ``Checkpointer`` (each rank writes its own shard in the background;
exact resume). The method's state and this rank's data position travel in the checkpoint's per-rank ``loader``
record; a progressive round's teacher and a LoRA student's merged weights as extra files.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tessera import storage
from tessera.config import dump_yaml
from tessera.log import progress
from tessera.trainer import checkpoint as C
from tessera.trainer import faults
from tessera.trainer import train_state as TS
from tessera.trainer import zero_state as Z
from tessera.trainer.checkpoint import CheckpointManager
from tessera.trainer.components import Frozen
from tessera.trainer.diffusion.process import Process
from tessera.trainer.distributed import all_reduce_sum, barrier, collective_device
from tessera.trainer.ema import ShardedEMA
from tessera.trainer.engine import engine_for, set_lr
from tessera.trainer.guard import EXIT_PREEMPTED, PreemptionFlag, after_step
from tessera.trainer.inference import uncond_like
from tessera.trainer.metrics import grad_norm
from tessera.trainer.schedule import crossed, lr_at
from tessera.trainer.session import start_session

from tessera.finetune.policy import is_lora, load_base, lora_files, merged_weights

from tessera.distill.config import DistillJobConfig
from tessera.distill.methods import METHODS, Context, Method
from tessera.distill.methods.base import check_fits
from tessera.distill.methods.lcm import LCM
from tessera.distill.student import build_student, student_job
from tessera.distill.teacher import FrozenNet, Guidance, Teacher, call_net

log = logging.getLogger("tessera.distill")
MODEL_CONFIG = "model_config.yaml"


class DistillState:
    """The method's state and this rank's data position, in the shape the checkpointer saves per rank."""

    def __init__(self, data, method: Method) -> None:
        self.data, self.method = data, method

    def state_dict(self) -> dict:
        """JSON-ready state."""
        return {"data": self.data.state_dict(), "method": self.method.state_dict()}

    def load(self, url: str, world_saved: int) -> None:
        """Restore from every rank's record of checkpoint ``url`` (the data merges across world sizes)."""
        states = [C.read_json(storage.join(url, "loader", f"rank{r}.json")) for r in range(world_saved)]
        self.data.load_rank_states([s["data"] for s in states])
        self.method.load_state_dict(states[0]["method"])


@dataclass
class StepResult:
    """What one optimizer step reports back to the loop."""

    loss: float  # mean over every rank's samples
    skipped: bool
    stop: bool
    out_of_time: bool
    ckpt: list[float]


def distill_step(ctx: Context, method: Method, micro_batches: list, step: int, stop: bool, late: bool,
                 ckpt_status: list[float], comm_dev) -> StepResult:
    """One optimizer step over the micro-batches, with the step's one all-reduce before the last backward
    (non-finite loss, stop, out of time, loss sum and count, every rank's checkpoint writer): a non-finite loss on
    any rank poisons every rank's last backward, so ZeRO skips the step on every rank alike."""
    engine, bad, losses = ctx.engine, torch.zeros((), device=comm_dev), []
    for i, batch in enumerate(micro_batches):
        loss_per = method.loss(ctx, batch, step)
        loss = loss_per.mean()
        bad = bad + (~torch.isfinite(loss)).to(comm_dev, torch.float32)
        losses.append(loss_per.detach())
        if i == len(micro_batches) - 1:
            local = torch.cat(losses)
            flags = torch.tensor([float(bad), float(stop), float(late), float(local.nan_to_num(0.0).sum()),
                                  float(local.numel()), *ckpt_status], device=comm_dev)
            any_bad, any_stop, any_late, loss_sum, n, *ckpt = all_reduce_sum(flags)
            if any_bad:
                loss = faults.nan_like(loss)
        engine.backward(loss)
        before = engine.skipped_steps
        engine.step()
    return StepResult(loss_sum / max(n, 1.0), engine.skipped_steps > before, bool(any_stop), bool(any_late), ckpt)


def build(cfg: DistillJobConfig, teacher_job, method: Method, session):
    """(context, base) for this process: teacher, student under DeepSpeed, EMA, target network, encoders."""
    device, world = session.device, session.world
    base = load_base(cfg.checkpoint, cfg.teacher_weights, device)
    student, source = build_student(base, cfg.lora)
    target = FrozenNet(copy.deepcopy(student)) if isinstance(method, LCM) or (cfg.lora.enabled and cfg.ema.enabled) \
        else None
    engine, dtype = engine_for(student, cfg.deepspeed, cfg.optim, cfg.data.batch_size, world, device)
    frags = Z.fragments(engine)
    ema = ShardedEMA(cfg.ema, frags) if cfg.ema.enabled else None
    frozen = Frozen(teacher_job.text_encoder, teacher_job.autoencoder, device)
    g = cfg.guidance
    smp = teacher_job.samples.sampler
    guidance = Guidance(smp.cfg_scale, smp.guidance_interval) if g.from_teacher else Guidance(g.cfg_scale,
                                                                                            g.guidance_interval)
    process = Process(teacher_job.objective)
    uncond_of = lambda cond: uncond_like(frozen.text, cond, device)  # noqa: E731
    ctx = Context(cfg=cfg, engine=engine, student=call_net(engine, dtype),
                  teacher=Teacher(source, process, guidance, uncond_of, dtype), process=process,
                  student_process=Process(method.student_objective()), frags=frags, ema=ema, uncond_of=uncond_of,
                  frozen=frozen, dtype=dtype, device=device, seed=cfg.train.seed, target=target)
    return ctx, base


def sync_ema_net(ctx: Context) -> None:
    """The target network <- the EMA (collective), for a LoRA run's merged EMA file."""
    if ctx.target is not None and ctx.ema is not None:
        LCM.sync_target(ctx)


def checkpoint_files(ctx: Context, method: Method):
    """Rank 0's extra checkpoint files: the method's, and for LoRA the merged raw (and EMA) model + the adapter."""
    def files() -> dict:
        out = dict(method.files())
        if is_lora(ctx.engine.module):
            out.update(lora_files(ctx.engine.module))
            if ctx.ema is not None:
                out["ema.safetensors"] = merged_weights(ctx.target.module)
        return out
    return files


def distill(cfg: DistillJobConfig) -> int:
    """Distil ``cfg.checkpoint`` into a few-step student until ``train.total_samples``; returns the exit code."""
    cfg.check()
    teacher_job = teacher_config(cfg)
    method = METHODS.get(cfg.method.name)(cfg.method.section(), cfg, teacher_job)
    lc, session = cfg.train, start_session(cfg)
    rank, world, run, tracker = session.rank, session.world, session.run, session.tracker
    ctx, base = build(cfg, teacher_job, method, session)
    engine, frags, ema = ctx.engine, ctx.frags, ctx.ema
    comm_dev = collective_device(dist.get_backend(), session.device)
    method.setup(ctx)
    state = DistillState(method.data(ctx, rank, world, run), method)
    ckpt = TS.Checkpointer(CheckpointManager(run.path("checkpoints"), lc.keep_last), run.path(MODEL_CONFIG),
                           session.config_hash, faults.checkpoint_drill(cfg.debug, rank), checkpoint_files(ctx, method),
                           device=comm_dev)
    st = TS.TrainState()
    resume_url = ckpt.resolve(lc.resume)
    if resume_url:
        TS.load(resume_url, engine, frags, ema, None, st, restore_loader=False)
        state.load(resume_url, C.read_json(storage.join(resume_url, "trainer_state.json"))["world_size"])
        method.restore(ctx, resume_url)
        log.info("resumed from %s at step %d (%d samples)", resume_url, st.step, st.samples)
    sampler = write_model_config(run, rank, base, cfg, method, None)

    accum = cfg.optim.grad_accum
    step_samples = cfg.data.batch_size * world * accum
    preempt, t_start, exit_code, late = PreemptionFlag(), time.time(), 0, False
    window = {"loss": 0.0, "n": 0, "t0": time.perf_counter(), "samples": 0}
    bar = progress(total=lc.total_samples - st.samples, desc=f"distill {cfg.method.name}", unit="sample")
    it = iter(state.data)
    while st.samples < lc.total_samples:
        set_lr(engine, lr_at(cfg.optim, st.samples + step_samples, lc.total_samples))
        res = distill_step(ctx, method, [next(it) for _ in range(accum)], st.step, preempt.requested, late,
                           ckpt.status(), comm_dev)
        ckpt.settle(res.ckpt)  # a failed checkpoint write on any rank raises here on every rank
        st.step, st.samples = st.step + 1, st.samples + step_samples
        after_step(st, res.skipped, "loss or gradient", 3, "stop", lambda: False)
        if ema is not None and not res.skipped and st.step % cfg.ema.update_every == 0:
            st.ema_decay = ema.update(st.step)
        extra = method.after_step(ctx, st.samples)
        if method.student_sampler() != sampler:  # a progressive round ended: the checkpoints carry the new sampler
            ckpt.finish()
            sampler = write_model_config(run, rank, base, cfg, method, sampler)
        window["loss"], window["n"], window["samples"] = window["loss"] + res.loss, window["n"] + 1, \
            window["samples"] + step_samples
        if crossed(st.samples, step_samples, lc.log_every_samples):
            dt = time.perf_counter() - window["t0"]
            tracker.log({"loss": window["loss"] / window["n"], "samples": st.samples, "samples_per_s":
                         window["samples"] / max(dt, 1e-9), "lr": engine.optimizer.param_groups[0]["lr"],
                         "grad_norm": grad_norm(engine), "skipped_steps": st.skipped, "ema_decay": st.ema_decay,
                         **extra, **{f"count/{k}": v for k, v in ctx.counters.items()}, **data_stats(state.data),
                         **ckpt.metrics()}, step=st.step)
            window = {"loss": 0.0, "n": 0, "t0": time.perf_counter(), "samples": 0}
        bar.update(step_samples)
        late = lc.max_minutes is not None and (time.time() - t_start) / 60 >= lc.max_minutes
        if res.stop or res.out_of_time or crossed(st.samples, step_samples, lc.ckpt_every_samples):
            save(ckpt, ctx, state, st)
        if res.stop:
            log.warning("preempted: checkpoint at step %d written, exiting %d", st.step, EXIT_PREEMPTED)
            exit_code = EXIT_PREEMPTED
            break
        if res.out_of_time:
            log.info("time budget of %.1f min reached at step %d", lc.max_minutes, st.step)
            break
    if exit_code == 0 and not ckpt.committed(st.step):
        save(ckpt, ctx, state, st)
    ckpt.finish()
    bar.close()
    tracker.finish()
    run.close()
    barrier()
    return exit_code


def save(ckpt: TS.Checkpointer, ctx: Context, state: DistillState, st: TS.TrainState) -> None:
    """Collective: the student's shards, EMA, data position and method state (and the extra files)."""
    sync_ema_net(ctx)
    ckpt.save(ctx.engine, ctx.frags, ctx.ema, state, st)


def data_stats(data) -> dict:
    """The data source's counters worth logging (dropped pairs, skipped samples)."""
    s = data.stats() if hasattr(data, "stats") else {}
    return {f"data/{k}": v for k, v in s.items() if isinstance(v, (int, float))}


def write_model_config(run, rank: int, base, cfg, method: Method, previous):
    """Rank 0 writes the training config the student's checkpoints carry; returns the sampler in it."""
    sampler = method.student_sampler()
    if rank == 0 and sampler != previous:
        job = student_job(base, cfg.run, method.student_objective(), sampler)
        run.write_text(MODEL_CONFIG, dump_yaml(job))
    barrier()
    return sampler


def teacher_config(cfg: DistillJobConfig):
    """The teacher's training config, checked against the method (a clear error names the methods that fit)."""
    from tessera.finetune.policy import base_job_config

    job = base_job_config(cfg.checkpoint)
    check_fits(cfg.method.name, job.objective, cfg.checkpoint)
    return job
