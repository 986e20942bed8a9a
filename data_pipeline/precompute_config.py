"""What ``tessera data precompute`` is told (its config) and what it leaves behind (paths, the manifest).

The worker (``precompute_worker``) and the driver (``precompute``) share these; see ``precompute`` for the
stage as a whole.
"""

from __future__ import annotations

import datetime
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from tessera import __version__, storage
from tessera.config import config_hash, to_dict
from tessera.data_pipeline.executors import RayConfig
from tessera.data_pipeline.manifest import FORMAT
from tessera.storage import StorageConfig
from tessera.trainer.autoencoders.configs import AutoencoderConfig
from tessera.trainer.text_encoders.configs import HFEncoderConfig, TextEncoderConfig


def _default_encoder() -> TextEncoderConfig:
    return TextEncoderConfig(name="hf_encoder", hf_encoder=HFEncoderConfig(path="minilm", max_length=32))


@dataclass(kw_only=True)
class PrecomputeConfig:
    """What ``tessera data precompute`` reads, computes and writes; ``source``/``output`` are dirs or s3://."""

    source: str  # a dataset written by `tessera data ingest` (or by a previous precompute)
    output: str  # a new dataset; never the source itself
    text_encoder: TextEncoderConfig = field(default_factory=_default_encoder)
    autoencoder: AutoencoderConfig | None = None  # None: no latents (e.g. a pixel-space model)
    # Caption variants to embed. []: every variant present, so `precompute` after `recaption` embeds the new
    # captions too; a variant the source manifest declares (caption_variants) but a sample lacks is counted missing.
    variants: list[str] = field(default_factory=list)
    batch_size: int = 64  # prompts (and images) per encoder call; also fixes the batching, hence the bytes
    store_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    trim_padding: bool = True  # store tokens up to the last valid one; the loader re-pads per batch
    executor: Literal["ray", "local"] = "ray"
    ray: RayConfig = field(default_factory=RayConfig)
    actors: int | None = None  # None: one per GPU of the Ray cluster, or 1 without GPUs
    max_task_retries: int = 2  # shard retries after an actor dies
    seed: int = 0  # seeds sampling autoencoder posteriors (KL "sample")
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        if not self.source or not self.output:
            raise ValueError("source and output must name a directory or s3:// prefix")
        if self.source.rstrip("/") == self.output.rstrip("/"):
            raise ValueError("output must differ from source (precompute writes a new, derived dataset)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"actors must be >= 1 or null, got {self.actors}")
        if self.max_task_retries < 0:
            raise ValueError(f"max_task_retries must be >= 0, got {self.max_task_retries}")
        if any("." in v or not v for v in self.variants):
            raise ValueError(f"variants must be non-empty names without dots, got {self.variants}")


class SourceMismatch(RuntimeError):
    """A source shard's bytes differ from its source manifest entry."""


class PrecomputeError(RuntimeError):
    """Some shards failed; finished shards are kept, and a rerun retries the rest."""


def output_config_hash(cfg: PrecomputeConfig, source_manifest_sha256: str) -> str:
    """Hash of everything that changes output bytes (not executor, Ray or storage settings)."""
    keys = ("text_encoder", "autoencoder", "variants", "batch_size", "store_dtype", "trim_padding", "seed")
    fields = {k: to_dict(getattr(cfg, k)) for k in keys}
    return config_hash({"source_manifest_sha256": source_manifest_sha256, **fields})


def stats_url(out: str, name: str) -> str:
    """``OUT/shards/NNNNN.stats.json``: a shard's stats, its done-marker."""
    return storage.join(out, name.removesuffix(".tar") + ".stats.json")


def attempts_dir(out: str, name: str) -> str:
    """Where each attempt at a shard leaves one marker, so retries are counted."""
    return storage.join(out, "_staging", "attempts", name.removesuffix(".tar").rsplit("/", 1)[-1])


def plan_tasks(source_manifest: dict) -> list[dict]:
    """One task per source shard, in manifest order, with the caption variants the source declares."""
    declared = list(source_manifest.get("caption_variants") or [])
    return [{"name": s["name"], "index": i, "sha256": s["sha256"], "samples": s["samples"],
             "input": s.get("input", s["samples"]), "buckets": s["buckets"], "variants": declared}
            for i, s in enumerate(source_manifest["shards"])]


def _sum(stats: list[dict], key: str) -> dict[str, int]:
    total: Counter = Counter()
    for s in stats:
        total.update(s[key])
    return dict(sorted(total.items()))


def build_manifest(cfg: PrecomputeConfig, src: dict, src_sha: str, stats: list[dict], wall: float) -> dict:
    """The derived dataset's manifest: the source's sample accounting, new shard hashes, lineage, caches."""
    shards = [{"name": s["shard"], "sha256": s["sha256"], "bytes": s["bytes"], "samples": s["samples"],
               "input": s["input"], "buckets": s["buckets"]} for s in stats]
    emb, latent = _sum(stats, "emb"), _sum(stats, "latent")
    prev = src.get("caches") or {}
    stage = Counter()
    for s in stats:
        stage.update(s["seconds"])
    samples = sum(s["samples"] for s in stats)
    return {
        "format": FORMAT, "tessera_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_config_hash": src.get("source_config_hash"), "output_config_hash": output_config_hash(cfg, src_sha),
        "config": to_dict(cfg), "shards": shards,
        # Samples are the source's, unchanged: its accounting carries over.
        "totals": src["totals"], "reasons": src.get("reasons", {}), "buckets": src.get("buckets", {}),
        "retries": sum(s["retries"] for s in stats),
        "timing": {"wall_seconds": round(wall, 3), "task_seconds": round(stage["total"], 3),
                   "samples_per_s": round(samples / max(wall, 1e-9), 2)},
        "lineage": {"source": cfg.source, "source_manifest_sha256": src_sha},
        "caches": {"emb": sorted(set(prev.get("emb", [])) | set(emb)),
                   "latent": sorted(set(prev.get("latent", [])) | set(latent))},
        **({"caption_variants": src["caption_variants"]} if src.get("caption_variants") else {}),
        "precompute": {"samples": samples, "emb": emb, "latent": latent,
                       "missing_caption": _sum(stats, "missing_caption"),
                       "failed_latent": _sum(stats, "failed_latent"),
                       "bad_json": sum(s["bad_json"] for s in stats),
                       "stage_seconds": {k: round(v, 3) for k, v in sorted(stage.items())},
                       "text_encoder": stats[0]["text_encoder"] if stats else None,
                       "autoencoder": stats[0]["autoencoder"] if stats else None},
    }
