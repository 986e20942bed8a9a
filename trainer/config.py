"""The training job's typed config: one section per component, each handed only its own section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tessera.config import from_dict
from tessera.registry import RegistryError
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


BUILT_IN = ("dit", "mmdit", "unet")  # the families with a section of their own below


@dataclass(kw_only=True)
class ModelConfig:
    """Which denoiser family to train, plus that family's own section (only the named one is used).

    ``init_from``: the weights a new run starts from (fresh optimizer, schedule and loader): a diffusers model
    folder or pipeline root (PixArt-α/Σ, SD3/SD3.5, SD/SDXL UNet), an original DiT ``.pt``/``.safetensors``,
    or a Tessera export, checkpoint or run. The section must describe the same architecture (``tessera
    import`` prints it); ``init_strict: false`` loads what fits and keeps fresh weights for the rest
    (docs/models.md).
    """

    name: str = "dit"  # dit | mmdit | unet, or a family an installed plugin registers (entry points tessera.models)
    dit: DiTConfig | None = None
    mmdit: MMDiTConfig | None = None
    unet: UNetConfig | None = None
    options: dict[str, Any] | None = None  # a plugin family's section, checked strictly against its config class
    init_from: str | None = None
    init_strict: bool = True

    def __post_init__(self) -> None:
        try:
            config_class(self.name)
        except RegistryError as e:
            raise ValueError(str(e)) from None
        extra = [s for s in ("dit", "mmdit", "unet") if s != self.name and getattr(self, s) is not None]
        if self.options is not None and self.name in BUILT_IN:
            extra.append("options")
        if extra:
            raise ValueError(f"section(s) {', '.join(extra)} set but model.name is {self.name!r}")
        if self.name not in BUILT_IN:  # a plugin's section: strict now, so --dry-run reports a bad key
            from_dict(config_class(self.name), self.options or {}, f"model.options ({self.name})")

    def section(self):
        """The selected family's config (its defaults when the section is absent)."""
        if self.name not in BUILT_IN:
            return from_dict(config_class(self.name), self.options or {}, f"model.options ({self.name})")
        return getattr(self, self.name) or config_class(self.name)()

    def build(self, init: bool = True):
        """A fresh model of the selected family, loaded from ``init_from`` when set and ``init`` is True."""
        model = build_model(self.name, self.section())
        if init and self.init_from:
            from tessera.trainer.convert import init_weights

            init_weights(model, self.init_from, strict=self.init_strict)
        return model


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
