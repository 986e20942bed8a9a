"""Running an evaluation suite over checkpoints: ``tessera eval --config SUITE --checkpoint A --checkpoint B``.

Per checkpoint: resolve it (training checkpoint, run dir or export; local or s3://), hash its weights,
generate the suite's images (resumable; local or Ray), compute the configured metrics and write
``<output>/<label>/metrics.json``. Then the combined ``<output>/metrics.json``, ``<output>/report.html``
and a W&B run (metrics and a table of prompt, image and scores). The suite's config lives in
``evaluation/config.py``, its metrics in ``evaluation/metrics.py``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from tessera import storage
from tessera.assets import require_assets
from tessera.config import ConfigError, config_hash, to_dict
from tessera.evaluation.checkpoints import (CheckpointInfo, checkpoint_info, unique_labels, weights_sha256,
                                            weights_used)
from tessera.evaluation.config import EvalSuiteConfig, resolve_spec
from tessera.evaluation.generate import CheckpointFactory, ImageFolder, Item, generate_missing, work_items
from tessera.evaluation.images import FolderSource
from tessera.evaluation.metrics import MetricSet
from tessera.evaluation.prompts import prompts_sha256
from tessera.evaluation.report import log_wandb, write_outputs

log = logging.getLogger("tessera.eval")


def items_source(folder: ImageFolder, items: list[Item], scratch: Path) -> FolderSource:
    """An FID image source over exactly ``items`` of a generated folder (which may hold more images).

    The items are gathered in ``scratch`` under their own names, so the source lists them in item order:
    symlinks for a local folder, downloads for an S3 one.
    """
    for item in items:
        url, link = folder.image_url(item), scratch / f"{item[0]:05d}_{item[1]:03d}.png"
        if storage.is_s3(url):
            link.write_bytes(storage.read_bytes(url))
        else:
            link.symlink_to(storage.local_path(url).resolve())
    return FolderSource(scratch)


def evaluate_checkpoint(cfg: EvalSuiteConfig, info: CheckpointInfo, label: str, prompts: list[str],
                        metric_set: MetricSet) -> dict:
    """Generate one checkpoint's missing images and score them all; returns its result record."""
    s = cfg.sampling
    spec = resolve_spec(s, info.sampler, info.size)
    weights_sha = weights_sha256(info)
    used = weights_used(info, s.use_ema)
    p_sha = prompts_sha256(prompts)
    identity = {"weights": used, "weights_sha256": weights_sha[used], "spec": to_dict(spec), "seed": s.seed,
                "prompts_sha256": p_sha}
    gen_key = config_hash(identity)
    folder = ImageFolder(storage.join(cfg.output, label, f"gen-{gen_key[:12]}"))
    factory = CheckpointFactory(info.url, spec, s.use_ema, s.device)
    gen_stats = generate_missing(folder, prompts, s.images_per_prompt, s.seed, factory, batch_size=s.batch_size,
                                 distribute=cfg.distribute, identity=identity)
    log.info("%s: %d images (%d generated, %d reused)", label, gen_stats["total"], gen_stats["generated"],
             gen_stats["reused"])
    items = work_items(len(prompts), s.images_per_prompt)
    with tempfile.TemporaryDirectory(prefix="tessera-eval-") as tmp:
        metrics, per_image, ref, adherence = metric_set.evaluate(items_source(folder, items, Path(tmp)), items,
                                                                 folder.read_image, prompts)
    return {
        "label": label, "folder": folder.url,
        "checkpoint": {"given": info.given, "url": info.url, "kind": info.kind, "step": info.step,
                       "samples": info.samples, "weights_used": used, "weights_sha256": weights_sha},
        "generation": dict(gen_stats, key=gen_key, spec=to_dict(spec), seed=s.seed,
                           images_per_prompt=s.images_per_prompt),
        "prompts": {"n": len(prompts), "sha256": p_sha, "source": to_dict(cfg.prompts)},
        "reference": ref, "metrics": metrics, "adherence": adherence, "per_image": per_image,
    }


def run_suite(cfg: EvalSuiteConfig, checkpoints: list[str]) -> dict:
    """Evaluate every checkpoint; write per-checkpoint and combined metrics.json, the report and W&B."""
    cfg.check()
    require_assets(cfg, "this eval suite")
    if not checkpoints:
        raise ConfigError("no --checkpoint given")
    metric_set = MetricSet(cfg)
    prompts = metric_set.prompts()  # the classifier's label prompts, or the suite's prompt set
    infos = [checkpoint_info(c) for c in checkpoints]
    results = [evaluate_checkpoint(cfg, info, label, prompts, metric_set)
               for info, label in zip(infos, unique_labels(infos))]
    wandb_info = log_wandb(cfg, prompts, results) if cfg.tracking.mode != "disabled" else None
    return write_outputs(cfg, prompts, results, wandb_info)
