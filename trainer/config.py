"""The training job's typed config: one section per component, each handed only its own section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tessera.tracking import RunConfig, TrackingConfig
from tessera.trainer.autoencoders import AutoencoderConfig
from tessera.trainer.data import LoaderConfig
from tessera.trainer.diffusion.cfg_dropout import CFGDropoutConfig
from tessera.trainer.diffusion.objectives import ObjectiveConfig
from tessera.trainer.diffusion.sampling import SamplerConfig
from tessera.trainer.ds_config import DeepSpeedConfig, OptimConfig
from tessera.trainer.ema import EMAConfig
from tessera.trainer.faults import DebugConfig
from tessera.trainer.models import DiTConfig, MMDiTConfig, UNetConfig, build_model, config_class
from tessera.trainer.text_encoders import TextEncoderConfig


@dataclass(kw_only=True)
class ModelConfig:
    """Which denoiser family to train, plus that family's own section (only the named one is used)."""

    name: Literal["dit", "mmdit", "unet"] = "dit"
    dit: DiTConfig | None = None
    mmdit: MMDiTConfig | None = None
    unet: UNetConfig | None = None

    def __post_init__(self) -> None:
        extra = [s for s in ("dit", "mmdit", "unet") if s != self.name and getattr(self, s) is not None]
        if extra:
            raise ValueError(f"section(s) {', '.join(extra)} set but model.name is {self.name!r}")

    def section(self):
        """The selected family's config (its defaults when the section is absent)."""
        return getattr(self, self.name) or config_class(self.name)()

    def build(self):
        """A fresh model of the selected family."""
        return build_model(self.name, self.section())


@dataclass(kw_only=True)
class SampleGridConfig:
    """EMA sample grids for fixed prompts, logged during training."""

    enabled: bool = True
    every_samples: int = 0  # 0: only at the end
    prompts: list[str] = field(default_factory=lambda: ["a red apple", "a smiling face emoji", "a blue car",
                                                        "a green tree"])
    height: int = 32  # pixels
    width: int = 32
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(steps=20, cfg_scale=3.0))


@dataclass(kw_only=True)
class InTrainingEvalConfig:
    """A small evaluation suite (configs/eval/*.yaml) run on the EMA weights every N samples."""

    every_samples: int = 0  # 0: off
    suite: str | None = None  # suite YAML path
    overrides: list[str] = field(default_factory=list)  # dotted overrides of the suite

    def __post_init__(self) -> None:
        if self.every_samples and not self.suite:
            raise ValueError("eval.every_samples needs eval.suite (a configs/eval/*.yaml file)")


@dataclass(kw_only=True)
class LoopConfig:
    """Length, cadence and robustness of the loop; progress is counted in samples."""

    total_samples: int = 10_000
    max_minutes: float | None = None  # wall-clock budget: checkpoint and stop when reached
    seed: int = 0
    deterministic: bool = False  # bitwise-reproducible kernels (slower); needed for exact-resume checks
    log_every_samples: int = 256
    ckpt_every_samples: int = 5_000
    keep_last: int = 3
    ckpt_root: str | None = None  # default: <run dir>/checkpoints
    resume: str = "auto"  # auto | none | <checkpoint dir>
    max_consecutive_skips: int = 3
    on_nonfinite: Literal["rollback", "stop"] = "rollback"
    activation_checkpointing: bool = False
    cpu_peak_tflops: float = 1.0  # for MFU on CPU; GPUs use the table in tessera/device.py

    def __post_init__(self) -> None:
        if self.total_samples <= 0:
            raise ValueError(f"total_samples must be > 0, got {self.total_samples}")


@dataclass(kw_only=True)
class TrainJobConfig:
    """Everything ``tessera train`` needs."""

    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    cfg_dropout: CFGDropoutConfig = field(default_factory=CFGDropoutConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    samples: SampleGridConfig = field(default_factory=SampleGridConfig)
    eval: InTrainingEvalConfig = field(default_factory=InTrainingEvalConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
