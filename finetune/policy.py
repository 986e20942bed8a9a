"""The policy: a trained checkpoint or export as a plain model, LoRA adapters on it (PEFT), the reference policy,
and the files rank 0 adds to a LoRA fine-tuning checkpoint (merged model, PEFT adapter) so ``tessera
sample/export/eval`` read it like a training checkpoint.

With LoRA the reference policy is the same network with its adapters switched off (``disable_adapter``): no
second copy. Full fine-tuning keeps a frozen copy as the reference.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tessera import storage
from tessera.config import from_dict
from tessera.trainer import checkpoint as C
from tessera.trainer.config import SampleGridConfig, TrainJobConfig
from tessera.trainer.diffusion.sampling import SamplerConfig
from tessera.trainer.inference import job_config, load_for_sampling, resolve_checkpoint
from tessera.trainer.lora import ADAPTER, DEFAULT_TARGETS, merged_state

log = logging.getLogger("tessera.finetune")



@dataclass
class Base:
    """The base model and what sampling it needs."""

    model: nn.Module  # plain, on the device, base weights
    text_encoder: Any
    autoencoder: Any
    objective: Any  # ObjectiveConfig
    sampler: SamplerConfig  # the checkpoint's own sample settings
    size: tuple[int, int]  # (height, width) in pixels
    job: TrainJobConfig  # a training config describing the model (written into every fine-tuning checkpoint)


def base_job_config(checkpoint: str) -> TrainJobConfig:
    """The training config of a checkpoint, or one rebuilt from an export's ``tessera.json``."""
    kind, url = resolve_checkpoint(checkpoint)
    if kind == "checkpoint":  # a LoRA run's base is loaded merged (model_from_weights): the job is a plain model's
        job = job_config(url)
        return dataclasses.replace(job, model=dataclasses.replace(job.model, lora=None))
    meta = C.read_json(storage.join(url, "tessera.json"))
    src = f"{url}/tessera.json"
    h, w = meta["sample_size"]
    return from_dict(TrainJobConfig, {"model": meta["model"], "text_encoder": meta["text_encoder"],
                                      "autoencoder": meta["autoencoder"], "objective": meta["objective"],
                                      "samples": {"sampler": meta["sampler"], "height": h, "width": w}}, src)


def load_base(checkpoint: str, weights: str, device: torch.device) -> Base:
    """Load the base (``weights``: ema | raw) with its frozen encoders."""
    model, te, ae, obj, smp, size = load_for_sampling(checkpoint, use_ema=weights == "ema", device=device)
    for m in getattr(ae, "modules", lambda: [])():
        m.requires_grad_(False)  # reward backprop flows through the decoder, never into it
    return Base(model, te, ae, obj, smp, tuple(size), base_job_config(checkpoint))


def wrap_lora(model: nn.Module, settings) -> nn.Module:
    """PEFT LoRA on the family's attention/MLP linears (or ``settings.target_modules``); B = 0 at init, so the
    wrapped network computes exactly the base's outputs."""
    from peft import get_peft_model

    target = settings.target_modules or DEFAULT_TARGETS[model.family]
    try:
        peft_model = get_peft_model(model, settings.peft_config(model.family))
    except ValueError as e:  # PEFT's "not found" names the regex but not the config key
        raise ValueError(f"lora.target_modules {target!r} matched no linear layer of the {model.family} model "
                         f"({e})") from e
    n = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if n == 0:
        raise ValueError(f"lora.target_modules {target!r} matched no linear layer of the {model.family} model")
    log.info("LoRA rank %d on %s: %d trainable parameters", settings.rank, target, n)
    return peft_model


def is_lora(model: nn.Module) -> bool:
    """True for a PEFT-wrapped model."""
    return hasattr(model, "disable_adapter")


class Reference:
    """The reference policy: the LoRA model with adapters off, or a frozen copy of the full model."""

    def __init__(self, policy: nn.Module) -> None:
        self.policy = policy
        self.copy = None if is_lora(policy) else copy.deepcopy(policy).requires_grad_(False).eval()

    @contextlib.contextmanager
    def model(self):
        """Within the block, the returned module computes the reference policy (no grad)."""
        with torch.no_grad():
            if self.copy is not None:
                yield self.copy
            else:
                with self.policy.disable_adapter():
                    yield self.policy


@torch.no_grad()
def merged_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 CPU weights of the base model with every LoRA update merged in (W + scale * B A)."""
    return merged_state(model.get_base_model())


@torch.no_grad()
def adapter_files(model: nn.Module) -> dict[str, Any]:
    """The adapter in PEFT's own format: ``lora/adapter_model.safetensors`` + ``lora/adapter_config.json``
    (``PeftModel.from_pretrained(base, dir)`` loads it)."""
    from peft import get_peft_model_state_dict

    state = {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    cfg = model.peft_config[ADAPTER].to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    return {"lora/adapter_model.safetensors": state, "lora/adapter_config.json": json.dumps(cfg, indent=1, default=str)}


def lora_files(model: nn.Module) -> dict[str, Any]:
    """What rank 0 adds to a LoRA fine-tuning checkpoint (``Checkpointer.files``): the merged model, which
    ``tessera sample/export/eval`` read like an export's weights, and the adapter in PEFT's format.

    Why rank 0 writes a whole model here, when training checkpoints are sharded: LoRA keeps the frozen base whole
    on every rank (ZeRO-3 is refused for it), so rank 0 merges from its own weights with no gather, and the
    checkpoint stays readable without the base checkpoint, which a base run's pruning or a newer ``latest`` may
    change or remove. The adapter's training state (weights, Adam moments) is sharded like any run's."""
    return {"model.safetensors": merged_weights(model), **adapter_files(model)}


def checkpoint_job(base: Base, run_cfg) -> TrainJobConfig:
    """The training config a fine-tuning checkpoint carries: the base model's, with the base's own sampler (steps,
    guidance scale and interval), so ``tessera sample/eval`` sample base and tuned models alike; the held-out guard
    and the rollouts guide at every step at ``rollout.cfg_scale`` (docs/finetune.md)."""
    job = base.job
    samples = SampleGridConfig(enabled=False, prompts=list(job.samples.prompts), height=base.size[0],
                               width=base.size[1], sampler=base.sampler)
    return dataclasses.replace(job, run=run_cfg, samples=samples)


def differentiable_decode(autoencoder, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1] with gradients to the latents. ``Autoencoder.decode`` runs in inference mode
    (right for sampling, fatal for reward backprop), so this calls the decoder's ``_decode`` directly."""
    x = autoencoder._decode(latents.to(autoencoder.device, autoencoder.dtype))
    return x.float().clamp(-1.0, 1.0)
