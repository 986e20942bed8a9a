"""The fine-tuning loop: one explicit function, like the training loop, counted in updates (one round of sampling
and its optimizer steps).

The run directory is a training run's: ``config.yaml`` (this job), ``metrics.jsonl``, W&B, ``logs/``,
``samples/step_*.png`` (held-out grids) and ``checkpoints/step_*`` written by the trainer's ``Checkpointer``
(each rank writes its own shard in the background; exact resume). The trainable state (the LoRA adapter, or the
whole model) and its Adam moments are sharded like a training run's. A LoRA checkpoint also holds the merged
model as ``model.safetensors`` with a training config (``config.yaml``) describing it, so ``tessera
sample/export/eval`` read it as a model file, and ``lora/`` (PEFT's format); rank 0 writes both
(``policy.lora_files``). Rewards are gathered over the ranks for the advantages; the method state (DDPO's
per-prompt buffers) travels in the checkpoint's per-rank ``loader`` record, RNG states as in training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time

import torch
import torch.distributed as dist

from tessera import storage
from tessera.config import dump_yaml
from tessera.evaluation.rewards import build_rewards
from tessera.tracking import Run
from tessera.trainer import checkpoint as C
from tessera.trainer import faults
from tessera.trainer import train_state as TS
from tessera.trainer import zero_state as Z
from tessera.trainer.checkpoint import CheckpointManager
from tessera.trainer.diffusion.objectives import build_objective
from tessera.trainer.distributed import all_reduce_sum, barrier, collective_device
from tessera.trainer.engine import engine_for, set_lr
from tessera.trainer.guard import EXIT_PREEMPTED, PreemptionFlag
from tessera.trainer.inference import model_from_weights
from tessera.trainer.metrics import grad_norm
from tessera.trainer.schedule import lr_at
from tessera.trainer.session import start_session

from tessera.finetune.config import FinetuneJobConfig
from tessera.finetune.heldout import HeldOut
from tessera.finetune.methods import METHODS, Batch, Context
from tessera.finetune.policy import Reference, checkpoint_job, is_lora, load_base, lora_files, wrap_lora
from tessera.finetune.rollout import GaussianPolicy, model_fn_of

log = logging.getLogger("tessera.finetune")

# Written when the held-out guard stops a run (eval.max_kl / max_fid): the run is over, its newest checkpoint is the
# last one whose evaluation passed, and a rerun does nothing. The process exits 0 (the job is done, not failed).
EARLY_STOP = "early_stop.json"


class MethodState:
    """The method's resumable state in the shape the trainer's checkpointer saves per rank (``loader``)."""

    def __init__(self, method) -> None:
        self.method = method

    def state_dict(self) -> dict:
        """JSON-ready state (identical on every rank)."""
        return {"method": self.method.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore it."""
        self.method.load_state_dict(state.get("method", {}))


