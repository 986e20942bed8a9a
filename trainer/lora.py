"""LoRA adapters (PEFT) on a frozen base: the settings shared by ``tessera train`` (``model.lora``) and ``tessera
finetune`` (``lora``), the training-side model, and the adapter in the formats users load it in.

``tessera train`` with ``model.lora`` injects PEFT's LoRA layers into the base that ``model.init_from`` loads
(``peft.inject_adapter_in_model``, as diffusers' ``load_lora_adapter`` does: no ``PeftModel`` wrapper, so the
model keeps its family, blocks and forward). Only the adapters train; a checkpoint holds only their weights,
Adam moments and EMA (sharded like any run's) plus the base's weight fingerprint, so it is small; the base is
``model.init_from``'s, checked against that fingerprint wherever the adapter is loaded (resume, sample, export),
exactly as a ControlNet branch's base is. ``model_from_weights`` returns the merged plain model, so sampling,
evaluation, export and later stages (fine-tuning, distillation) read a LoRA checkpoint like any other.

The adapter ships in two formats: PEFT's (``adapter_model.safetensors`` + ``adapter_config.json``, which
``PeftModel.from_pretrained(tessera_model, dir)`` loads) and, through ``tessera export --format diffusers``, the
diffusers pipeline format (``trainer/lora_diffusers.py``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch
from torch import nn

from tessera.trainer.models.pinned import BaseMismatch, PinnedBase

log = logging.getLogger("tessera.train")

# The attention and MLP linears of each family (PEFT matches the regex against the whole module name).
DEFAULT_TARGETS = {
    "dit": r"blocks\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q|kv|proj)|mlp\.(fc1|fc2))",
    "mmdit": r"blocks\.\d+\.(context|x)\.(qkv|proj|mlp\.fc1|mlp\.fc2)",
    "unet": r"unet\..*(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|unet\..*\.ff\.net\.(0\.proj|2)",
}
ADAPTER = "default"
PEFT_PREFIX = "base_model.model."  # how a PeftModel's saved adapter names the base's modules


@dataclass(kw_only=True)
class LoraSettings:
    """LoRA through PEFT's ``LoraConfig`` (rank, alpha, dropout, target modules)."""

    enabled: bool = True  # fine-tuning: false trains the full model (reference = a frozen copy)
    rank: int = 4  # ddpo-pytorch 4; flow_grpo 32; diffusers' train_dreambooth_lora 4
    alpha: float = 4.0  # flow_grpo 64 (alpha / rank scales the update)
    dropout: float = 0.0
    # Regex (full match) over module names; null: the family's attention and MLP linears (DEFAULT_TARGETS).
    target_modules: str | None = None

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")

    def peft_config(self, family: str):
        """PEFT's ``LoraConfig`` for a model of ``family``."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules or DEFAULT_TARGETS[family])


class LoraBaseMismatch(BaseMismatch):
    """LoRA adapter weights paired with another base than the one they were trained on."""


class LoraModel(PinnedBase):
    """A frozen base with LoRA layers injected in place; attributes it lacks (``family``, ``config``, ``blocks``,
    ``unet``) are the base's, so FLOPs, regional compile and the loader treat it as its base."""

    what = "this LoRA adapter"
    mismatch = LoraBaseMismatch

    def __init__(self, base: nn.Module, settings: LoraSettings, source: str | None = "the base model") -> None:
        """``source``: where the base's weights came from (for messages); None for a base with no weights loaded
        (a dry run, a meta-device estimate), which pins no fingerprint."""
        from peft import inject_adapter_in_model

        super().__init__()
        if source:
            self.pin_base(base, source)
        base.requires_grad_(False)
        target = settings.target_modules or DEFAULT_TARGETS[base.family]
        try:
            self.model = inject_adapter_in_model(settings.peft_config(base.family), base, adapter_name=ADAPTER)
        except ValueError as e:  # PEFT's "not found" names the regex but not the config key
            raise ValueError(f"model.lora.target_modules {target!r} matched no linear layer of the {base.family} "
                             f"model ({e})") from e
        self.settings = settings
        n = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if n == 0:
            raise ValueError(f"model.lora.target_modules {target!r} matched no linear layer of the {base.family} model")
        log.info("LoRA rank %d on %s: %d trainable parameters (base frozen)", settings.rank, target, n)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(super().__getattr__("model"), name)

    def forward(self, *args, **kwargs):
        self.check_restored()
        return self.model(*args, **kwargs)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.model.set_gradient_checkpointing(enabled)

    @torch.no_grad()
    def merged_state(self) -> dict[str, torch.Tensor]:
        """Full fp32 CPU weights of the base with every adapter merged in (W + scale * B A), named as the plain
        model names them."""
        return merged_state(self.model)


def adapter_key(name: str) -> str | None:
    """``model.<module>.lora_A.default.weight`` (a LoraModel's parameter) -> ``<module>.lora_A.weight``."""
    for part in ("lora_A", "lora_B"):
        tail = f".{part}.{ADAPTER}.weight"
        if name.endswith(tail):
            return name.removeprefix("model.")[: -len(tail)] + f".{part}.weight"
    return None


def adapter_tensors(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors of a LoRA run's weights (a checkpoint's weight set), named ``<module>.lora_{A,B}.weight``
    after the plain model's modules."""
    out = {adapter_key(k): v for k, v in weights.items() if adapter_key(k) is not None}
    if not out:
        raise ValueError("these weights hold no LoRA adapter tensors")
    return out


def peft_files(adapter: dict[str, torch.Tensor], settings: LoraSettings, family: str) -> dict[str, object]:
    """The adapter in PEFT's format (``adapter_model.safetensors`` + ``adapter_config.json``): what
    ``PeftModel.from_pretrained(base, dir)`` loads onto a plain Tessera model of the same family."""
    cfg = settings.peft_config(family).to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    return {"adapter_model.safetensors": {PEFT_PREFIX + k: v.contiguous() for k, v in adapter.items()},
            "adapter_config.json": json.dumps(cfg, indent=1, default=str)}


def plain_name(name: str) -> str:
    """A PEFT-injected module's parameter name as the plain model names it."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


@torch.no_grad()
def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 CPU weights of a module with PEFT LoRA layers, every adapter merged (W + scale * B A)."""
    from peft.tuners.lora import LoraLayer

    out = {plain_name(n): t.detach().float().cpu().clone() for n, t in model.state_dict().items() if ".lora_" not in n}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and ADAPTER in mod.lora_A:
            key = plain_name(f"{name}.weight")
            out[key] = out[key] + mod.get_delta_weight(ADAPTER).float().cpu()
    return out
