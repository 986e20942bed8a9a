"""Export (EMA and raw weights as safetensors + config.json) and sampling from checkpoints or exports."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

from tessera import storage
from tessera.config import from_dict, load_config, to_dict
from trainer import checkpoint as C

log = logging.getLogger("tessera.export")

EXPORT_FORMAT = "tessera-export/1"


def resolve_checkpoint(url: str) -> tuple[str, str]:
    """(kind, url) for a checkpoint dir, an export dir, or a run dir (its newest complete checkpoint)."""
    url = str(url).rstrip("/")
    if storage.exists(storage.join(url, "tessera.json")):
        return "export", url
    if C.is_checkpoint_dir(url):
        return "checkpoint", url
    found = C.CheckpointManager(storage.join(url, "checkpoints")).resolve("auto")
    if found:
        return "checkpoint", found
    raise FileNotFoundError(f"no complete checkpoint or export at {url}")


def _job_config(ckpt_url: str):
    from trainer.config import TrainJobConfig

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "config.yaml"
        p.write_text(storage.read_text(storage.join(ckpt_url, "config.yaml")))
        return load_config(TrainJobConfig, p)


def export(checkpoint: str, out: str) -> str:
    """Write ``out/{ema,raw}/model.safetensors + config.json`` and ``out/tessera.json``; returns ``out``."""
    from trainer.models import save_pretrained
    from trainer.sampling import model_from_weights

    kind, url = resolve_checkpoint(checkpoint)
    if kind != "checkpoint":
        raise ValueError(f"{checkpoint} is already an export")
    cfg = _job_config(url)
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


def load_for_sampling(checkpoint: str, use_ema: bool = True, device: torch.device | None = None):
    """(model, text_encoder, autoencoder, objective_cfg, sampler_cfg, (h, w)) from a checkpoint or an export."""
    from tessera.device import pick_device
    from trainer.autoencoders import AutoencoderConfig, build_autoencoder
    from trainer.diffusion.objectives import ObjectiveConfig
    from trainer.diffusion.sampling import SamplerConfig
    from trainer.models import load_pretrained
    from trainer.sampling import model_from_weights
    from trainer.text_encoders import TextEncoderConfig, build_text_encoder

    device = device or pick_device()
    kind, url = resolve_checkpoint(checkpoint)
    if kind == "export":
        meta = json.loads(storage.read_text(storage.join(url, "tessera.json")))
        variant = "ema" if use_ema and "ema" in meta["variants"] else "raw"
        with tempfile.TemporaryDirectory() as tmp:
            for u in storage.list_prefix(storage.join(url, variant) + "/"):
                (Path(tmp) / Path(u).name).write_bytes(storage.read_bytes(u))
            model = load_pretrained(tmp).to(device).eval()
        te_cfg = from_dict(TextEncoderConfig, meta["text_encoder"], f"{url}/tessera.json")
        ae_cfg = from_dict(AutoencoderConfig, meta["autoencoder"], f"{url}/tessera.json")
        obj_cfg = from_dict(ObjectiveConfig, meta["objective"], f"{url}/tessera.json")
        smp_cfg = from_dict(SamplerConfig, meta["sampler"], f"{url}/tessera.json")
        size = tuple(meta["sample_size"])
    else:
        cfg = _job_config(url)
        name = "ema.safetensors" if use_ema and storage.exists(storage.join(url, "ema.safetensors")) else "model.safetensors"
        model = model_from_weights(cfg.model, C.read_tensors(storage.join(url, name)), device)
        te_cfg, ae_cfg, obj_cfg, smp_cfg = cfg.text_encoder, cfg.autoencoder, cfg.objective, cfg.samples.sampler
        size = (cfg.samples.height, cfg.samples.width)
    ae = build_autoencoder(ae_cfg)
    ae = ae.to(device) if hasattr(ae, "to") else ae
    return model, build_text_encoder(te_cfg), ae, obj_cfg, smp_cfg, size


def sample_from(checkpoint: str, prompts: list[str], *, out: str, height: int | None = None, width: int | None = None,
                steps: int | None = None, cfg_scale: float | None = None, seed: int = 0, sampler: str | None = None,
                use_ema: bool = True) -> None:
    """``tessera sample``: a captioned grid PNG of one image per prompt."""
    import dataclasses
    import io

    from trainer.sampling import generate, make_grid

    model, te, ae, obj_cfg, smp_cfg, (h0, w0) = load_for_sampling(checkpoint, use_ema)
    smp_cfg = dataclasses.replace(smp_cfg, **{k: v for k, v in
                                              {"steps": steps, "cfg_scale": cfg_scale, "name": sampler}.items()
                                              if v is not None})
    device = next(model.parameters()).device
    images = generate(model, te, ae, smp_cfg, obj_cfg, prompts, height=height or h0, width=width or w0, seed=seed,
                      device=device)
    grid = make_grid(images, prompts, scale=max(1, 128 // max(height or h0, 1)))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    storage.write_bytes(out, buf.getvalue())
