"""DeepSpeed's JSON, generated from our typed config, plus a checked passthrough (``deepspeed.extra``).

The generated config covers what Tessera decides (batch sizes, optimizer, precision, ZeRO stage, offload to CPU);
``deepspeed.extra`` is deep-merged over it last, for everything else DeepSpeed offers (NVMe offload, ZeRO++,
fp16 on GPUs without bf16, any ``stage3_*`` knob). DeepSpeed's own config parser checks the merged result when
the config is loaded, so ``--dry-run`` rejects a bad key before any process group exists.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from tessera.config import deep_merge

log = logging.getLogger("tessera.deepspeed")

# Keys Tessera sets from its own config: a value in ``extra`` would be overridden at run time or fight the loop.
OWNED_KEYS = {"train_batch_size": "data.batch_size", "train_micro_batch_size_per_gpu": "data.batch_size",
              "gradient_accumulation_steps": "optim.grad_accum", "scheduler": "optim.schedule (the loop sets the lr)",
              "gradient_clipping": "optim.grad_clip"}


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
    communication as stage 0 and less memory. ``auto`` takes the lowest stage whose per-rank model states fit in
    half the device's memory (``resolve_stage``): ZeRO-1 wherever it fits, because ZeRO-2 reduce-scatters the
    gradients on every micro-step of an accumulation, where ZeRO-1 reduces once per optimizer step.
    """

    stage: Literal["auto", 1, 2, 3] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA with bf16 support, else fp32
    offload_optimizer: bool = False
    offload_param: bool = False  # ZeRO-3 only
    # auto: torch's fused AdamW on CUDA (no JIT build: runs on runtime-only images), torch's foreach AdamW on CPU
    # (bit-exact resume); on: torch's fused AdamW anywhere; deepspeed: DeepSpeed's JIT-built FusedAdam; off: foreach.
    fused_adam: Literal["auto", "on", "off", "deepspeed"] = "auto"
    reduce_bucket_size: int = 50_000_000
    overlap_comm: Literal["auto", "on", "off"] = "auto"  # auto: on with CUDA streams, off on CPU/gloo
    # DeepSpeed config keys merged over the generated config last, e.g.
    # {zero_optimization: {offload_param: {device: nvme, nvme_path: /local_nvme}}}; checked by DeepSpeed on load.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.offload_param and self.stage not in (3, "auto"):
            raise ValueError("deepspeed.offload_param needs stage 3")
        owned = [f"{k} (set {v})" for k, v in OWNED_KEYS.items() if k in self.extra]
        if owned:
            raise ValueError(f"deepspeed.extra must not set {', '.join(owned)}")
        if self.extra:
            check_with_deepspeed(build_ds_config(self, OptimConfig(), micro_batch=1, world_size=1, cuda=False),
                                 self.extra)


def resolve_precision(ds: DeepSpeedConfig, cuda: bool, bf16_ok: bool) -> str:
    """The concrete precision for this machine."""
    if ds.precision != "auto":
        return ds.precision
    return "bf16" if cuda and bf16_ok else "fp32"


def resolve_stage(ds: DeepSpeedConfig, n_params: int, world: int, precision: str, capacity_bytes: float) -> int:
    """The ZeRO stage to run: the configured one, or for ``auto`` the lowest whose per-rank model states (ZeRO
    formulas, ``memory.zero_formula_bytes``) take at most half of ``capacity_bytes`` (activations need the rest)."""
    if ds.stage != "auto":
        return int(ds.stage)
    if ds.offload_param:
        return 3
    from tessera.trainer.memory import zero_formula_bytes

    for stage in (1, 2):
        need = zero_formula_bytes(n_params, stage, world, precision, ds.offload_optimizer)
        if sum(v for k, v in need.items() if k.startswith("device_")) <= 0.5 * capacity_bytes:
            return stage
    return 3


