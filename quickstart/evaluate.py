"""Quickstart evaluation: the trainer's step-0 model, sample grids and FID against the held-out real images.

Sampling and Inception run on the device ``tessera.device.pick_device`` detects (the local GPU, else the CPU).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import torch
from PIL import Image

from tessera.device import pick_device
from tessera.evaluation.adherence import colour_adherence
from tessera.evaluation.fid import compute_fid_stats, frechet_distance
from tessera.evaluation.inception import load_inception
from tessera.evaluation.stats_cache import StatsCache
from tessera.quickstart.data import load_holdout
from tessera.trainer.components import Frozen
from tessera.trainer.engine import seed_everything
from tessera.trainer.inference import generate, make_grid


def initial_model(cfg, device: torch.device | None = None):
    """(model, text encoder, autoencoder) with the trainer's step-0 weights, on ``device`` (default: detected).

    Rank 0 seeds and builds the model on the CPU before any encoder is loaded, as the trainer does (DeepSpeed
    broadcasts rank 0's parameters, so this is the initial model of every rank); then it moves to ``device``.
    """
    device = device or pick_device()
    seed_everything(cfg.train.seed, 0, False)
    model = cfg.model.build()
    frozen = Frozen(cfg.text_encoder, cfg.autoencoder, device)
    return model.to(device).eval(), frozen.text, frozen.ae


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def generate_like(model, te, ae, sampler_cfg, objective_cfg, items, seed: int):
    """One image per held-out item, with its caption at its bucket size (grouped by bucket); item order kept."""
    out: list = [None] * len(items)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, h in enumerate(items):
        by_bucket.setdefault(h.hw, []).append(i)
    for b, ((hh, ww), idx) in enumerate(sorted(by_bucket.items())):
        imgs = generate(model, te, ae, sampler_cfg, objective_cfg, [items[i].caption for i in idx], height=hh,
                        width=ww, seed=seed + 1000 * b, device=_device_of(model), batch_size=32)
        for i, im in zip(idx, imgs):
            out[i] = im
    return out


class FID:
    """FID against a fixed set of held-out real images, with the real statistics cached on disk."""

    def __init__(self, holdout_dir: Path, cache_dir: Path, n_images: int | None, batch_size: int, seed: int) -> None:
        self.batch_size, self.seed = batch_size, seed
        self.items = load_holdout(str(holdout_dir))[:n_images]  # keys are hashes: a random subset
        self.net = load_inception()  # on the detected device
        real = [Image.open(h.file).convert("RGB") for h in self.items]
        self.mu, self.sigma, _ = compute_fid_stats(real, self.net, batch_size, cache=StatsCache(cache_dir))
        # The real images' own colour adherence: the ceiling the generated images are compared with.
        self.real_colour = colour_adherence(real, [h.caption for h in self.items])

    def __call__(self, model, te, ae, sampler_cfg, objective_cfg) -> dict:
        """FID and colour adherence of the model's images for the held-out captions; also how long sampling and
        Inception took."""
        t0 = time.perf_counter()
        fake = generate_like(model, te, ae, sampler_cfg, objective_cfg, self.items, self.seed)
        t1 = time.perf_counter()
        mu, sigma, _ = compute_fid_stats(fake, self.net, self.batch_size)
        fid = frechet_distance(mu, sigma, self.mu, self.sigma)
        inception_s = time.perf_counter() - t1
        colour = colour_adherence(fake, [h.caption for h in self.items])
        return {"fid": round(fid, 2), "n": len(fake), "sample_s": round(t1 - t0, 4),
                "inception_s": round(inception_s, 1), "colour_adherence": colour["accuracy"],
                "colour_scored": colour["n"], "colour_per_colour": colour["per_colour"],
                "colour_adherence_real": self.real_colour["accuracy"]}


def save_grid(model, te, ae, sampler_cfg, objective_cfg, prompts: list[str], size: tuple[int, int], seed: int,
              path: Path) -> None:
    """A captioned grid PNG of one image per prompt (same layout as the trainer's grids)."""
    imgs = generate(model, te, ae, sampler_cfg, objective_cfg, prompts, height=size[0], width=size[1], seed=seed,
                    device=_device_of(model))
    buf = io.BytesIO()
    make_grid(imgs, prompts, scale=max(1, 96 // max(size[0], 1))).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
