"""The distillation job's typed config: the teacher checkpoint, the method (one section each), the guidance folded
into the student, the data (the teacher's by default), LoRA, and the trainer's own optimizer/DeepSpeed/EMA/run/
tracking sections. Shipped recipes: ``configs/distill/{progressive,lcm,lcm_lora,reflow}.yaml``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from tessera.tracking import RunConfig, TrackingConfig
from tessera.trainer.diffusion.guidance import check_interval
from tessera.trainer.ds_config import DeepSpeedConfig, OptimConfig
from tessera.trainer.ema import EMAConfig
from tessera.trainer.faults import DebugConfig

from tessera.finetune.config import LoraSettings


@dataclass(kw_only=True)
class ProgressiveConfig:
    """Salimans & Ho 2022: each round halves the steps; a student step is fit to two DDIM steps of its teacher."""

    start_steps: int = 16  # the teacher's steps in the first round
    final_steps: int = 2  # the student's steps after the last round; train.total_samples is split over the rounds
    # "auto": an eps teacher's student is read as v (the paper: eps cannot express x0 at low SNR); native otherwise
    student_prediction: Literal["auto", "native", "v"] = "auto"

    def __post_init__(self) -> None:
        ratio = self.start_steps / max(1, self.final_steps)
        if self.final_steps < 1 or ratio < 2 or 2 ** round(math.log2(ratio)) != ratio:
            raise ValueError(f"progressive: start_steps / final_steps must be a power of 2 >= 2, got "
                             f"{self.start_steps} / {self.final_steps}")

    @property
    def rounds(self) -> int:
        """How many halvings."""
        return round(math.log2(self.start_steps / self.final_steps))


@dataclass(kw_only=True)
class LCMConfig:
    """Latent consistency distillation (Luo et al. 2023): the teacher's guided DDIM step over a skipping interval
    k = T / origin_steps, the EMA (``ema``) as the target network, a Huber loss."""

    origin_steps: int = 50  # N: the skipping-step grid (diffusers' DDIMSolver and LCMScheduler default)
    loss: Literal["huber", "l2"] = "huber"
    huber_c: float = 0.001  # diffusers' train_lcm_distill default
    sample_steps: int = 4  # what the student's checkpoint samples with (`tessera sample --steps` changes it)

    def __post_init__(self) -> None:
        if not 1 <= self.sample_steps <= self.origin_steps:
            raise ValueError(f"lcm.sample_steps must be in 1..origin_steps ({self.origin_steps}), "
                             f"got {self.sample_steps}")


@dataclass(kw_only=True)
class ReflowConfig:
    """Rectified flow's reflow (Liu et al. 2022): retrain on straight paths between noise and the teacher's image
    of that noise; optionally distil to one step afterwards (InstaFlow)."""

    pairs: int = 4096  # (noise, image) pairs generated with the teacher, cached (pairs.py)
    pair_steps: int | None = None  # the teacher's sampler steps for the pairs; null: its checkpoint's
    pair_batch: int = 64  # images per teacher batch (one cache chunk)
    cache_dir: str | None = None  # null: <run dir>/pairs; reused by a rerun when its fingerprint matches
    t_sampling: Literal["uniform", "teacher"] = "uniform"  # reflow's t ~ U(0, 1), or the teacher's training draws
    one_step_samples: int = 0  # > 0: the last this-many samples of train.total_samples train the one-step map
    sample_steps: int = 4  # what the student's checkpoint samples with
    # straight: reflow's straight paths noise -> image. trajectory: the student's k = sample_steps Euler steps on its
    # uniform grid are fit to the teacher's own path between the same levels (its states, cached with the pairs):
    # one-phase trajectory distillation (TRACT, Berthelot et al. 2023, from the full-step teacher in one jump).
    targets: Literal["straight", "trajectory"] = "straight"

    def __post_init__(self) -> None:
        if self.pairs < 1 or self.pair_batch < 1 or self.one_step_samples < 0 or self.sample_steps < 1:
            raise ValueError("reflow: pairs, pair_batch and sample_steps must be >= 1, one_step_samples >= 0")


@dataclass(kw_only=True)
class MethodConfig:
    """Which method runs, plus each method's own section (only the named one is used)."""

    name: Literal["progressive", "lcm", "reflow"] = "lcm"
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    lcm: LCMConfig = field(default_factory=LCMConfig)
    reflow: ReflowConfig = field(default_factory=ReflowConfig)

    def section(self):
        """The selected method's config."""
        return getattr(self, self.name)


