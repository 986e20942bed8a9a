"""The frozen encoders, which of a dataset's precomputed caches fit them, and turning a loader batch into
(x0, text condition) and, for a control run, the control branch's input."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors

from tessera import storage
from tessera.trainer.autoencoders import autoencoder_id, build_autoencoder
from tessera.trainer.text_encoders import TextEmbedding, build_text_encoder, text_encoder_id

log = logging.getLogger("tessera.components")


def empty_url(dataset: str, text_encoder_id: str) -> str:
    """Where a precomputed dataset keeps its text encoder's empty-prompt embedding (``empty.<id>.safetensors``)."""
    return storage.join(dataset, f"empty.{text_encoder_id}.safetensors")


@dataclass
class Frozen:
    """The frozen text encoder and autoencoder (built lazily: a precomputed dataset may need neither)."""

    text_cfg: Any
    ae_cfg: Any
    device: torch.device
    _text: Any = None
    _ae: Any = None
    _empty: TextEmbedding | None = None
    # A precomputed dataset's empty-prompt embedding (``tessera data precompute`` writes it): read instead of
    # loading the text encoder on every rank just to encode "".
    empty_url: str | None = None

    @property
    def text(self):
        """The text encoder, built on first use."""
        if self._text is None:
            self._text = build_text_encoder(self.text_cfg)
        return self._text

    @property
    def ae(self):
        """The autoencoder, built on first use."""
        if self._ae is None:
            ae = build_autoencoder(self.ae_cfg)
            self._ae = ae.to(self.device) if hasattr(ae, "to") else ae
        return self._ae

    def empty(self) -> TextEmbedding:
        """The empty-prompt embedding (one row), for classifier-free guidance."""
        if self._empty is None:
            if self.empty_url and storage.exists(self.empty_url):
                t = load_safetensors(storage.read_bytes(self.empty_url))
                self._empty = TextEmbedding(t["hidden"], t["mask"].bool(), t.get("pooled")).to(self.device)
            else:
                self._empty = self.text.empty_embedding().to(self.device)
        return self._empty


def batch_to_inputs(batch: dict, frozen: Frozen, device: torch.device, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, TextEmbedding, dict[str, int]]:
    """(x0 latents (B,C,h,w), text condition, counts of what was computed on the fly)."""
    on_the_fly = {"text_encoded": 0, "latents_encoded": 0}
    nb = device.type == "cuda"  # the loader pins its batches on CUDA: copies overlap with the device's work
    if "latent" in batch:
        x0 = batch["latent"].to(device, non_blocking=nb).float()  # copy as stored, then cast on the device
    else:
        with torch.no_grad():
            x0 = frozen.ae.encode(batch["image"].to(device, non_blocking=nb).float()).float()
        on_the_fly["latents_encoded"] = x0.shape[0]
    if "text_hidden" in batch:
        pooled = batch.get("text_pooled")
        cond = TextEmbedding(batch["text_hidden"].to(device, non_blocking=nb),
                             batch["text_mask"].to(device, non_blocking=nb).bool(),
                             pooled.to(device, non_blocking=nb) if pooled is not None else None)
    else:
        cond = frozen.text.encode(list(batch["caption"])).to(device)
        on_the_fly["text_encoded"] = x0.shape[0]
    cond = TextEmbedding(cond.hidden.to(dtype), cond.mask, None if cond.pooled is None else cond.pooled.to(dtype))
    return x0, cond, on_the_fly


def control_tensor(images: torch.Tensor, space: str, autoencoder, device: torch.device) -> torch.Tensor:
    """Condition images (B, 3, H, W) in [-1, 1] -> the control branch's input: their latents (DiT/MMDiT: encoded by
    the frozen autoencoder, as PixArt and SD3 ControlNets take them) or the image in [0, 1] (UNet: diffusers'
    ControlNetModel encodes pixels itself)."""
    images = images.to(device, torch.float32)
    if space == "pixel":
        return images.add(1.0).mul_(0.5)
    with torch.no_grad():
        return autoencoder.encode(images).float()


def control_input(batch: dict, model, model_cfg, frozen: Frozen, seed: int, step: int, device: torch.device,
                  dtype: torch.dtype, on_the_fly: dict[str, int]) -> dict[str, torch.Tensor]:
    """``{"control": tensor}`` for a control run's model call, ``{}`` otherwise: the batch's condition in the branch's
    input space, ``control.dropout`` of the samples replaced by the null condition (zeros). Dropout draws from each
    sample's own stream (keyed ``control:<key>``), so the timestep, noise and text-dropout draws stay as they are."""
    from tessera.trainer.diffusion.rng import KeyedRNG, rand

    ctl = model_cfg.control
    if ctl is None:
        return {}
    conds = batch.get("cond") or {}
    if ctl.condition not in conds:
        raise KeyError(f"the batch has no condition {ctl.condition!r} (has {sorted(conds)}): data.conditions must "
                       "list model.control.condition")
    x = control_tensor(conds[ctl.condition], model.input_space, frozen.ae, device)
    if model.input_space == "latent" and frozen.ae_cfg.name != "identity":
        on_the_fly["control_encoded"] = on_the_fly.get("control_encoded", 0) + x.shape[0]
    if ctl.dropout > 0:
        keys = [f"control:{k}" for k in batch["key"]]
        drop = rand(len(keys), KeyedRNG.for_samples(seed, step, keys, device), device) < ctl.dropout  # (B,)
        x = x * (~drop).to(x.dtype)[:, None, None, None]
        on_the_fly["control_dropped"] = on_the_fly.get("control_dropped", 0) + drop.sum()  # on the device
    return {"control": x.to(dtype)}


def precomputed_ids(data_cfg, text_cfg, ae_cfg) -> dict[str, str | None]:
    """``{text_encoder_id, autoencoder_id}`` of the configured encoders when the dataset carries their caches
    (computed from configs and weight fingerprints: no encoder is loaded, and the config is not edited)."""
    out: dict[str, str | None] = {"text_encoder_id": None, "autoencoder_id": None}
    if not data_cfg.use_precomputed:
        return out
    manifest = json.loads(storage.read_text(storage.join(data_cfg.paths[0], "manifest.json")))
    caches = manifest.get("caches") or {}
    if data_cfg.text_encoder_id is None and caches.get("emb"):
        tid = text_encoder_id(text_cfg)
        if any(c.startswith(tid + ".") for c in caches["emb"]):
            out["text_encoder_id"] = tid
            log.info("using precomputed text embeddings %s", tid)
        else:
            log.warning("dataset has embeddings %s but not for %s: encoding captions on the fly", caches["emb"], tid)
    if data_cfg.autoencoder_id is None and caches.get("latent"):
        aid = autoencoder_id(ae_cfg)
        if aid in caches["latent"]:
            out["autoencoder_id"] = aid
            log.info("using precomputed latents %s", aid)
    return out
