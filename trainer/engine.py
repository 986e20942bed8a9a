"""Setting up a training process: seeds, the DeepSpeed engine around a plain model, the frozen encoders' cache
ids, and the per-sample generators every random draw of a step comes from."""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import torch

from tessera.trainer.ds_config import (announce_op_builds, build_ds_config, device_capacity, ops_to_build,
                                       resolve_precision, resolve_stage)


def seed_everything(seed: int, rank: int, deterministic: bool) -> None:
    """Seed python/numpy/torch per rank; in deterministic mode also pin kernels. Otherwise fp32 matmuls and
    convolutions may use TF32 tensor cores on Ampere+ GPUs (the fp32 parts of a bf16 run, and fp32 runs)."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def sample_generators(seed: int, step: int, keys: list[str]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by (seed, optimizer step, sample key): a sample's draws depend on
    nothing else, so a resumed run, another world size or another accumulation replays them exactly."""
    gens = []
    for key in keys:
        h = hashlib.sha256(f"{seed}:{step}:{key}".encode()).digest()
        gens.append(torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1)))
    return gens


def build_engine(model: torch.nn.Module, cfg, world: int, device: torch.device):
    """(DeepSpeed engine, compute dtype) for ``model`` under ``cfg.deepspeed``/``cfg.optim``; the lr is set by
    the loop before every optimizer step (``schedule.lr_at``)."""
    return engine_for(model, cfg.deepspeed, cfg.optim, cfg.data.batch_size, world, device)


# The oldest DeepSpeed whose bf16 path can skip a step with a non-finite gradient (``bf16.check_grad_overflow``,
# DeepSpeed PR #6976); older ones apply NaN steps under bf16 ZeRO, silently corrupting the weights.
DEEPSPEED_FLOOR = "0.17.1"


def require_deepspeed() -> None:
    """Refuse a DeepSpeed without ``bf16.check_grad_overflow``, naming the floor (checked at engine start-up)."""
    import deepspeed

    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config

        ok = "check_grad_overflow" in DeepSpeedBF16Config.model_fields
    except ImportError:  # before DeepSpeed's pydantic precision configs
        ok = False
    if not ok:
        raise RuntimeError(f"DeepSpeed {deepspeed.__version__} has no bf16.check_grad_overflow: its bf16 optimizer "
                           f"applies non-finite steps. Install deepspeed>={DEEPSPEED_FLOOR}")


def engine_for(model: torch.nn.Module, ds, optim, micro_batch: int, world: int, device: torch.device):
    """``build_engine`` from its parts (fine-tuning sets its own accumulation); only parameters that require
    grad are optimized (a LoRA run's frozen base stays out of the optimizer)."""
    import dataclasses

    import deepspeed

    require_deepspeed()
    cuda = device.type == "cuda"
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stage = resolve_stage(ds, n, world, resolve_precision(ds, cuda, cuda and torch.cuda.is_bf16_supported()),
                          device_capacity(device))
    ds = dataclasses.replace(ds, stage=stage)
    ds_cfg = build_ds_config(ds, optim, micro_batch=micro_batch, world_size=world, cuda=device.type == "cuda",
                             bf16_ok=device.type == "cuda" and torch.cuda.is_bf16_supported())
    announce_op_builds(ops_to_build(ds_cfg))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_cfg)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32
    return engine, dtype


def set_lr(engine, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
