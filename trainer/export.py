"""``tessera export``: EMA and raw weights as safetensors + config.json, plus ``tessera.json`` to sample them.

A sharded training checkpoint is consolidated offline (``trainer/consolidate.py``: each weight set assembled
from the ranks' shards with ranged reads, no process group). A LoRA fine-tuning checkpoint's
``model.safetensors`` already holds the merged model; its adapter (``lora/``, PEFT's format) is exported next
to it, so the adapter ships on its own too. A ``tessera train`` LoRA checkpoint holds only the adapter: the export
holds the merged model and the adapter (``lora/``, from the EMA weights when the run kept an EMA).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path

import torch

from tessera import storage
from tessera.config import to_dict
from tessera.trainer import checkpoint as C
from tessera.trainer import consolidate
from tessera.trainer.inference import EXPORT_FORMAT, job_config, model_from_weights, resolve_checkpoint
from tessera.trainer.models import save_pretrained

log = logging.getLogger("tessera.export")

ADAPTER_DIR = "lora"


def write_export(out: str, cfg, variants: dict[str, dict[str, torch.Tensor]], *, source: str, step: int,
                 samples: int, extra: dict | None = None) -> str:
    """Write ``out/<variant>/model.safetensors + config.json`` for each weight set and ``out/tessera.json``
    (model, encoders, objective and sampler of the training config ``cfg``); returns ``out``."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, weights in variants.items():
            model = model_from_weights(cfg.model, weights, torch.device("cpu"))
            if cfg.model.control is not None:  # a control branch: its own tensors; the base is model.init_from's
                from tessera.trainer.models.control import branch_weights

                C.write_tensors(storage.join(out, name, "model.safetensors"), branch_weights(model))
                continue
            save_pretrained(model, Path(tmp) / name)
            for f in sorted((Path(tmp) / name).iterdir()):
                storage.write_bytes(storage.join(out, name, f.name), f.read_bytes())
    extra = dict(extra or {})
    if cfg.model.lora is not None:  # a LoRA run: merged weights, and its adapter in PEFT's format (default set)
        from tessera.trainer.lora import adapter_tensors, peft_files

        default = "ema" if "ema" in variants else "raw"
        files = peft_files(adapter_tensors(variants[default]), cfg.model.lora, cfg.model.name)
        C.write_files(storage.join(out, ADAPTER_DIR), files)
        extra.update(adapter=ADAPTER_DIR, adapter_weights=default)
    model_cfg = dataclasses.replace(cfg.model, lora=None)  # a LoRA run's weights are exported merged
    meta = {"format": EXPORT_FORMAT, "source_checkpoint": source, "step": step, "samples": samples,
            "variants": sorted(variants), "default": "ema" if "ema" in variants else "raw",
            "model": to_dict(model_cfg), "text_encoder": to_dict(cfg.text_encoder),
            "autoencoder": to_dict(cfg.autoencoder), "objective": to_dict(cfg.objective),
            "sampler": to_dict(cfg.samples.sampler), "sample_size": [cfg.samples.height, cfg.samples.width],
            **({"control": True} if cfg.model.control is not None else {}), **extra}
    storage.write_text(storage.join(out, "tessera.json"), json.dumps(meta, indent=1))
    return out


def export(checkpoint: str, out: str) -> str:
    """Write ``out/{ema,raw}/model.safetensors + config.json`` and ``out/tessera.json`` (and ``out/lora/`` for a
    LoRA fine-tuning checkpoint); returns ``out``."""
    kind, url = resolve_checkpoint(checkpoint)
    if kind != "checkpoint":
        raise ValueError(f"{checkpoint} is already an export")
    cfg = job_config(url)
    state = C.read_json(storage.join(url, "trainer_state.json"))
    variants = {v: consolidate.read_weights(url, name) for v, name in consolidate.weight_sets(url).items()}
    extra = {}
    adapter = storage.join(url, ADAPTER_DIR)
    for u in storage.list_prefix(adapter + "/") if storage.exists(storage.join(adapter, "adapter_config.json")) else []:
        storage.write_bytes(storage.join(out, ADAPTER_DIR, u.rsplit("/", 1)[-1]), storage.read_bytes(u))
        extra["adapter"] = ADAPTER_DIR
    write_export(out, cfg, variants, source=url, step=state["trainer"]["step"], samples=state["trainer"]["samples"],
                 extra=extra)
    log.info("exported %s -> %s (%s)", url, out, ", ".join(sorted(variants)))
    return out
