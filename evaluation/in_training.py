"""In-training evaluation: run a small suite on in-memory weights every N samples and log it.

The evaluation package sits above the trainer, so the CLI builds ``training_hooks(cfg)`` and hands it to
``trainer.loop.train``; the loop then calls ``hooks.evaluate(model, text_encoder, autoencoder, step, tracker)``
on every rank with the EMA (or raw) weights in a plain ``nn.Module``.

The work is sharded over the ranks: rank r generates the suite's items ``r, r + world, ...`` (each with the
``image_seed`` an unsharded run gives it) and runs the FID Inception (preprocess and forward) on its own images,
and the per-image scores of CLIP and the rewards (``MetricSet.score_columns``) on its own images too; the images
(uint8), their features (float32) and score columns (float64) come to rank 0 as tensors, in item order. Rank 0
computes the FID/KID statistics from the features exactly as ``fid.compute_fid_stats`` accumulates them (batches of
``fid.batch_size`` in item order) and the means of the gathered columns; only the adherence metrics (classifier
accuracy, colour), whose reports need every image and whose networks are small, run on rank 0 over the gathered
images.

Images stay in memory (nothing is written); the FID network and the reference statistics are loaded
once per process and suite, so later calls cost only sampling and feature extraction.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from tessera.assets import require_assets
from tessera.config import config_hash, to_dict
from tessera.evaluation.config import EvalSuiteConfig, load_suite, resolve_spec
from tessera.evaluation.fid import iter_features, stats_in_batches
from tessera.evaluation.generate import ModelGenerator, image_seed, work_items
from tessera.evaluation.inception import FEATURE_DIM
from tessera.evaluation.metrics import ITEM_KEYS, MetricSet
from tessera.trainer.diffusion.sampling import SamplerConfig
from tessera.trainer.distributed import dealt, gather_dealt, rank
from tessera.trainer.grids import TrainHooks, gather_images

log = logging.getLogger("tessera.eval.in_training")

_METRIC_SETS: dict[str, MetricSet] = {}  # suite config hash -> loaded networks and reference statistics


def metric_set_for(suite_cfg: EvalSuiteConfig) -> MetricSet:
    """The process-wide ``MetricSet`` of a suite (built on first use)."""
    key = config_hash(suite_cfg)
    if key not in _METRIC_SETS:
        _METRIC_SETS[key] = MetricSet(suite_cfg)
    return _METRIC_SETS[key]


def _adherence_only(cfg: EvalSuiteConfig) -> EvalSuiteConfig:
    """The suite with FID/KID, CLIP score and rewards off: what rank 0 still scores on the gathered images (the
    classifier and colour adherence, whose reports need every image), while the others come from gathered columns."""
    return dataclasses.replace(cfg, fid=dataclasses.replace(cfg.fid, enabled=False),
                               kid=dataclasses.replace(cfg.kid, enabled=False),
                               clip_score=dataclasses.replace(cfg.clip_score, enabled=False), rewards=[])


def _features(metric_set: MetricSet, images: list, batch_size: int) -> np.ndarray:
    """(n, 2048) float32 FID features of this rank's images (n may be 0)."""
    feats = list(iter_features(images, metric_set.inception(), batch_size))
    return np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM), np.float32)


def evaluate_weights(model, text_encoder, autoencoder, objective_cfg, suite_cfg: EvalSuiteConfig, step: int,
                     tracker=None, *, sampler_cfg=None, size: tuple[int, int] | None = None,
                     prefix: str | None = None, sharded: bool = False) -> dict:
    """Generate the suite's images from in-memory weights, compute its metrics, log them at ``step``.

    ``sharded``: collective over the process group (see the module docstring); rank 0 logs and returns the
    metrics, other ranks return {}. The images are those of an unsharded run (same seeds), and so are the metrics
    as long as the FID Inception gives an image the same features in a smaller batch.
    """
    suite_cfg.check()
    s = suite_cfg.sampling
    if size is None and (s.height is None or s.width is None):
        raise ValueError("in-training evaluation needs size=(h, w) or sampling.height/width in the suite")
    spec = resolve_spec(s, to_dict(sampler_cfg or SamplerConfig()), size or (s.height, s.width))
    metric_set = metric_set_for(suite_cfg)
    prompts = metric_set.prompts()
    items = work_items(len(prompts), s.images_per_prompt)
    mine = [items[i] for i in (dealt(len(items)) if sharded else range(len(items)))]
    was_training = model.training
    t0 = time.perf_counter()
    try:
        gen = ModelGenerator(model, text_encoder, autoencoder, objective_cfg, spec)
        images = []
        for i in range(0, len(mine), s.batch_size):
            chunk = mine[i:i + s.batch_size]
            images += gen([prompts[p] for p, _ in chunk], [image_seed(s.seed, p, k) for p, k in chunk])
    finally:
        model.train(was_training)
    gen_seconds = time.perf_counter() - t0  # this rank's (rank 0's when sharded)
    feats = _features(metric_set, images, suite_cfg.fid.batch_size) if suite_cfg.fid.enabled else None
    # CLIP cosines and rewards, per image: each rank scores its own images (one float64 column per score).
    local_index = {it: i for i, it in enumerate(mine)}
    cols = metric_set.score_columns(mine, lambda it: images[local_index[it]], prompts)
    names = list(cols)
    table = torch.tensor([cols[n] for n in names], dtype=torch.float64).reshape(len(names), len(mine)).T.contiguous()
    if sharded:
        device = next(model.parameters()).device
        images = gather_images(images, len(items), (spec.height, spec.width), device)
        if feats is not None:
            feats = gather_dealt(torch.from_numpy(feats), len(items), device)
            feats = None if feats is None else feats.numpy()
        if names:
            table = gather_dealt(table, len(items), device)
        if rank() != 0:
            return {}
    metrics: dict = {"n_images": len(items)}
    if suite_cfg.fid.enabled:
        # the same accumulation batches as MetricSet's pass over images: equal features, bitwise equal statistics
        metric_set.fid_kid_from(*stats_in_batches(feats, suite_cfg.fid.batch_size), feats, metrics)
    index = {it: i for i, it in enumerate(items)}
    scores, per_image, _, _ = metric_set_for(_adherence_only(suite_cfg)).evaluate(
        None, items, lambda it: images[index[it]], prompts)
    metrics.update(scores)
    MetricSet.apply_scores({n: table[:, j].tolist() for j, n in enumerate(names)}, per_image, metrics)
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
                                sampler_cfg=cfg.samples.sampler, size=(cfg.samples.height, cfg.samples.width),
                                sharded=True)

    return TrainHooks(evaluate=evaluate)
