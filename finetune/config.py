"""The fine-tuning job's typed config: the base checkpoint, the method (one section each), LoRA, the reward, the
shared sampler, the held-out guard, and the trainer's own optimizer/DeepSpeed/run/tracking sections.

Defaults of each method section are the published ones (ddpo-pytorch ``config/base.py``, flow_grpo
``config/grpo.py``, DiffusionDPO's launchers, DRaFT/AlignProp/ReFL); the shipped ``configs/finetune/*.yaml``
shrink the batch sizes to a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tessera.evaluation.prompts import PromptSetConfig
from tessera.evaluation.rewards import RewardTerm
from tessera.tracking import RunConfig, TrackingConfig
from tessera.trainer.diffusion.sampling import SamplerConfig
from tessera.trainer.ds_config import DeepSpeedConfig, OptimConfig
from tessera.trainer.faults import DebugConfig
from tessera.trainer.lora import LoraSettings  # noqa: F401 (the fine-tuning config's lora section)


@dataclass(kw_only=True)
class PromptSource(PromptSetConfig):
    """Prompts listed inline (``items``) or read from a prompt file (``path``: the evaluation suites' formats)."""

    items: list[str] = field(default_factory=list)

    def load(self) -> list[str]:
        """The prompts: ``items`` when given, else the (seeded subset of the) file's."""
        from tessera.evaluation.prompts import load_prompt_set, select_subset

        out = select_subset(list(self.items), self.limit, self.seed) if self.items else load_prompt_set(self)
        if not out:
            raise ValueError(f"no prompts in {self.path if not self.items else 'items'}")
        return out


@dataclass(kw_only=True)
class RolloutConfig:
    """The one sampler every method draws from: a Gaussian policy per step with its log-probability."""

    steps: int = 10  # flow_grpo trains on 10 steps (40 at evaluation); ddpo-pytorch 50
    cfg_scale: float = 4.5  # flow_grpo 4.5; ddpo-pytorch 5.0
    eta: float = 1.0  # DDIM eta of the DDPM policy (ddpo-pytorch 1.0)
    noise_level: float = 0.7  # a in sigma_t = a * sqrt(t / (1 - t)) of the flow SDE (flow_grpo 0.7)
    # Stochastic (and trained) steps [lo, hi); null: every step (DDPO, Flow-GRPO). MixGRPO/Flow-GRPO-Fast sample
    # the SDE in an early window and the ODE after it: far less variance per sample (see docs/finetune.md).
    sde_window: list[int] | None = None
    # The G images of a GRPO group start from one x_T (DanceGRPO, Xue et al. 2025), and their advantages are
    # relative to that group alone: a reward difference inside a group is then the policy's own noise (its
    # actions), not the start noise, which no policy gradient can credit. On the digits task it cut the mean
    # |advantage| from 0.38 to 0.30 (the start noise's share) and its judged effect was within one seed's noise
    # (docs/finetune.md, "The policy gradient that moved it").
    group_noise: bool = False
    batch_size: int = 8  # images per forward on each rank; also the training micro-batch
    batches_per_update: int = 2  # micro-batches each rank samples per update (ddpo-pytorch num_batches_per_epoch)
    height: int | None = None  # pixels; null: the checkpoint's sample size
    width: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.batches_per_update < 1:
            raise ValueError("rollout.steps, batch_size and batches_per_update must be >= 1")
        if self.eta < 0 or self.noise_level < 0:
            raise ValueError("rollout.eta and rollout.noise_level must be >= 0")
        if self.sde_window is not None and not (len(self.sde_window) == 2
                                                and 0 <= self.sde_window[0] < self.sde_window[1] <= self.steps):
            raise ValueError(f"rollout.sde_window must be [lo, hi) with 0 <= lo < hi <= steps, got {self.sde_window}")


@dataclass(kw_only=True)
class PolicyGradientConfig:
    """What DDPO and Flow-GRPO share: PPO's clipped importance ratio over the steps of sampled trajectories."""

    clip_range: float = 1e-4  # PPO clip of the importance ratio (both papers' code)
    adv_clip_max: float = 5.0
    timestep_fraction: float = 1.0  # share of a trajectory's (stochastic) steps trained on
    # "random": each sample trains on its own random subset of steps (ddpo-pytorch); "first": the first ones in
    # order (flow_grpo: 0.99 of 10 steps leaves out the last, whose tiny noise gives a huge-variance gradient).
    timestep_order: Literal["random", "first"] = "random"
    inner_epochs: int = 1
    steps_per_update: int = 1  # optimizer steps per inner epoch (the micro-batches are split evenly)
    group_size: int = 1  # images per prompt in an update
    kl_beta: float = 0.0  # weight of the closed-form KL to the reference policy
    train_cfg: bool = True  # the training forward uses the sampler's guidance too

    def __post_init__(self) -> None:
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.group_size < 1 or self.inner_epochs < 1 or self.steps_per_update < 1:
            raise ValueError("group_size, inner_epochs and steps_per_update must be >= 1")


@dataclass(kw_only=True)
class DDPOConfig(PolicyGradientConfig):
    """DDPO-IS (Black et al. 2023), ddpo-pytorch's ``config/base.py`` defaults."""

    buffer_size: int = 16  # per-prompt running reward statistics (kept across updates)
    min_count: int = 16  # below it, the update's mean/std stand in


@dataclass(kw_only=True)
class GRPOConfig(PolicyGradientConfig):
    """Flow-GRPO (Liu et al. 2025), flow_grpo's ``config/grpo.py`` defaults."""

    group_size: int = 24  # G images per prompt; advantages are relative to the group
    global_std: bool = True  # divide by the std of every reward of the update, not the group's
    kl_beta: float = 0.04
    timestep_fraction: float = 0.99
    timestep_order: Literal["random", "first"] = "first"


@dataclass(kw_only=True)
class DPOConfig:
    """Diffusion-DPO (Wallace et al. 2023): SD1.5 used beta 5000 and lr 2.048e-5 (1e-8 x batch 2048)."""

    beta: float = 5000.0  # 2500-5000 published (diffusers' LoRA example: 2500)
    pairs: Literal["on_policy", "parquet"] = "on_policy"
    parquet: str | None = None  # Pick-a-Pic-style: caption, jpg_0, jpg_1, label_0 (1: jpg_0 preferred)
    candidates: int = 4  # on-policy: images sampled per prompt, best and worst make the pair
    # (timestep, noise) draws per pair and step (1 published, at batch 2048): averaging a few lowers the variance
    # of the one-draw likelihood estimate when few pairs fit in a batch, for the cost of the forwards only.
    noise_draws: int = 1
    steps_per_update: int = 1

    def __post_init__(self) -> None:
        if self.candidates < 2 or self.noise_draws < 1 or self.steps_per_update < 1:
            raise ValueError("dpo.candidates must be >= 2, noise_draws and steps_per_update >= 1")


@dataclass(kw_only=True)
class DRaFTConfig:
    """Reward backprop through the last sampler steps: DRaFT-K, AlignProp's random truncation, ReFL."""

    mode: Literal["draft", "alignprop", "refl"] = "draft"
    k: int = 1  # draft: the last K steps carry gradient (DRaFT-1 is the paper's pick); alignprop: K ~ U{1..k}
    refl_steps: list[int] = field(default_factory=lambda: [30, 40])  # refl: stop at step s in [lo, hi) of 40
    steps_per_update: int = 1
    activation_checkpointing: bool = True

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"draft.k must be >= 1, got {self.k}")


