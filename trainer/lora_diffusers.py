"""A Tessera LoRA adapter in the format diffusers loads: ``tessera export --format diffusers`` of a LoRA run (or a
LoRA fine-tuning) writes ``lora/`` beside the merged model.

The adapter applies to the *base* model (``model.init_from``), as every diffusers LoRA does; the model folder of
the same export already has it merged. Per family:

* UNet -> ``lora/pytorch_lora_weights.safetensors`` in diffusers' pipeline format (``unet.`` keys), written by
  ``StableDiffusionPipeline.save_lora_weights``: ``pipe.load_lora_weights(out / "lora")``;
* MMDiT -> the same file with ``transformer.`` keys (``StableDiffusion3Pipeline.save_lora_weights``):
  ``pipe.load_lora_weights(out / "lora")`` on an SD3 pipeline, or ``transformer.load_lora_adapter(...,
  prefix="transformer")``;
* DiT -> diffusers' PixArt pipelines and ``PixArtTransformer2DModel`` have no LoRA loader (diffusers 0.42), so
  the adapter is written in PEFT's format keyed to ``PixArtTransformer2DModel``'s modules:
  ``PeftModel.from_pretrained(transformer, out / "lora")``.

The module names come from the same key tables as the weights (``trainer/convert``): a fused linear that diffusers
splits (our ``qkv`` -> ``to_q``/``to_k``/``to_v``) keeps its ``A`` for each part and splits ``B``'s rows, so
``B_i A`` is exactly the part's rows of ``B A``. The adapter's scale (alpha / rank) is folded into ``B``, so the
files need no alpha metadata and load alike in every diffusers version.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tessera.trainer import checkpoint as C
from tessera.trainer.lora import PEFT_PREFIX

SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class NoLoraMapping(ValueError):
    """An adapted layer that has no diffusers counterpart (or is fused in a way a LoRA cannot follow)."""


def read_peft_adapter(folder: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """{module: (A, B)} of a PEFT-format adapter folder (Tessera module names) and its scale alpha / rank."""
    from tessera import storage

    cfg = json.loads(storage.read_text(storage.join(folder, "adapter_config.json")))
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise NoLoraMapping(f"{folder}: per-module rank or alpha patterns are not supported")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r
    tensors = C.read_tensors(storage.join(folder, "adapter_model.safetensors"))
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        for part, suffix in zip("AB", SUFFIXES):
            if k.endswith(suffix):
                mods.setdefault(k.removeprefix(PEFT_PREFIX)[: -len(suffix)], {})[part] = v
    return {m: (ab["A"], ab["B"]) for m, ab in mods.items()}, scale


def diffusers_modules(model, adapter: dict[str, tuple[torch.Tensor, torch.Tensor]],
                      scale: float) -> dict[str, torch.Tensor]:
    """``{<diffusers module>.lora_{A,B}.weight: tensor}`` for a plain Tessera model of the adapter's family, the
    scale folded into B."""
    out: dict[str, torch.Tensor] = {}
    if model.family == "unet":  # Tessera's UNet is diffusers' UNet2DConditionModel under ``unet``
        for m, (a, b) in adapter.items():
            if not m.startswith("unet."):
                raise NoLoraMapping(f"adapted module {m} is outside the diffusers UNet")
            out[f"{m.removeprefix('unet.')}.lora_A.weight"] = a
            out[f"{m.removeprefix('unet.')}.lora_B.weight"] = b * scale
        return out
    from tessera.trainer.convert import pixart, sd3

    conv = pixart if model.family == "dit" else sd3
    rules = {r.ours: r for r in conv.rules(model.config)}
    for m, (a, b) in adapter.items():
        rule = rules.get(f"{m}.weight")
        if rule is None or rule.kind not in ("copy", "cat"):
            raise NoLoraMapping(f"adapted module {m} has no {'plain' if rule else ''} linear counterpart in "
                                f"diffusers ({rule.kind if rule else 'unmapped'})")
        parts = [t.removesuffix(".weight") for t in rule.theirs]
        for name, b_rows in zip(parts, (b * scale).chunk(len(parts), dim=0)):
            out[f"{name}.lora_A.weight"] = a.clone()  # one tensor per file entry (safetensors refuses shared memory)
            out[f"{name}.lora_B.weight"] = b_rows.contiguous()
    return out


def write_diffusers_lora(adapter_folder: str, model, out: Path) -> str:
    """Write the adapter of ``adapter_folder`` (PEFT format, Tessera modules) for diffusers into ``out``; returns a
    note on how to load it."""
    adapter, scale = read_peft_adapter(adapter_folder)
    layers = diffusers_modules(model, adapter, scale)
    out.mkdir(parents=True, exist_ok=True)
    if model.family == "unet":
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=layers, safe_serialization=True)
        how = "pipe.load_lora_weights(out/lora) on the base's StableDiffusion(XL)Pipeline"
    elif model.family == "mmdit":
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline.save_lora_weights(str(out), transformer_lora_layers=layers, safe_serialization=True)
        how = "pipe.load_lora_weights(out/lora) on the base's StableDiffusion3Pipeline"
    else:
        from peft import LoraConfig
        from safetensors.torch import save_file

        rank = next(iter(adapter.values()))[0].shape[0]
        targets = sorted({k[: -len(".lora_A.weight")] for k in layers if k.endswith(".lora_A.weight")})
        cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets).to_dict()  # scale already in B
        cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
        save_file({PEFT_PREFIX + k: v for k, v in layers.items()}, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps(cfg, indent=1, default=str))
        how = ("PeftModel.from_pretrained(transformer, out/lora) on the base's PixArtTransformer2DModel (diffusers "
               "has no PixArt LoRA loader)")
    return f"lora/ is the adapter for the base model (model.init_from), not for this merged folder: {how}"
