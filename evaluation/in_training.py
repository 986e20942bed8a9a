"""In-training evaluation: run a small suite on in-memory weights every N samples and log it.

The evaluation package sits above the trainer, so the CLI builds ``training_hooks(cfg)`` and hands it to
``trainer.loop.train``; the loop then calls ``hooks.evaluate(model, text_encoder, autoencoder, step, tracker)``
on rank 0 with the EMA (or gathered) weights in a plain ``nn.Module``.

Images stay in memory (nothing is written); the FID network and the reference statistics are loaded
once per process and suite, so later calls cost only sampling and feature extraction.
"""

from __future__ import annotations

import logging
import time

from tessera.assets import require_assets
from tessera.config import config_hash, to_dict
from tessera.evaluation.config import EvalSuiteConfig, load_suite, resolve_spec
from tessera.evaluation.generate import ModelGenerator, image_seed, work_items
from tessera.evaluation.images import PILSource
from tessera.evaluation.metrics import ITEM_KEYS, MetricSet
from tessera.trainer.diffusion.sampling import SamplerConfig
from tessera.trainer.grids import TrainHooks

log = logging.getLogger("tessera.eval.in_training")

_METRIC_SETS: dict[str, MetricSet] = {}  # suite config hash -> loaded networks and reference statistics


def metric_set_for(suite_cfg: EvalSuiteConfig) -> MetricSet:
    """The process-wide ``MetricSet`` of a suite (built on first use)."""
    key = config_hash(suite_cfg)
    if key not in _METRIC_SETS:
        _METRIC_SETS[key] = MetricSet(suite_cfg)
    return _METRIC_SETS[key]


def evaluate_weights(model, text_encoder, autoencoder, objective_cfg, suite_cfg: EvalSuiteConfig, step: int,
                     tracker=None, *, sampler_cfg=None, size: tuple[int, int] | None = None,
                     prefix: str | None = None) -> dict:
    """Generate the suite's images from in-memory weights, compute its metrics, log them at ``step``."""
    suite_cfg.check()
    s = suite_cfg.sampling
    if size is None and (s.height is None or s.width is None):
        raise ValueError("in-training evaluation needs size=(h, w) or sampling.height/width in the suite")
    spec = resolve_spec(s, to_dict(sampler_cfg or SamplerConfig()), size or (s.height, s.width))
    metric_set = metric_set_for(suite_cfg)
    prompts = metric_set.prompts()
    items = work_items(len(prompts), s.images_per_prompt)
    was_training = model.training
    t0 = time.perf_counter()
    try:
        gen = ModelGenerator(model, text_encoder, autoencoder, objective_cfg, spec)
        images = []
        for i in range(0, len(items), s.batch_size):
            chunk = items[i:i + s.batch_size]
            images += gen([prompts[p] for p, _ in chunk], [image_seed(s.seed, p, k) for p, k in chunk])
    finally:
        model.train(was_training)
    gen_seconds = time.perf_counter() - t0
    index = {it: i for i, it in enumerate(items)}
    metrics, per_image, _, _ = metric_set.evaluate(PILSource(images), items, lambda it: images[index[it]], prompts)
    metrics["generate_seconds"] = round(gen_seconds, 3)
    prefix = prefix or f"eval/{suite_cfg.name}"
    if tracker is not None:
        tracker.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)
        cols = sorted({k for row in per_image for k in row if k not in ITEM_KEYS})
        rows = [[row["prompt_idx"], row["sample_idx"], prompts[row["prompt_idx"]],
                 images[index[(row["prompt_idx"], row["sample_idx"])]], *[row.get(c) for c in cols]]
                for row in per_image[:suite_cfg.table_rows]]
        tracker.log_table(f"{prefix}/samples", ["prompt_idx", "sample_idx", "prompt", "image", *cols], rows, step=step)
    log.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in metrics.items()))
    return metrics


def training_hooks(cfg):
    """The trainer's ``TrainHooks`` for a ``TrainJobConfig``: its ``eval`` suite run every ``eval.every_samples``."""
    if not cfg.eval.every_samples:
        return TrainHooks()
    suite = load_suite(cfg.eval.suite, cfg.eval.overrides)
    require_assets(suite, f"the in-training eval suite {cfg.eval.suite}")

    def evaluate(model, text_encoder, autoencoder, step, tracker):
        return evaluate_weights(model, text_encoder, autoencoder, cfg.objective, suite, step, tracker,
                                sampler_cfg=cfg.samples.sampler, size=(cfg.samples.height, cfg.samples.width))

    return TrainHooks(evaluate=evaluate)
