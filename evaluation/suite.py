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
from tessera.evaluation.generate import (CheckpointFactory, ImageFolder, Item, generate_missing, png_bytes,
                                         work_items)
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
    controls = None
    if cfg.control.enabled:  # the control set's conditions, one per prompt; the scale is part of what images depend on
        cset = metric_set.control_set()
        controls = [png_bytes(c) for c in cset.conditions]
        identity["control"] = {"dataset_manifest_sha256": cset.manifest_sha256, "condition": cset.condition,
                               "scale": cfg.control.scale}
    gen_key = config_hash(identity)
    folder = ImageFolder(storage.join(cfg.output, label, f"gen-{gen_key[:12]}"))
    factory = CheckpointFactory(info.url, spec, s.use_ema, s.device, controls, cfg.control.scale)
    gen_stats = generate_missing(folder, prompts, s.images_per_prompt, s.seed, factory, batch_size=s.batch_size,
                                 distribute=cfg.distribute, identity=identity)
    log.info("%s: %d images (%d generated, %d reused)", label, gen_stats["total"], gen_stats["generated"],
             gen_stats["reused"])
    items = work_items(len(prompts), s.images_per_prompt)
    with tempfile.TemporaryDirectory(prefix="tessera-eval-") as tmp:
        metrics, per_image, ref, adherence = metric_set.evaluate(items_source(folder, items, Path(tmp)), items,
                                                                 folder.read_image, prompts)
    if cfg.control.enabled:
        adherence["control"] = control_adherence(cfg, info, label, identity, factory, items, folder, metric_set,
                                                 prompts, per_image, metrics)
    return {
        "label": label, "folder": folder.url,
        "checkpoint": {"given": info.given, "url": info.url, "kind": info.kind, "step": info.step,
                       "samples": info.samples, "weights_used": used, "weights_sha256": weights_sha},
        "generation": dict(gen_stats, key=gen_key, spec=to_dict(spec), seed=s.seed,
                           images_per_prompt=s.images_per_prompt),
        "prompts": {"n": len(prompts), "sha256": p_sha, "source": to_dict(cfg.prompts)},
        "reference": ref, "metrics": metrics, "adherence": adherence, "per_image": per_image,
    }


def control_adherence(cfg: EvalSuiteConfig, info: CheckpointInfo, label: str, identity: dict, factory, items: list,
                      folder: ImageFolder, metric_set: MetricSet, prompts: list[str], per_image: list[dict],
                      metrics: dict) -> dict:
    """The control metric of the generated images, of the same checkpoint at control scale 0 (the floor: sampled
    into a folder of its own) and of the real images (the ceiling); per-image column ``control/<metric>``."""
    scorer = metric_set.control_scorer()
    m, idx = scorer.metric, [p for p, _ in items]
    for row, sc in zip(per_image, scorer.scores([folder.read_image(it) for it in items], idx)):
        row[f"control/{m}"] = sc[m]
    out = {"metric": m, "higher_is_better": scorer.higher_is_better, "condition": scorer.set.condition,
           "annotator": to_dict(scorer.set.annotator), "n": len(items),
           "value": sum(r[f"control/{m}"] for r in per_image) / len(per_image), "ceiling": metric_set.control_ceiling()}
    if cfg.control.floor:
        floor_id = dict(identity, control=dict(identity["control"], scale=0.0))
        floor = ImageFolder(storage.join(cfg.output, label, f"gen-{config_hash(floor_id)[:12]}"))
        factory.control_scale = 0.0
        generate_missing(floor, prompts, cfg.sampling.images_per_prompt, cfg.sampling.seed, factory,
                         batch_size=cfg.sampling.batch_size, distribute=cfg.distribute, identity=floor_id)
        out["floor"] = scorer.mean([floor.read_image(it) for it in items], idx)
        out["floor_folder"] = floor.url
    metrics.update({f"control/{m}": out["value"], f"control/{m}_ceiling": out["ceiling"]})
    if "floor" in out:
        metrics[f"control/{m}_floor"] = out["floor"]
    log.info("%s: control %s %.4f (floor %s, ceiling %.4f)", label, m, out["value"], out.get("floor"), out["ceiling"])
    return out


def run_suite(cfg: EvalSuiteConfig, checkpoints: list[str]) -> dict:
    """Evaluate every checkpoint; write per-checkpoint and combined metrics.json, the report and W&B."""
    cfg.check()
    require_assets(cfg, "this eval suite")
    if not checkpoints:
        raise ConfigError("no --checkpoint given")
    metric_set = MetricSet(cfg)
    prompts = metric_set.prompts()  # the control set's captions, the classifier's label prompts, or the prompt set
    if cfg.control.enabled:
        from tessera.evaluation.control import write_control_images

        write_control_images(metric_set.control_set(), cfg.output)  # condition | generated | real in the report
    infos = [checkpoint_info(c) for c in checkpoints]
    results = [evaluate_checkpoint(cfg, info, label, prompts, metric_set)
               for info, label in zip(infos, unique_labels(infos))]
    wandb_info = log_wandb(cfg, prompts, results) if cfg.tracking.mode != "disabled" else None
    return write_outputs(cfg, prompts, results, wandb_info)