def make_batch(pool: list[str], update: int, seed: int, per_rank: int, world: int, rank: int, group: int) -> Batch:
    """The update's prompts: ``per_rank * world / group`` seeded draws from the pool, each ``group`` times."""
    n = per_rank * world
    if n % group:
        raise ValueError(f"{n} samples per update do not split into groups of {group}")
    rnd = random.Random(f"{seed}:{update}:prompts")
    prompts = [p for p in (rnd.choice(pool) for _ in range(n // group)) for _ in range(group)]
    return Batch(update, prompts, [f"u{update}/s{i}" for i in range(n)], rank, per_rank,
                 [f"u{update}/g{i // group}" for i in range(n)])


def build(cfg: FinetuneJobConfig, device, world: int, run: Run):
    """(context, method, heldout guard, base) for this process."""
    base = load_base(cfg.checkpoint, cfg.base_weights, device)
    method = METHODS.get(cfg.method.name)(cfg.method.section(), cfg)
    model = wrap_lora(base.model, cfg.lora) if cfg.lora.enabled else base.model.train()
    reference = Reference(model)
    if cfg.method.name == "draft" and cfg.method.draft.activation_checkpointing:
        (model.get_base_model() if is_lora(model) else model).set_gradient_checkpointing(True)
    optim = dataclasses.replace(cfg.optim, grad_accum=method.backward_calls())
    engine, dtype = engine_for(model, cfg.deepspeed, optim, cfg.rollout.batch_size, world, device)
    h, w = cfg.rollout.height or base.size[0], cfg.rollout.width or base.size[1]
    latent_shape = base.autoencoder.latent_shape(h, w)
    spacing = base.sampler.timestep_spacing
    r = cfg.rollout
    ctx = Context(cfg=cfg, engine=engine, train_fn=model_fn_of(engine, dtype), sample_fn=model_fn_of(engine.module, dtype),
                  reference=reference, ref_fn=lambda m: model_fn_of(m, dtype),
                  policy=GaussianPolicy(base.objective, r.steps, eta=r.eta, noise_level=r.noise_level,
                                        image_shape=(1, *latent_shape), spacing=spacing, window=r.sde_window),
                  ode=GaussianPolicy(base.objective, r.steps, eta=0.0, noise_level=0.0, image_shape=(1, *latent_shape),
                                     spacing=spacing),
                  text_encoder=base.text_encoder, autoencoder=base.autoencoder, objective=build_objective(base.objective),
                  reward=build_rewards(cfg.reward), latent_shape=latent_shape, device=device,
                  comm_device=collective_device(dist.get_backend(), device), seed=cfg.train.seed)
    measure = build_rewards(cfg.eval.reward) if cfg.eval.reward else ctx.reward
    kl_scale = r.cfg_scale if getattr(cfg.method.section(), "train_cfg", True) else 1.0  # as GRPO's training KL
    heldout = HeldOut(cfg.eval, base, r, measure, run, device, latent_shape, kl_cfg_scale=kl_scale)
    return ctx, method, heldout, base


def guard(heldout: HeldOut, ctx: Context, base, frags, update: int, tracker, rank: int) -> str | None:
    """Rank 0 evaluates the held-out prompts (ZeRO-3 weights are gathered first); every rank learns whether to
    stop early."""
    engine = ctx.engine
    weights = Z.gather_to_rank0(frags, lambda f: f.view()) if engine.zero_optimization_stage() == 3 else None
    reason = None
    if rank == 0:
        model = engine.module if weights is None else model_from_weights(base.job.model, weights, ctx.device)
        _, reason = heldout.evaluate(model, ctx.reference, update, tracker)
    box = [reason]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def finetune(cfg: FinetuneJobConfig) -> int:
    """Fine-tune ``cfg.checkpoint`` for ``train.updates`` updates (or the time budget); returns the exit code."""
    cfg.check()
    lc, session = cfg.train, start_session(cfg)
    rank, world, device, run, tracker = session.rank, session.world, session.device, session.run, session.tracker
    if storage.exists(run.path(EARLY_STOP)):
        log.warning("this run was stopped early by its held-out guard (%s): nothing to do; delete that file to "
                    "continue it", run.path(EARLY_STOP))
        tracker.finish()
        run.close()
        barrier()
        return 0
    ctx, method, heldout, base = build(cfg, device, world, run)
    engine, frags = ctx.engine, Z.fragments(ctx.engine)
    lora = is_lora(engine.module)
    if rank == 0:  # the training config every checkpoint carries: sample/export/eval read the merged model with it
        run.write_text("model_config.yaml", dump_yaml(checkpoint_job(base, run_cfg=cfg.run)))
    ckpt = TS.Checkpointer(CheckpointManager(run.path("checkpoints"), lc.keep_last), run.path("model_config.yaml"),
                           session.config_hash, faults.checkpoint_drill(cfg.debug, rank),
                           (lambda: lora_files(engine.module)) if lora else None, device=ctx.comm_device)
    st, state = TS.TrainState(), MethodState(method)
    resume_url = ckpt.resolve(lc.resume)
    if resume_url:
        TS.load(resume_url, engine, frags, None, None, st, restore_loader=False)
        state.load_state_dict(C.read_json(storage.join(resume_url, "loader", "rank0.json")))  # same on every rank
        log.info("resumed from %s at update %d", resume_url, st.step)

    pool = cfg.prompts.load()
    per_rank, group = method.per_rank(), method.group_size()
    step_samples, total = per_rank * world, per_rank * world * lc.updates
    preempt, t_start, exit_code, early = PreemptionFlag(), time.time(), 0, None
    if st.step == 0:
        guard(heldout, ctx, base, frags, 0, tracker, rank)
    evaluated = st.step
    while st.step < lc.updates:
        t0 = time.perf_counter()
        set_lr(engine, lr_at(cfg.optim, st.samples + step_samples, total))
        batch = make_batch(pool, st.step, lc.seed, per_rank, world, rank, group)
        skipped = engine.skipped_steps
        metrics = method.update(ctx, batch)
        st.step, st.samples = st.step + 1, st.samples + step_samples
        late = lc.max_minutes is not None and (time.time() - t_start) / 60 >= lc.max_minutes
        flags = torch.tensor([float(preempt.requested), float(late), *ckpt.status()], device=ctx.comm_device)
        stop, late, *writers = all_reduce_sum(flags)  # every rank stops at the same update
        stop, late = bool(stop), bool(late)
        ckpt.settle(writers)  # a failed checkpoint write on any rank raises here on every rank
        st.skipped += engine.skipped_steps - skipped
        if st.step % lc.log_every == 0 or st.step == lc.updates:
            metrics.update(lr=engine.optimizer.param_groups[0]["lr"], grad_norm=grad_norm(engine),
                           skipped_steps=st.skipped, samples=st.samples, update_seconds=time.perf_counter() - t0,
                           **{f"count/{k}": v for k, v in ctx.counters.items()}, **ckpt.metrics())
            tracker.log(metrics, step=st.step)
        if (cfg.eval.every and st.step % cfg.eval.every == 0) or st.step == lc.updates:
            early, evaluated = guard(heldout, ctx, base, frags, st.step, tracker, rank), st.step
        if early:  # the bound passed: this state is not kept, so the newest checkpoint is the last good one
            break
        if stop or late or st.step % lc.ckpt_every == 0 or (evaluated == st.step and cfg.eval.bounded):
            ckpt.save(engine, frags, None, state, st)  # with a bound, every passing evaluation is checkpointed
        if stop:
            log.warning("preempted: checkpoint at update %d written, exiting %d", st.step, EXIT_PREEMPTED)
            exit_code = EXIT_PREEMPTED
            break
        if late:
            log.info("time budget of %.1f min reached at update %d", lc.max_minutes, st.step)
            break
    if early:
        # after the save in flight is committed; a run resumed from another run's checkpoint may have none of its own
        last = ckpt.resolve("auto") or resume_url
        log.warning("early stop at update %d: %s; the last good checkpoint is %s", st.step, early,
                    last or f"the base ({cfg.checkpoint})")
        if rank == 0:
            storage.write_text(run.path(EARLY_STOP), json.dumps({"update": st.step, "reason": early,
                                                                  "last_good_checkpoint": last}))
    elif exit_code == 0:
        if evaluated != st.step:
            guard(heldout, ctx, base, frags, st.step, tracker, rank)
        if not ckpt.committed(st.step):
            ckpt.save(engine, frags, None, state, st)
    ckpt.finish()
    if lc.dump_rank_weights:  # what each rank holds, to prove the ranks agree
        C.write_tensors(str(run.local_dir / "rank_weights" / f"rank{rank}.safetensors"),
                        {n: p.detach().cpu() for n, p in engine.module.named_parameters() if p.requires_grad})
    tracker.finish()
    run.close()
    barrier()
    return exit_code
