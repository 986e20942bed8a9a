"""Model registry: family name -> (typed config, model class, FLOPs); build, save and load.

Every family shares one forward signature,
``model(x (N,C,H,W), t (N,), text (N,L,Dt), text_mask (N,L) bool|int, pooled=None) -> (N,C_out,H,W)``,
has ``model.family``, ``model.config`` and ``model.set_gradient_checkpointing(bool)``.

Checkpoints are a folder with ``model.safetensors`` (weights) and ``config.json``
(``{"family": ..., "config": {...}}``); no pickles anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tessera.config import from_dict, to_dict
from tessera.registry import Registry

from . import dit, mmdit, unet

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


@dataclass(frozen=True)
class ModelFamily:
    """What the registry knows about a family: its config class, its model class, its FLOPs count."""

    config_cls: type
    model_cls: type[nn.Module]
    flops: Callable[[nn.Module, int, int, int], int]  # (model, height, width, text_len) -> forward FLOPs


MODELS: Registry[ModelFamily] = Registry("model")
MODELS.register("dit")(ModelFamily(dit.DiTConfig, dit.DiT, lambda m, h, w, L: dit.flops_per_sample(m.config, h, w, L)))
MODELS.register("mmdit")(
    ModelFamily(mmdit.MMDiTConfig, mmdit.MMDiT, lambda m, h, w, L: mmdit.flops_per_sample(m.config, h, w, L))
)
MODELS.register("unet")(ModelFamily(unet.UNetConfig, unet.UNet, unet.flops_per_sample))


def config_class(name: str) -> type:
    """The typed config dataclass of a model family."""
    return MODELS.get(name).config_cls


def build_model(name: str, cfg: Any = None) -> nn.Module:
    """Build family ``name`` from its typed config or a plain mapping (checked strictly)."""
    fam = MODELS.get(name)
    if cfg is None or isinstance(cfg, dict):
        cfg = from_dict(fam.config_cls, cfg or {}, source=f"model.{name}")
    elif not isinstance(cfg, fam.config_cls):
        raise TypeError(f"model {name!r} expects {fam.config_cls.__name__}, got {type(cfg).__name__}")
    return fam.model_cls(cfg)


def model_flops(model: nn.Module, height: int, width: int, text_len: int) -> int:
    """Forward FLOPs per sample of a built model at one latent size and text length (x3 for fwd+bwd)."""
    return MODELS.get(model.family).flops(model, height, width, text_len)


def _saved_config(model: nn.Module) -> dict:
    """The config to write: for a UNet, its full diffusers kwargs, so loading needs no original folder."""
    cfg = to_dict(model.config)
    if model.family == "unet":
        cfg.update(preset=None, pretrained=None, kwargs=model.diffusers_config())
    return cfg


def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (family + config) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"family": model.family})
    meta = {"family": model.family, "config": _saved_config(model)}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return directory


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by ``save_pretrained`` and load its weights (strict)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    model = build_model(meta["family"], meta["config"])
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE), device=str(device)), strict=True)
    return model.to(device)
