"""What the loop samples on its way: EMA sample grids (trainer inference) and the in-training evaluation hook.

Both are sharded over the ranks: every rank assembles the whole EMA (or raw) weights (``gather_to_all``), builds
the plain model once, samples its share of the work (item ``i`` on rank ``i % world``, with the per-image seed an
unsharded run gives item ``i``) and frees the model; the images come to rank 0 as uint8 tensors
(``distributed.gather_dealt``), which writes and logs them. So no rank waits idle at the next collective while
one samples everything, and the grid is the one a one-rank run draws.

In-training evaluation needs the ``evaluation`` package, which sits above the trainer; the CLI builds it
(``evaluation.in_training.training_hooks``) and hands it to ``train`` as ``TrainHooks.evaluate``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from tessera import storage
from tessera.trainer.distributed import dealt, gather_dealt
from tessera.trainer.inference import from_pil, grid_seed, load_condition, make_grid, model_from_weights, png_bytes
from tessera.trainer.inference import sample_seeded
from tessera.trainer.zero_state import gather_to_all

log = logging.getLogger("tessera.sample")

_BATCH = 16  # grid images per sampler call (inference.generate's batch)

# evaluate(model, text_encoder, autoencoder, step, tracker) -> metrics. Collective: every rank calls it with the
# same weights in a plain module and samples its share; rank 0 gets the metrics ({} elsewhere) and ``tracker``.
EvalFn = Callable[..., dict]


@dataclass
class TrainHooks:
    """Callbacks into the layers above the trainer, built by the CLI."""

    evaluate: EvalFn | None = None
    # The launcher's preemption notice, polled by the loop where no signal handler can run (Ray Train).
    preemption: Callable[[], int | None] | None = None


def _model(cfg, ema, frags, device) -> torch.nn.Module:
    """The plain model with the EMA (or raw) weights, on every rank (collective); the host copy is dropped once
    the model holds the weights."""
    weights = ema.gather_all() if ema is not None else gather_to_all(frags, lambda f: f.view())
    model = model_from_weights(cfg.model, weights, device)
    del weights
    return model


def _free(device: torch.device) -> None:
    """Hand the sampling model's memory back before training resumes."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def gather_images(images: list[Image.Image], total: int, size: tuple[int, int],
                  device: torch.device) -> list[Image.Image] | None:
    """This rank's dealt share of ``total`` RGB images of ``size`` (h, w) -> all of them in item order on rank 0
    (None elsewhere); collective, as uint8 tensors (nothing pickled)."""
    h, w = size
    local = (torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])) if images
             else torch.zeros((0, h, w, 3), dtype=torch.uint8))  # (n, H, W, 3)
    full = gather_dealt(local, total, device)
    return None if full is None else [Image.fromarray(a) for a in full.numpy()]


def log_sample_grid(cfg, ema, frags, frozen, tracker, run, step: int, rank: int, device) -> None:
    """Every rank samples its share of the fixed prompts with the EMA (or raw) weights (collective); rank 0 saves
    the grid as a PNG and logs it to W&B."""
    sc = cfg.samples
    prompts, mine = list(sc.prompts), list(dealt(len(sc.prompts)))
    # A control run's grid: each prompt with its condition image, shown above the image (rank 0 shows them all).
    conds = [load_condition(u, (sc.height, sc.width)) if rank == 0 or i in mine else None
             for i, u in enumerate(sc.control_images)] or None
    model = _model(cfg, ema, frags, device)
    try:
        local: list[Image.Image] = []
        for b in range(0, len(mine), _BATCH):
            idx = mine[b:b + _BATCH]
            ctl = None if conds is None else from_pil([conds[i] for i in idx])  # (B, 3, H, W)
            local += sample_seeded(model, frozen.text, frozen.ae, sc.sampler, cfg.objective, [prompts[i] for i in idx],
                                   [grid_seed(sc.seed, i) for i in idx], height=sc.height, width=sc.width,
                                   device=device, control=ctl)
    finally:
        del model
        _free(device)
    images = gather_images(local, len(prompts), (sc.height, sc.width), device)
    if images is None:
        return
    tiles, caps = (conds + images, ["condition"] * len(conds) + prompts) if conds else (images, prompts)
    grid = make_grid(tiles, list(caps), ncols=len(images) if conds else None, scale=max(1, 96 // max(sc.height, 1)))
    storage.write_bytes(run.path("samples", f"step_{step:09d}.png"), png_bytes(grid))
    tracker.log_images("samples/ema" if ema is not None else "samples/raw", images, prompts, step=step)
    log.info("sample grid for step %d written", step)


def run_eval_hook(hooks: TrainHooks, cfg, ema, frags, frozen, tracker, step: int, rank: int, device) -> None:
    """Every rank: evaluate the EMA (or raw) weights through ``hooks.evaluate``, which shards its work over the
    ranks (collective); rank 0 logs the metrics."""
    model = _model(cfg, ema, frags, device)
    try:
        metrics = hooks.evaluate(model, frozen.text, frozen.ae, step, tracker if rank == 0 else None)
    finally:
        del model
        _free(device)
    if rank == 0:
        log.info("in-training eval at step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()
                                                           if isinstance(v, float)})