@dataclass(kw_only=True)
class MethodConfig:
    """Which method runs, plus each method's own section (only the named one is used)."""

    name: Literal["ddpo", "grpo", "dpo", "draft"] = "ddpo"
    ddpo: DDPOConfig = field(default_factory=DDPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    draft: DRaFTConfig = field(default_factory=DRaFTConfig)

    def section(self):
        """The selected method's config."""
        return getattr(self, self.name)


@dataclass(kw_only=True)
class GuardConfig:
    """Held-out evaluation every ``every`` updates: what catches reward hacking."""

    every: int = 10  # updates; 0: only before the first update and after the last
    prompts: PromptSource = field(default_factory=PromptSource)  # held-out prompts (never trained on)
    # What the guard measures; null: the training reward. A control run (constant reward) or a negated one is
    # measured with the real reward here.
    reward: list[RewardTerm] | None = None
    seeds: int = 2  # images per held-out prompt, at fixed seeds
    seed: int = 0
    sampler: SamplerConfig | None = None  # deterministic sampler; null: the checkpoint's, guided as the rollouts are
    kl: bool = True  # KL of policy to reference along the policy's SDE trajectories (GRPO's formula, per step)
    # [lo, hi) sampler steps the KL averages over; null: rollout.sde_window, else every step but the last (the steps
    # the shipped methods train on). docs/finetune.md: "What the KL measures".
    kl_steps: list[int] | None = None
    fid_reference: str | None = None  # real held-out images (folder, dataset, .tar); null: no FID/KID
    fid_network: str | None = None
    grid_prompts: int = 8  # held-out prompts shown in the logged sample grid
    max_kl: float | None = None  # early stop: reward rose but KL passed this bound
    max_fid: float | None = None  # early stop: reward rose but FID passed this bound

    def __post_init__(self) -> None:
        if self.kl_steps is not None and not (len(self.kl_steps) == 2 and 0 <= self.kl_steps[0] < self.kl_steps[1]):
            raise ValueError(f"eval.kl_steps must be [lo, hi) with 0 <= lo < hi, got {self.kl_steps}")

    @property
    def bounded(self) -> bool:
        """Whether the guard can stop the run (a KL or FID bound is set)."""
        return self.max_kl is not None or self.max_fid is not None


@dataclass(kw_only=True)
class FinetuneLoopConfig:
    """Length, cadence and robustness; progress is counted in updates (one rollout + its optimizer steps)."""

    updates: int = 100
    seed: int = 0
    deterministic: bool = False
    log_every: int = 1
    ckpt_every: int = 10
    keep_last: int = 3
    resume: str = "auto"  # auto | none | <checkpoint dir>
    max_minutes: float | None = None
    dump_rank_weights: bool = False  # each rank writes its trainable weights at the end (the 2-rank sync check)

    def __post_init__(self) -> None:
        if self.updates < 1:
            raise ValueError(f"train.updates must be >= 1, got {self.updates}")


@dataclass(kw_only=True)
class FinetuneJobConfig:
    """Everything ``tessera finetune`` needs."""

    checkpoint: str = ""  # base: training run, checkpoint or export dir (local or s3://)
    base_weights: Literal["ema", "raw"] = "ema"
    run: RunConfig = field(default_factory=RunConfig)
    # W&B: the project and group of the run that trained the base checkpoint (tessera.tracking)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(project=None, job_type="finetune"))
    method: MethodConfig = field(default_factory=MethodConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    reward: list[RewardTerm] = field(default_factory=lambda: [RewardTerm(name="colour_match")])
    prompts: PromptSource = field(default_factory=PromptSource)  # training prompts
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=1e-4))
    # A small reduce bucket: ZeRO-2 allocates it anew as gradients arrive, and a fine-tuning step makes many
    # backward calls on few (LoRA) parameters; the trainer's 50M-element bucket cost 64 ms per allocation here.
    deepspeed: DeepSpeedConfig = field(default_factory=lambda: DeepSpeedConfig(reduce_bucket_size=1_000_000))
    train: FinetuneLoopConfig = field(default_factory=FinetuneLoopConfig)
    eval: GuardConfig = field(default_factory=GuardConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def check(self) -> None:
        """Cross-field checks (run time)."""
        from tessera.config import ConfigError

        if not self.checkpoint:
            raise ConfigError("checkpoint is required: a training run, checkpoint or export dir (--checkpoint)")
        if self.lora.enabled and self.deepspeed.stage == 3:
            raise ConfigError("LoRA keeps the frozen base whole on every rank: use deepspeed.stage 1 or 2 "
                              "(ZeRO-3 is for full fine-tuning, lora.enabled=false)")
        if self.rollout.group_noise and self.method.name != "grpo":
            raise ConfigError(f"rollout.group_noise needs GRPO's group advantages (method.name: grpo), not "
                              f"{self.method.name!r}")
        if self.method.name == "dpo" and self.method.dpo.pairs == "parquet" and not self.method.dpo.parquet:
            raise ConfigError("method.dpo.parquet is required when method.dpo.pairs is 'parquet'")
        for key, terms in (("reward", self.reward), ("eval.reward", self.eval.reward or [])):
            for i, t in enumerate(terms):
                try:
                    t.views.validate(f"{key}[{i}] ({t.name}) views")
                except ValueError as e:
                    raise ConfigError(str(e)) from None
