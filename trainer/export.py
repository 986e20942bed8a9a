"""``tessera export``: EMA and raw weights as safetensors + config.json, plus ``tessera.json`` to sample them."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

from tessera import storage
from tessera.config import to_dict
from tessera.trainer import checkpoint as C
from tessera.trainer.inference import EXPORT_FORMAT, job_config, model_from_weights, resolve_checkpoint
from tessera.trainer.models import save_pretrained

log = logging.getLogger("tessera.export")


def export(checkpoint: str, out: str) -> str:
    """Write ``out/{ema,raw}/model.safetensors + config.json`` and ``out/tessera.json``; returns ``out``."""
    kind, url = resolve_checkpoint(checkpoint)
    if kind != "checkpoint":
        raise ValueError(f"{checkpoint} is already an export")
    cfg = job_config(url)
    state = C.read_json(storage.join(url, "trainer_state.json"))
    variants = {"raw": C.read_tensors(storage.join(url, "model.safetensors"))}
    if storage.exists(storage.join(url, "ema.safetensors")):
        variants["ema"] = C.read_tensors(storage.join(url, "ema.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        for name, weights in variants.items():
            model = model_from_weights(cfg.model, weights, torch.device("cpu"))
            save_pretrained(model, Path(tmp) / name)
            for f in sorted((Path(tmp) / name).iterdir()):
                storage.write_bytes(storage.join(out, name, f.name), f.read_bytes())
    meta = {"format": EXPORT_FORMAT, "source_checkpoint": url, "step": state["trainer"]["step"],
            "samples": state["trainer"]["samples"], "variants": sorted(variants), "default": "ema" if "ema" in variants else "raw",
            "model": to_dict(cfg.model), "text_encoder": to_dict(cfg.text_encoder),
            "autoencoder": to_dict(cfg.autoencoder), "objective": to_dict(cfg.objective),
            "sampler": to_dict(cfg.samples.sampler), "sample_size": [cfg.samples.height, cfg.samples.width]}
    storage.write_text(storage.join(out, "tessera.json"), json.dumps(meta, indent=1))
    log.info("exported %s -> %s (%s)", url, out, ", ".join(sorted(variants)))
    return out
