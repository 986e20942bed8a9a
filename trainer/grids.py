"""What the loop samples on its way: EMA sample grids (trainer inference) and the in-training evaluation hook.

In-training evaluation needs the ``evaluation`` package, which sits above the trainer; the CLI builds it
(``evaluation.in_training.training_hooks``) and hands it to ``train`` as ``TrainHooks.evaluate``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from tessera import storage
from tessera.trainer.zero_state import gather_to_rank0
from tessera.trainer.inference import generate, load_condition, make_grid, model_from_weights, png_bytes

log = logging.getLogger("tessera.sample")

# evaluate(model, text_encoder, autoencoder, step, tracker) -> metrics; runs on rank 0 with a plain module.
EvalFn = Callable[..., dict]


@dataclass
class TrainHooks:
    """Callbacks into the layers above the trainer, built by the CLI."""

    evaluate: EvalFn | None = None
    # The launcher's preemption notice, polled by the loop where no signal handler can run (Ray Train).
    preemption: Callable[[], int | None] | None = None


def _weights(ema, frags) -> dict:
    # Gathering is collective: every rank takes part even though only rank 0 samples.
    return ema.gather() if ema is not None else gather_to_rank0(frags, lambda f: f.view())


def log_sample_grid(cfg, ema, frags, frozen, tracker, run, step: int, rank: int, device) -> None:
    """Rank 0: sample the fixed prompts with the EMA (or raw) weights, save a PNG and log it to W&B."""
    weights = _weights(ema, frags)
    if rank != 0:
        return
    sc = cfg.samples
    model = model_from_weights(cfg.model, weights, device)
    # A control run's grid: each prompt with its condition image, shown above the image.
    conds = [load_condition(u, (sc.height, sc.width)) for u in sc.control_images] or None
    images = generate(model, frozen.text, frozen.ae, sc.sampler, cfg.objective, list(sc.prompts), height=sc.height,
                      width=sc.width, seed=sc.seed, device=device, controls=conds)
    tiles, caps = (conds + images, ["condition"] * len(conds) + list(sc.prompts)) if conds else (images, sc.prompts)
    grid = make_grid(tiles, list(caps), ncols=len(images) if conds else None, scale=max(1, 96 // max(sc.height, 1)))
    storage.write_bytes(run.path("samples", f"step_{step:09d}.png"), png_bytes(grid))
    tracker.log_images("samples/ema" if ema is not None else "samples/raw", images, list(sc.prompts), step=step)
    log.info("sample grid for step %d written", step)


def run_eval_hook(hooks: TrainHooks, cfg, ema, frags, frozen, tracker, step: int, rank: int, device) -> None:
    """Rank 0: evaluate the EMA (or raw) weights through ``hooks.evaluate``."""
    weights = _weights(ema, frags)
    if rank != 0:
        return
    model = model_from_weights(cfg.model, weights, device)
    metrics = hooks.evaluate(model, frozen.text, frozen.ae, step, tracker)
    log.info("in-training eval at step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()
                                                       if isinstance(v, float)})
