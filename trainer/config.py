"""The training job's typed config: one section per component, each handed only its own section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tessera.config import from_dict
from tessera.registry import RegistryError
from tessera.tracking import RunConfig, TrackingConfig
from tessera.trainer.autoencoders import AutoencoderConfig
from tessera.trainer.data import LoaderConfig
from tessera.trainer.data.prior import PriorConfig
from tessera.trainer.diffusion.cfg_dropout import CFGDropoutConfig
from tessera.trainer.diffusion.objectives import ObjectiveConfig
from tessera.trainer.diffusion.sampling import SamplerConfig
from tessera.trainer.ds_config import DeepSpeedConfig, OptimConfig
from tessera.trainer.ema import EMAConfig
from tessera.trainer.faults import DebugConfig
from tessera.trainer.lora import LoraSettings
from tessera.trainer.models import DiTConfig, MMDiTConfig, UNetConfig, build_model, config_class
from tessera.trainer.models.control import ControlConfig
from tessera.trainer.probes import ProbeConfig, probe_every
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

    ``control``: train a control branch (ControlNet) on the frozen base model that ``init_from`` names; the branch
    and its base are the model every stage builds from this section (docs/control.md).

    ``lora``: train LoRA adapters (PEFT) on the frozen base that ``init_from`` names; checkpoints hold only the
    adapters and the base's fingerprint, and every stage reads them merged (``trainer/lora.py``, docs/training.md).
    """

    name: str = "dit"  # dit | mmdit | unet, or a family an installed plugin registers (entry points tessera.models)
    dit: DiTConfig | None = None
    mmdit: MMDiTConfig | None = None
    unet: UNetConfig | None = None
    options: dict[str, Any] | None = None  # a plugin family's section, checked strictly against its config class
    init_from: str | None = None
    init_strict: bool = True
    control: ControlConfig | None = None
    lora: LoraSettings | None = None

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
        if self.control is not None and not self.init_from:
            raise ValueError("model.control trains a branch on a frozen base model: set model.init_from to the base "
                             "(a run, checkpoint, export or diffusers folder)")
        if self.lora is not None:
            if not self.lora.enabled:
                self.lora = None  # `lora: {enabled: false}` (or the override model.lora.enabled=false): a full run
            elif not self.init_from:
                raise ValueError("model.lora trains adapters on a frozen pretrained base: set model.init_from to the "
                                 "base (a run, checkpoint, export or diffusers folder)")
            elif self.control is not None:
                raise ValueError("model.lora and model.control both freeze the base: train one of them per run")

    def section(self):
        """The selected family's config (its defaults when the section is absent)."""
        if self.name not in BUILT_IN:
            return from_dict(config_class(self.name), self.options or {}, f"model.options ({self.name})")
        return getattr(self, self.name) or config_class(self.name)()

    def build(self, init: bool = True):
        """A fresh model of the selected family, loaded from ``init_from`` when set and ``init`` is True. With
        ``control`` the model is the controlled base: the base loaded from ``init_from`` (when ``init``) and
        frozen, its fingerprint pinned, and a fresh branch."""
        model = build_model(self.name, self.section())
        if init and self.init_from:
            from tessera.trainer.convert import init_weights

            init_weights(model, self.init_from, strict=self.init_strict)
        if self.lora is not None:
            from tessera.trainer.lora import LoraModel

            return LoraModel(model, self.lora, f"model.init_from={self.init_from}" if init else None)
        if self.control is None:
            return model
        from tessera.trainer.models.control import build_controlled

        controlled = build_controlled(model, self.control)
        if init:
            controlled.pin_base(f"model.init_from={self.init_from}")
        return controlled


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
    # Control runs (model.control): one condition image per prompt (local or s3://), resized to height x width;
    # the grid shows each condition above its image.
    control_images: list[str] = field(default_factory=list)


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
    # Steps between the host's reads of what the ranks agreed on (stop, time budget, checkpoint writers); log and
    # checkpoint steps read it too. Other steps never wait for the device; a stop request waits up to this many.
    host_sync_every_steps: int = 10
    # Regional torch.compile of the denoiser's repeated blocks (each block compiled once, reused by every layer):
    # auto = on with CUDA, off on CPU (inductor's CPU compile takes longer than a CPU run gains).
    compile: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self) -> None:
        if self.total_samples <= 0:
            raise ValueError(f"total_samples must be > 0, got {self.total_samples}")
        if self.host_sync_every_steps < 1:
            raise ValueError(f"host_sync_every_steps must be >= 1, got {self.host_sync_every_steps}")


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
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    # DreamBooth prior preservation: class images trained on beside the subject data (trainer/data/prior.py)
    prior: PriorConfig | None = None
    debug: DebugConfig = field(default_factory=DebugConfig)

    def cadence_warnings(self, world: int) -> list[str]:
        """Cadences (log, probe, checkpoint, grids, eval) that come round within a few optimizer steps at this
        world size's global batch: each costs extra forwards or a stall, so at scale they should be rarer."""
        step = self.data.batch_size * world * self.optim.grad_accum
        probe = probe_every(self)
        cadences = {"train.log_every_samples": self.train.log_every_samples, "probe (every_samples)": probe,
                    "train.ckpt_every_samples": self.train.ckpt_every_samples,
                    "samples.every_samples": self.samples.every_samples if self.samples.enabled else 0,
                    "eval.every_samples": self.eval.every_samples or 0}
        few = {"train.ckpt_every_samples": 50, "samples.every_samples": 50, "eval.every_samples": 50}
        return [f"{k}={v} is every {v / step:.1f} optimizer steps at a global batch of {step} ({world} ranks); "
                f"raise it to at least {few.get(k, 5)} steps ({few.get(k, 5) * step} samples)"
                for k, v in cadences.items() if v and v < few.get(k, 5) * step]

    def __post_init__(self) -> None:
        if self.model.lora is not None and self.deepspeed.stage == 3:
            raise ValueError("model.lora with deepspeed.stage=3: the frozen base stays whole on every rank and only "
                             "the adapters' small states are sharded; use stage 1 or 2 (or auto)")
        control, grid = self.model.control, self.samples
        if self.prior is not None and control is not None:
            raise ValueError("prior (class images) and model.control: prior preservation is for subject fine-tuning; "
                             "a control run has no class prior to keep")
        if control is None:
            if grid.control_images:
                raise ValueError("samples.control_images is for control runs (model.control)")
            return
        if control.condition not in self.data.conditions:  # the loader brings the branch's condition
            self.data.conditions.append(control.condition)
        if grid.enabled and len(grid.control_images) != len(grid.prompts):
            raise ValueError(f"a control run samples its grids with conditions: samples.control_images needs one "
                             f"image per samples.prompts entry ({len(grid.prompts)}), got {len(grid.control_images)}; "
                             "or set samples.enabled=false")