@dataclass(kw_only=True)
class GuidanceSettings:
    """The classifier-free guidance folded into the student's targets (the student then samples at cfg 1)."""

    from_teacher: bool = True  # the teacher checkpoint's sampler cfg_scale and guidance_interval
    cfg_scale: float = 1.0  # used when from_teacher is false
    guidance_interval: list[float] | None = None  # used when from_teacher is false; null: every step

    def __post_init__(self) -> None:
        check_interval(self.guidance_interval)


@dataclass(kw_only=True)
class DistillData:
    """The samples the student trains on: the teacher's training data unless ``path`` is given."""

    path: list[str] | None = None  # null: the teacher's data.path
    caption_variants: dict[str, float] | None = None  # null: the teacher's mix
    batch_size: int = 16  # per rank
    num_workers: int = 1
    shuffle_buffer: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("data.batch_size must be >= 1 and data.num_workers >= 0")


@dataclass(kw_only=True)
class DistillLoopConfig:
    """Length, cadence and robustness; progress is counted in samples, as in training."""

    total_samples: int = 20_000
    max_minutes: float | None = None  # wall-clock budget: checkpoint and stop when reached
    seed: int = 0
    deterministic: bool = False
    log_every_samples: int = 256
    ckpt_every_samples: int = 5_000
    keep_last: int = 3
    resume: str = "auto"  # auto | none | <checkpoint dir>

    def __post_init__(self) -> None:
        if self.total_samples <= 0:
            raise ValueError(f"train.total_samples must be > 0, got {self.total_samples}")


@dataclass(kw_only=True)
class DistillJobConfig:
    """Everything ``tessera distill`` needs."""

    checkpoint: str = ""  # the teacher: training run, checkpoint or export dir (local or s3://)
    teacher_weights: Literal["ema", "raw"] = "ema"
    method: MethodConfig = field(default_factory=MethodConfig)
    guidance: GuidanceSettings = field(default_factory=GuidanceSettings)
    data: DistillData = field(default_factory=DistillData)
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(enabled=False))  # lcm + lora: LCM-LoRA
    run: RunConfig = field(default_factory=RunConfig)
    # W&B: the project and group of the run that trained the teacher (tessera.tracking)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(project=None, job_type="distill"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, grad_clip=1.0))
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(decay=0.999))
    train: DistillLoopConfig = field(default_factory=DistillLoopConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def check(self) -> None:
        """Cross-field checks (run time)."""
        from tessera.config import ConfigError

        if not self.checkpoint:
            raise ConfigError("checkpoint is required: the teacher's training run, checkpoint or export dir "
                              "(--checkpoint)")
        if self.lora.enabled and self.method.name == "progressive":
            raise ConfigError("progressive distillation makes each round's student the next round's teacher: train "
                              "the whole model (lora.enabled=false); LoRA is for lcm (LCM-LoRA) and reflow")
        if self.lora.enabled and self.deepspeed.stage == 3:
            raise ConfigError("LoRA keeps the frozen base whole on every rank: use deepspeed.stage 1 or 2")
        if self.method.name == "lcm" and not self.ema.enabled:
            raise ConfigError("lcm's target network is the EMA of the student: set ema.enabled=true "
                              "(configs/distill/lcm.yaml uses decay 0.95, as the paper)")
        if self.method.name == "reflow" and self.method.reflow.one_step_samples >= self.train.total_samples:
            raise ConfigError("reflow.one_step_samples must leave some of train.total_samples for the reflow itself")
