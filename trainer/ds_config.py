"""DeepSpeed's JSON, generated from our typed config (never hand-written by users)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and its learning-rate schedule; schedule lengths are counted in samples."""

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


def wsd_lr(optim: OptimConfig, samples: int) -> float:
    """The wsd learning rate of the step that brings the run to ``samples`` samples seen."""
    if optim.warmup_samples and samples < optim.warmup_samples:
        return optim.lr * samples / optim.warmup_samples
    start = optim.decay_start_samples
    if start is None or samples <= start:
        return optim.lr
    frac = min(1.0, (samples - start) / max(1, optim.decay_samples))
    return optim.lr * (1.0 - frac * (1.0 - optim.min_lr_ratio))


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """ZeRO stage, precision and offload."""

    stage: Literal[0, 1, 2, 3] = 2
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


def build_ds_config(ds: DeepSpeedConfig, optim: OptimConfig, *, micro_batch: int, world_size: int,
                    total_steps: int, cuda: bool, bf16_ok: bool = False) -> dict[str, Any]:
    """DeepSpeed's config dict for one run; ``total_steps`` counts optimizer steps."""
    precision = resolve_precision(ds, cuda, bf16_ok)
    # torch's AdamW on CPU: FusedAdam needs a JIT build and drifts ~1e-7 across a resume (ENVIRONMENT.md).
    fused = cuda if ds.fused_adam == "auto" else ds.fused_adam == "on"
    overlap = cuda if ds.overlap_comm == "auto" else ds.overlap_comm == "on"
    warmup_steps = optim.warmup_samples // max(1, micro_batch * world_size * optim.grad_accum)
    # DeepSpeed's schedulers need warmup_num_steps >= 1; "no warmup" is a 1-step warmup starting at the peak.
    start = 0.0 if warmup_steps else 1.0
    if optim.schedule == "wsd":
        scheduler = None  # the loop sets the lr from wsd_lr(samples) before every step
    elif optim.schedule == "cosine":
        scheduler = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max(total_steps, warmup_steps + 1), "warmup_num_steps": max(warmup_steps, 1),
            "warmup_min_ratio": start, "cos_min_ratio": optim.min_lr_ratio, "warmup_type": "linear"}}
    else:
        scheduler = {"type": "WarmupLR", "params": {
            "warmup_min_lr": optim.lr * start, "warmup_max_lr": optim.lr, "warmup_num_steps": max(warmup_steps, 1),
            "warmup_type": "linear"}}
    zero: dict[str, Any] = {"stage": ds.stage, "overlap_comm": overlap, "contiguous_gradients": True,
                            "reduce_bucket_size": ds.reduce_bucket_size}
    if ds.stage >= 1 and ds.offload_optimizer:
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
    }
    if scheduler is not None:
        out["scheduler"] = scheduler
    return out
