"""The training loop: one explicit function that reads top to bottom (EDM/torchtitan style).

Progress is counted in samples, so schedules survive a change of batch size or world size. Every
random draw of a step (timesteps, noise, condition dropout) comes from a generator seeded by
(seed, rank, step): a resumed run replays the uninterrupted one bit for bit without any RNG hand-off.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time

import torch

from tessera.device import device_peak_flops, pick_device
from tessera.tracking import Run, Tracker
from tessera.trainer.config import TrainJobConfig
from tessera.trainer.guard import EXIT_PREEMPTED, PreemptionFlag, any_rank
from tessera.trainer import state as S
from tessera.trainer.distributed import barrier, detect_env, init_distributed
from tessera.trainer.grids import TrainHooks, log_sample_grid, run_eval_hook

log = logging.getLogger("tessera.train")


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A CPU generator for one step of one rank, independent of everything that came before."""
    h = hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def train(cfg: TrainJobConfig, hooks: TrainHooks | None = None) -> int:
    """Train until ``train.total_samples`` (or the time budget); returns the process exit code.

    ``hooks`` carries what lives above the trainer (in-training evaluation), built by the CLI."""
    import deepspeed

    from tessera.trainer.checkpoint import CheckpointManager, full_fp32_params
    from tessera.trainer.components import Frozen, batch_to_inputs
    from tessera.trainer.data import build_loader
    from tessera.trainer.diffusion.cfg_dropout import drop_condition
    from tessera.trainer.diffusion.objectives import build_objective
    from tessera.trainer.ds_config import build_ds_config, wsd_lr
    from tessera.trainer.ema import EMA
    from tessera.trainer.models import model_flops

    hooks = hooks or TrainHooks()
    if cfg.eval.every_samples and hooks.evaluate is None:
        raise ValueError("eval.every_samples is set but no evaluation hook was given: run through `tessera train` "
                         "(or pass evaluation.in_training.training_hooks(cfg))")
    lc = cfg.train
    denv = detect_env()
    init_distributed(denv)
    rank, world = denv.rank, denv.world_size
    S.seed_everything(lc.seed, rank, lc.deterministic)
    device = pick_device()

    run = Run(cfg.run, rank)
    run.attach_file_logging()
    config_hash = run.write_config(cfg)
    tracker = Tracker(cfg.tracking, run, cfg)
    ckpt = CheckpointManager(lc.ckpt_root or run.path("checkpoints"), lc.keep_last, rank)

    frozen = Frozen(cfg.text_encoder, cfg.autoencoder, device)
    S.use_precomputed_caches(cfg.data, frozen)
    model = cfg.model.build()
    if lc.activation_checkpointing:
        model.set_gradient_checkpointing(True)
    objective = build_objective(cfg.objective)
    loader = build_loader(cfg.data, rank=rank, world_size=world)
    micro = cfg.data.batch_size
    global_batch = micro * world
    total_steps = math.ceil(lc.total_samples / global_batch)
    ds_cfg = build_ds_config(cfg.deepspeed, cfg.optim, micro_batch=micro, world_size=world, total_steps=total_steps,
                             cuda=device.type == "cuda",
                             bf16_ok=device.type == "cuda" and torch.cuda.is_bf16_supported())
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_cfg)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    ema = EMA(cfg.ema, full_fp32_params(engine)) if cfg.ema.enabled else None

    st = S.TrainerState()
    resume_dir = ckpt.resolve(lc.resume)
    if resume_dir:
        S.load_checkpoint(resume_dir, engine, scheduler, ema, loader, st, rank)
        log.info("resumed from %s at step %d (%d samples)", resume_dir, st.step, st.samples)
    preempt = PreemptionFlag()
    peak = device_peak_flops(device, lc.cpu_peak_tflops)
    meter = S.Meter()
    t_start, exit_code = time.time(), 0
    bar = S.progress_bar(lc.total_samples, st.samples, rank)
    data_iter = iter(loader)

    while st.samples < lc.total_samples:
        # ---- data: precomputed embeddings/latents when the shard has them, else encode now
        t0 = time.perf_counter()
        batch = next(data_iter)
        t_data = time.perf_counter() - t0
        x0, cond, on_the_fly = batch_to_inputs(batch, frozen, device, dtype)
        gen = step_generator(lc.seed, rank, st.step)
        empty = frozen.empty() if cfg.cfg_dropout.p > 0 else None
        cond, n_dropped = drop_condition(cfg.cfg_dropout, cond, empty, gen)

        # ---- loss; a non-finite loss on ANY rank makes every rank skip the step
        def model_fn(x_t, timestep, c):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return engine(x_t.to(dtype), timestep, c.hidden, c.mask, c.pooled).float()

        if cfg.optim.schedule == "wsd":
            for group in engine.optimizer.param_groups:
                group["lr"] = wsd_lr(cfg.optim, st.samples + global_batch)
        loss_per, t = objective.loss(model_fn, x0, cond, gen)
        loss = loss_per.mean()
        if st.step in cfg.debug.nan_loss_at_steps and cfg.debug.nan_rank in (rank, -1):
            loss = loss * float("nan")
        bad_loss, stop_now = any_rank(not bool(torch.isfinite(loss)), preempt.requested)
        if bad_loss:
            skipped = True
        else:
            engine.backward(loss)
            if st.step in cfg.debug.nan_grad_at_steps and cfg.debug.nan_rank in (rank, -1):
                S.poison_local_grads(engine)
            engine.step()
            # DeepSpeed skips the update itself when the all-reduced grad norm is inf/NaN.
            skipped = S.step_was_skipped(engine)
        st.samples += global_batch
        st.step += 1
        if skipped:
            st.skipped += 1
            st.consecutive_skips += 1
            log.warning("non-finite %s at step %d: step skipped (%d in a row)",
                        "loss" if bad_loss else "gradient norm", st.step, st.consecutive_skips)
            if st.consecutive_skips >= lc.max_consecutive_skips:
                if lc.on_nonfinite == "stop" or not S.rollback(ckpt, engine, scheduler, ema, st, rank):
                    raise FloatingPointError(f"{st.consecutive_skips} consecutive non-finite steps at step {st.step}")
        else:
            st.consecutive_skips = 0
            if ema is not None and st.step % cfg.ema.update_every == 0:
                st.ema_decay = ema.update(full_fp32_params(engine), st.step)

        # ---- metrics
        meter.add(loss_per.detach(), t.detach(), t_data, batch, on_the_fly, n_dropped)
        if cfg.debug.record_keys:
            S.record_keys(run, rank, st.step, batch)
        h, w = x0.shape[-2:]
        flops = 3 * model_flops(engine.module, h, w, cond.hidden.shape[1]) * global_batch
        if st.samples // lc.log_every_samples != (st.samples - global_batch) // lc.log_every_samples:
            metrics = meter.flush(flops, peak, world)
            metrics.update(lr=engine.optimizer.param_groups[0]["lr"], skipped_steps=st.skipped,
                           rollbacks=st.rollbacks,
                           grad_norm=S.grad_norm(engine), samples=st.samples, memory_gb=S.memory_gb(device),
                           ema_decay=st.ema_decay)
            tracker.log(metrics, step=st.step)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", sps=f"{metrics['samples_per_s']:.1f}")
        bar.update(global_batch)

        # ---- EMA sample grids, checkpoints, time budget, preemption
        if cfg.samples.enabled and cfg.samples.every_samples and st.samples // cfg.samples.every_samples != \
                (st.samples - global_batch) // cfg.samples.every_samples:
            log_sample_grid(cfg, ema, engine, frozen, tracker, run, st.step, rank)
        if cfg.eval.every_samples and st.samples // cfg.eval.every_samples != \
                (st.samples - global_batch) // cfg.eval.every_samples:
            run_eval_hook(hooks, cfg, ema, engine, frozen, tracker, st.step, rank)
        out_of_time = lc.max_minutes is not None and (time.time() - t_start) / 60 >= lc.max_minutes
        out_of_time = any_rank(out_of_time)[0]
        if stop_now or out_of_time or st.samples // lc.ckpt_every_samples != \
                (st.samples - global_batch) // lc.ckpt_every_samples:
            S.save_checkpoint(ckpt, engine, scheduler, ema, loader, st, rank, run, config_hash)
        if stop_now:
            log.warning("preempted: checkpoint at step %d written, exiting %d", st.step, EXIT_PREEMPTED)
            exit_code = EXIT_PREEMPTED
            break
        if out_of_time:
            log.info("time budget of %.1f min reached at step %d", lc.max_minutes, st.step)
            break

    if exit_code == 0:
        if not ckpt.complete_steps() or ckpt.complete_steps()[-1] != st.step:
            S.save_checkpoint(ckpt, engine, scheduler, ema, loader, st, rank, run, config_hash)
        if cfg.samples.enabled:
            log_sample_grid(cfg, ema, engine, frozen, tracker, run, st.step, rank)
    bar.close()
    tracker.finish()
    run.close()
    barrier()
    return exit_code
