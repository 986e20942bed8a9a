"""The frozen encoders, which of a dataset's precomputed caches fit them, and turning a loader batch into
(x0, text condition)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import torch

from tessera import storage
from tessera.trainer.autoencoders import autoencoder_id, build_autoencoder
from tessera.trainer.text_encoders import TextEmbedding, build_text_encoder, text_encoder_id

log = logging.getLogger("tessera.components")


@dataclass
class Frozen:
    """The frozen text encoder and autoencoder (built lazily: a precomputed dataset may need neither)."""

    text_cfg: Any
    ae_cfg: Any
    device: torch.device
    _text: Any = None
    _ae: Any = None
    _empty: TextEmbedding | None = None

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
            self._empty = self.text.empty_embedding().to(self.device)
        return self._empty


def batch_to_inputs(batch: dict, frozen: Frozen, device: torch.device, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, TextEmbedding, dict[str, int]]:
    """(x0 latents (B,C,h,w), text condition, counts of what was computed on the fly)."""
    on_the_fly = {"text_encoded": 0, "latents_encoded": 0}
    if "latent" in batch:
        x0 = batch["latent"].to(device, torch.float32)
    else:
        with torch.no_grad():
            x0 = frozen.ae.encode(batch["image"].to(device, torch.float32)).float()
        on_the_fly["latents_encoded"] = x0.shape[0]
    if "text_hidden" in batch:
        pooled = batch.get("text_pooled")
        cond = TextEmbedding(batch["text_hidden"].to(device), batch["text_mask"].to(device).bool(),
                             pooled.to(device) if pooled is not None else None)
    else:
        cond = frozen.text.encode(list(batch["caption"])).to(device)
        on_the_fly["text_encoded"] = x0.shape[0]
    cond = TextEmbedding(cond.hidden.to(dtype), cond.mask, None if cond.pooled is None else cond.pooled.to(dtype))
    return x0, cond, on_the_fly


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
