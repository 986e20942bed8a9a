"""DeepSpeed's JSON, generated from our typed config (never hand-written by users)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (``trainer/schedule.py``); schedule lengths are counted in samples."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_samples: int = 0
    schedule: Literal["constant", "cosine", "wsd"] = "constant"
    min_lr_ratio: float = 0.0  # cosine and wsd floor, as a fraction of lr
    # wsd (warmup-stable-decay, as MiniCPM and DeepSeek train): the peak lr until decay_start_samples (None: never),
    # then linear to min_lr_ratio * lr over decay_samples. A pure function of samples seen, with no scheduler
    # state, so the decay can be placed when the run's length is known (e.g. from a measured throughput under a
    # time budget) and a stable-phase checkpoint can be continued with a later decay.
    decay_start_samples: int | None = None
    decay_samples: int = 0
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still computed, for the non-finite guard)
    grad_accum: int = 1

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must have 2 values, got {self.betas}")
        if self.grad_accum < 1:
            raise ValueError(f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        if self.decay_samples < 0 or (self.decay_start_samples is not None and self.decay_start_samples < 0):
            raise ValueError("optim.decay_start_samples and optim.decay_samples must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """ZeRO stage, precision and offload.

    Stage 0 (plain data parallel) is not offered: the loop's non-finite guard relies on ZeRO's own overflow
    check, which skips a step with a non-finite gradient norm on every rank alike; stage 1 costs the same
    communication as stage 0 and less memory.
    """

    stage: Literal[1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA with bf16 support, else fp32
    offload_optimizer: bool = False
    offload_param: bool = False  # ZeRO-3 only
    fused_adam: Literal["auto", "on", "off"] = "auto"  # auto: DeepSpeed's FusedAdam on CUDA, torch AdamW elsewhere
    reduce_bucket_size: int = 50_000_000
    overlap_comm: Literal["auto", "on", "off"] = "auto"  # auto: on with CUDA streams, off on CPU/gloo

    def __post_init__(self) -> None:
        if self.offload_param and self.stage != 3:
            raise ValueError("deepspeed.offload_param needs stage 3")


def resolve_precision(ds: DeepSpeedConfig, cuda: bool, bf16_ok: bool) -> str:
    """The concrete precision for this machine."""
    if ds.precision != "auto":
        return ds.precision
    return "bf16" if cuda and bf16_ok else "fp32"


def build_ds_config(ds: DeepSpeedConfig, optim: OptimConfig, *, micro_batch: int, world_size: int, cuda: bool,
                    bf16_ok: bool = False) -> dict[str, Any]:
    """DeepSpeed's config dict for one run. No ``scheduler``: the loop sets the lr of every optimizer step from
    ``schedule.lr_at(samples)``, so a resumed run needs no scheduler state."""
    precision = resolve_precision(ds, cuda, bf16_ok)
    # torch's AdamW on CPU: FusedAdam needs a JIT build and drifts ~1e-7 across a resume (ENVIRONMENT.md).
    fused = cuda if ds.fused_adam == "auto" else ds.fused_adam == "on"
    overlap = cuda if ds.overlap_comm == "auto" else ds.overlap_comm == "on"
    zero: dict[str, Any] = {"stage": ds.stage, "overlap_comm": overlap, "contiguous_gradients": True,
                            "reduce_bucket_size": ds.reduce_bucket_size}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if ds.stage == 3:
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": True})
        if ds.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": optim.grad_accum,
        "train_batch_size": micro_batch * optim.grad_accum * world_size,
        # A norm is always computed: the non-finite guard relies on DeepSpeed's overflow check of it.
        "gradient_clipping": optim.grad_clip if optim.grad_clip > 0 else 1e30,
        "optimizer": {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
            "torch_adam": not fused, "adam_w_mode": True}},
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        # Offload on GPUs uses DeepSpeedCPUAdam (the fast path); on a CPU-only machine the states already live in
        # host memory, so torch's AdamW serves and no CPU-Adam extension has to be compiled.
        "zero_force_ds_cpu_optimizer": cuda,
    }
    return out