def device_capacity(device) -> float:
    """Bytes one rank may use: the GPU's memory, or this host's memory shared by its local ranks."""
    import torch

    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return psutil.virtual_memory().total / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def build_ds_config(ds: DeepSpeedConfig, optim: OptimConfig, *, micro_batch: int, world_size: int, cuda: bool,
                    bf16_ok: bool = False) -> dict[str, Any]:
    """DeepSpeed's config dict for one run. No ``scheduler``: the loop sets the lr of every optimizer step from
    ``schedule.lr_at(samples)``, so a resumed run needs no scheduler state."""
    precision = resolve_precision(ds, cuda, bf16_ok)
    # DeepSpeed's FusedAdam needs nvcc to JIT-build (runtime-only images fail) and drifts ~1e-7 across a resume
    # (ENVIRONMENT.md): torch's own AdamW serves, fused on CUDA. Under optimizer offload on GPUs DeepSpeed insists
    # on its CPU Adam (zero_force_ds_cpu_optimizer), the fast path there.
    ds_fused = ds.fused_adam == "deepspeed" or (cuda and ds.offload_optimizer)
    torch_fused = not ds_fused and (ds.fused_adam == "on" or (ds.fused_adam == "auto" and cuda))
    overlap = cuda if ds.overlap_comm == "auto" else ds.overlap_comm == "on"
    stage = 1 if ds.stage == "auto" else ds.stage  # engine_for resolves "auto" by memory; 1 is what fits a check
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": overlap, "contiguous_gradients": True,
                            "reduce_bucket_size": ds.reduce_bucket_size}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if stage == 3:
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
            "torch_adam": not ds_fused, "adam_w_mode": True, **({"fused": True} if torch_fused else {})}},
        "zero_optimization": zero,
        # check_grad_overflow: DeepSpeed skips a bf16 step with a non-finite gradient (the loop's guard relies on
        # it; ``require_deepspeed`` checks that the installed DeepSpeed has the option).
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        # Gradients accumulate in fp32 under bf16 (with ZeRO-1 DeepSpeed's bf16 optimizer does so); bf16 sums over
        # many micro-batches lose the small ones.
        **({"data_types": {"grad_accum_dtype": "fp32"}} if precision == "bf16" else {}),
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        # Offload on GPUs uses DeepSpeedCPUAdam (the fast path); on a CPU-only machine the states already live in
        # host memory, so torch's AdamW serves and no CPU-Adam extension has to be compiled.
        "zero_force_ds_cpu_optimizer": cuda,
    }
    if ds.extra.get("fp16", {}).get("enabled"):  # fp16 for GPUs without bf16 replaces the chosen precision
        out["bf16"]["enabled"] = False
    return deep_merge(out, ds.extra)


class _ReadKeys(dict):
    """A config mapping that records which top-level keys DeepSpeed's parser reads."""

    def __init__(self, data: dict) -> None:
        super().__init__(data)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key) -> bool:
        self.read.add(key)
        return super().__contains__(key)

    def __copy__(self) -> "_ReadKeys":  # DeepSpeedConfig copies the dict it parses: keep recording
        return self


def check_with_deepspeed(config: dict[str, Any], extra: dict[str, Any]) -> None:
    """Parse ``config`` with DeepSpeed's own ``DeepSpeedConfig`` (no process group needed: it assumes one rank);
    raise ``ValueError`` naming ``deepspeed.extra`` for what it rejects or never reads (a misspelt key)."""
    from tessera.device import configure_deepspeed_accelerator

    configure_deepspeed_accelerator()
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout; a --dry-run prints the config there
        from deepspeed.runtime.config import DeepSpeedConfig as _DSConfig
        from deepspeed.utils import logger as ds_logger

        level = ds_logger.level
        ds_logger.setLevel(logging.WARNING)
        recorded = _ReadKeys(config)
        try:
            _DSConfig(recorded)
        except Exception as e:  # pydantic ValidationError, AssertionError, DeepSpeedConfigError: all its verdicts
            raise ValueError(f"deepspeed.extra rejected by DeepSpeed: {type(e).__name__}: {e}") from None
        finally:
            ds_logger.setLevel(level)
    unread = sorted(k for k in extra if k not in recorded.read)
    if unread:
        raise ValueError(f"deepspeed.extra: DeepSpeed {_ds_version()} does not read key(s) {', '.join(unread)}")


def _ds_version() -> str:
    import deepspeed

    return deepspeed.__version__


def ops_to_build(config: dict[str, Any]) -> list[str]:
    """DeepSpeed op builders a generated config makes ``deepspeed.initialize`` load: FusedAdam, CPU Adam (optimizer
    offload on GPUs)."""
    cpu_adam = bool(config["zero_optimization"].get("offload_optimizer") and config.get("zero_force_ds_cpu_optimizer"))
    if cpu_adam:
        return ["CPUAdamBuilder"]
    return [] if config["optimizer"]["params"].get("torch_adam") else ["FusedAdamBuilder"]


def announce_op_builds(builders: list[str]) -> list[str]:
    """Say, before DeepSpeed compiles them, which of its ops (builder class names) it will JIT-build now: a minute
    or more each, once per machine, silent otherwise. Returns their names."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    pending = []
    for cls in builders:
        builder = get_accelerator().create_op_builder(cls)
        if builder is None or installed_ops.get(builder.NAME, False) or not builder.is_compatible(False):
            continue  # no such op here, shipped prebuilt, or DeepSpeed skips it
        build_dir = _jit_build_dir(builder.name)
        if build_dir is not None and any(f.endswith(".so") for f in os.listdir(build_dir)):
            continue  # built by an earlier run: loading takes a second
        pending.append(builder.name)
        print(f"tessera: DeepSpeed is building its {builder.name} op (once per machine; a minute or more). Later "
              f"runs load it from {build_dir or 'TORCH_EXTENSIONS_DIR'}.", file=sys.stderr, flush=True)
    return pending


def _jit_build_dir(name: str) -> str | None:
    """Where torch's JIT extension loader keeps the build of ``name`` (TORCH_EXTENSIONS_DIR), or None."""
    try:  # torch has no public accessor for it; without one we say "building" every time (still true the 1st)
        from torch.utils.cpp_extension import _get_build_directory

        path = _get_build_directory(name, verbose=False)
    except (ImportError, AttributeError, TypeError):
        return None
    return path if os.path.isdir(path) else None
