"""What ``tessera data condition`` is told (its config), what decides its output bytes (the job fingerprint), and the
manifest it leaves. No heavy imports: ``--dry-run`` prints the config cheaply.

    source: runs/data/emoji
    output: runs/data/emoji_canny
    conditions:                       # condition name -> annotator; each sample gains KEY.cond.<name>.png
      canny: {name: canny, options: {low: 100, high: 200}}
      layout: {name: colour_layout, options: {block: 4}}
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from tessera.config import config_hash
from tessera.data_pipeline.manifest import derived_manifest
from tessera.evaluation.annotators import AnnotatorConfig, annotator_identity
from tessera.ray_runtime import RayConfig
from tessera.storage import StorageConfig

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # a tar member suffix part: no dots


def cond_member(name: str) -> str:
    """The member extension of condition ``name``: ``KEY.cond.<name>.png``."""
    return f"cond.{name}.png"


@dataclass(kw_only=True)
class ConditionJobConfig:
    """Everything ``tessera data condition`` needs; ``source``/``output`` are directories or s3:// prefixes."""

    source: str  # a Tessera dataset (ingest, recaption, precompute or an earlier condition output)
    output: str  # a new, derived dataset; never the source itself
    conditions: dict[str, AnnotatorConfig]  # condition name -> annotator
    overwrite: bool = False  # False: a source sample that already has a condition of one of these names is an error
    batch_size: int = 64  # images per annotator call (model-based annotators batch on the device)
    executor: Literal["ray", "local"] = "ray"
    ray: RayConfig = field(default_factory=RayConfig)
    max_task_retries: int = 2  # a shard is retried after a worker dies or raises
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if not self.source or not self.output:
            raise ValueError("source and output must name a directory or s3:// prefix")
        if self.source.rstrip("/") == self.output.rstrip("/"):
            raise ValueError("output must differ from source (condition writes a new, derived dataset)")
        if not self.conditions:
            raise ValueError("conditions must name at least one condition (name -> annotator)")
        bad = [n for n in self.conditions if not _NAME.match(n)]
        if bad:
            raise ValueError(f"condition names must be letters, digits, '_' or '-' (no dots), got {bad}")
        if self.batch_size < 1 or self.max_task_retries < 0:
            raise ValueError("batch_size must be >= 1 and max_task_retries >= 0")


class ConditionError(RuntimeError):
    """Some shards failed; finished shards are kept, and a rerun retries the rest."""


def fingerprint_parts(cfg: ConditionJobConfig) -> dict:
    """What decides the output bytes, by part: every condition's annotator identity (settings, weights), overwrite."""
    return {"conditions": {n: annotator_identity(a) for n, a in sorted(cfg.conditions.items())},
            "overwrite": cfg.overwrite}


def job_fingerprint(parts: dict, source_manifest_sha256: str) -> str:
    """One hash of the fingerprint parts and the source; a rerun into the same output must match it."""
    return config_hash({"source_manifest_sha256": source_manifest_sha256, **parts})


def _sum(stats: list[dict], key: str) -> dict[str, Counter]:
    total: dict[str, Counter] = {}
    for s in stats:
        for name, c in s[key].items():
            total.setdefault(name, Counter()).update(c)
    return total


def build_manifest(cfg: ConditionJobConfig, src: dict, src_sha: str, parts: dict, fp: str, stats: list[dict],
                   wall: float) -> dict:
    """The derived dataset's manifest: the source's accounting, new shard hashes, lineage, and ``conditions``
    (each name's annotator identity and counts; a source's other conditions carry over)."""
    counts = _sum(stats, "conditions")
    conditions = dict(src.get("conditions") or {})
    for name, ident in parts["conditions"].items():
        conditions[name] = {"member": cond_member(name), "annotator": ident, **dict(sorted(counts.get(name, {}).items()))}
    head, stage, samples = derived_manifest(cfg, src, src_sha, fp, stats, wall)
    return {
        **head,
        **({"caption_variants": src["caption_variants"]} if src.get("caption_variants") else {}),
        "conditions": dict(sorted(conditions.items())),
        "condition": {"fingerprint_parts": parts, "samples": samples,
                      "stage_seconds": {k: round(v, 3) for k, v in sorted(stage.items())}},
    }
