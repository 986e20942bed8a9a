"""``tessera data precompute``: a derived dataset whose shards carry frozen text-encoder outputs and latents.

Each source shard ``shards/NNNNN.tar`` becomes an output shard of the same name holding every original
member unchanged plus, per sample, the cache members of docs/CONTRACTS.md:

    KEY.emb.<encoder_id>.<variant>.safetensors   hidden (L, D), mask (L,) int8, pooled (D,) if any
    KEY.latent.<autoencoder_id>.safetensors      latent (C, h, w)

Ids name the weights and output-shaping options, so one dataset can hold several caches: precomputing a
second encoder on an already precomputed dataset keeps the first one's members (a member of the same
name is replaced). The shard is the unit of work, as in ingest: the tar is written atomically, then
``NNNNN.stats.json`` (the done-marker), then ``manifest.json`` last, with lineage to the source. A
rerun skips finished shards, and the bytes of a shard depend only on the source shard and the config
(fixed batching, seeded posterior sampling), so a killed-and-resumed run reproduces the hashes.

Work runs on a pool of long-lived Ray actors, one per device, each loading the encoders once and taking
the next shard in order when it finishes one; the local executor runs the same worker in-process.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import logging
import shutil
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, BinaryIO, Iterable, Iterator, Literal

from tessera.data_pipeline.executors import Progress, RayConfig, RayExecutor
from tessera.data_pipeline.manifest import FORMAT
from tessera.data_pipeline.shards import IMAGE_EXTS, TarShardWriter, iter_samples, read_json, write_json
from tessera import __version__, storage
from tessera.cli_args import add_config_args, load_from_args
from tessera.config import ConfigError, config_hash, from_dict, to_dict
from tessera.storage import StorageConfig
from tessera.trainer.autoencoders.configs import AutoencoderConfig
from tessera.trainer.text_encoders.configs import HFEncoderConfig, TextEncoderConfig

log = logging.getLogger("tessera.data")


def _default_encoder() -> TextEncoderConfig:
    return TextEncoderConfig(name="hf_encoder", hf_encoder=HFEncoderConfig(path="minilm", max_length=32))


@dataclass(kw_only=True)
class PrecomputeConfig:
    """What ``tessera data precompute`` reads, computes and writes; ``source``/``output`` are dirs or s3://."""

    source: str  # a dataset written by `tessera data ingest` (or by a previous precompute)
    output: str  # a new dataset; never the source itself
    text_encoder: TextEncoderConfig = field(default_factory=_default_encoder)
    autoencoder: AutoencoderConfig | None = None  # None: no latents (e.g. a pixel-space model)
    variants: list[str] = field(default_factory=lambda: ["alt"])  # caption variants; [] = every one present
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


def _stats_url(out: str, name: str) -> str:
    return storage.join(out, name.removesuffix(".tar") + ".stats.json")


def _attempts_dir(out: str, name: str) -> str:
    return storage.join(out, "_staging", "attempts", name.removesuffix(".tar").rsplit("/", 1)[-1])


def _batched(it: Iterable, n: int) -> Iterator[list]:
    it = iter(it)
    while batch := list(islice(it, n)):
        yield batch


# --------------------------------------------------------------------------- worker side


def open_verified(url: str, sha256: str, name: str) -> BinaryIO:
    """The source shard as a stream, after checking its sha256 against the source manifest."""
    if storage.is_s3(url):  # one download: hash it in memory, then parse the same bytes
        data = storage.read_bytes(url)
        digest, f = hashlib.sha256(data).hexdigest(), io.BytesIO(data)
    else:  # hash pass first; the parse pass then reads from the page cache
        h = hashlib.sha256()
        with storage.open_read(url) as src:
            while chunk := src.read(1 << 20):
                h.update(chunk)
        digest, f = h.hexdigest(), storage.open_read(url)
    if digest != sha256:
        f.close()
        raise SourceMismatch(f"source shard {name} ({url}) has sha256 {digest[:16]}.., but the source manifest "
                             f"says {sha256[:16]}..: the source changed or is corrupt; re-ingest or re-verify it")
    return f


def _seed_of(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & (2**63 - 1)


_ENCODERS: dict[str, tuple[str, Any]] = {}


def _cached(kind: str, cfg: Any, build: Any) -> Any:
    """One frozen model per kind and process, rebuilt only when its config changes (large models)."""
    h = config_hash(to_dict(cfg))
    if kind not in _ENCODERS or _ENCODERS[kind][0] != h:
        _ENCODERS.pop(kind, None)  # release the old one before building the new
        _ENCODERS[kind] = (h, build(cfg))
    return _ENCODERS[kind][1]


def load_encoders(text_cfg: TextEncoderConfig, ae_cfg: AutoencoderConfig | None) -> tuple[Any, Any]:
    """(text encoder, autoencoder or None), built once per process and config: reruns reuse them."""
    from tessera.trainer.autoencoders import build_autoencoder
    from tessera.trainer.text_encoders import build_text_encoder

    text = _cached("text", text_cfg, build_text_encoder)
    return text, None if ae_cfg is None else _cached("ae", ae_cfg, build_autoencoder)


class ShardEncoder:
    """The frozen encoders of one worker (loaded once) and the per-shard job; a Ray actor class too."""

    def __init__(self, plain_cfg: dict) -> None:
        import torch

        self.cfg = cfg = from_dict(PrecomputeConfig, plain_cfg, "precompute worker")
        storage.configure(cfg.storage)
        t0 = time.perf_counter()
        self.text, self.ae = load_encoders(cfg.text_encoder, cfg.autoencoder)
        self.load_seconds = time.perf_counter() - t0
        self._unreported_load = self.load_seconds  # charged to this worker's first shard's stats
        self.store = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.store_dtype]

    def ids(self) -> dict:
        """The cache ids this worker writes."""
        return {"text_encoder": self.text.id, "autoencoder": None if self.ae is None else self.ae.id}

    def _emb_members(self, keys: list[str], items: list[tuple[int, str, str]], out: list[list]) -> None:
        """Encode (sample index, variant, caption) items in batches; append members to ``out[index]``."""
        import torch
        from safetensors.torch import save

        for batch in _batched(items, self.cfg.batch_size):
            emb = self.text.encode([c for _, _, c in batch])  # hidden (B, L, D), mask (B, L)
            for j, (i, v, _) in enumerate(batch):
                mask = emb.mask[j].cpu()  # (L,) bool, right-padded
                n = int(mask.nonzero().max()) + 1 if self.cfg.trim_padding else mask.shape[0]
                t = {"hidden": emb.hidden[j, :n].to(self.store).cpu().clone(),  # (n, D)
                     "mask": mask[:n].to(torch.int8)}  # (n,)
                if emb.pooled is not None:
                    t["pooled"] = emb.pooled[j].to(self.store).cpu().clone()  # (Dp,)
                out[i].append((f"{keys[i]}.emb.{self.text.id}.{v}.safetensors", save(t)))

    def _latent_members(self, keys: list[str], images: list[tuple[int, bytes]], out: list[list],
                        failed: Counter) -> None:
        """Encode images grouped by size (bucket) in batches; append members to ``out[index]``."""
        import numpy as np
        import torch
        from PIL import Image
        from safetensors.torch import save

        by_size: dict[tuple[int, int], list[tuple[int, Any]]] = {}
        for i, data in images:
            try:
                with Image.open(io.BytesIO(data)) as im:
                    arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # (H, W, 3) uint8
            except (OSError, ValueError, Image.DecompressionBombError):
                failed["undecodable_image"] += 1
                continue
            by_size.setdefault(arr.shape[:2], []).append((i, arr))
        for hw in sorted(by_size):
            for batch in _batched(by_size[hw], self.cfg.batch_size):
                u8 = torch.from_numpy(np.stack([a for _, a in batch]))  # (B, H, W, 3)
                x = u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, 3, H, W) in [-1, 1], as the loader
                gen = torch.Generator(device=self.ae.device).manual_seed(_seed_of(self.cfg.seed, keys[batch[0][0]]))
                z = self.ae.encode(x, generator=gen).to(self.store).cpu().contiguous()  # (B, C, h, w)
                for j, (i, _) in enumerate(batch):
                    out[i].append((f"{keys[i]}.latent.{self.ae.id}.safetensors", save({"latent": z[j].clone()})))

    def _chunk(self, chunk: list[tuple[str, list]], counts: dict) -> list[list[tuple[str, bytes]]]:
        """One chunk of samples -> their new cache members (emb in variant order, then latent)."""
        keys = [k for k, _ in chunk]
        items, images = [], []
        for i, (key, members) in enumerate(chunk):
            by_ext = {n.partition(".")[2]: d for n, d in members}
            try:
                captions = json.loads(by_ext["json"]).get("captions") or {}
            except (KeyError, ValueError, AttributeError):
                captions = {}
                counts["bad_json"] += 1
            for v in self.cfg.variants or sorted(captions):
                text = captions.get(v)
                if isinstance(text, str) and text.strip():
                    items.append((i, v, text))
                else:
                    counts["missing_caption"][v] += 1
            if self.ae is not None:
                ext = next((e for e in IMAGE_EXTS if e in by_ext), None)
                if ext is None:
                    counts["failed_latent"]["missing_image"] += 1
                else:
                    images.append((i, by_ext[ext]))
        new: list[list[tuple[str, bytes]]] = [[] for _ in chunk]
        t0 = time.perf_counter()
        self._emb_members(keys, items, new)
        t1 = time.perf_counter()
        if self.ae is not None:
            self._latent_members(keys, images, new, counts["failed_latent"])
        counts["seconds"]["text"] += t1 - t0
        counts["seconds"]["latent"] += time.perf_counter() - t1
        return new

    def process(self, task: dict) -> dict:
        """Source shard -> output shard (originals + caches), then its stats (the done-marker); idempotent."""
        cfg, name = self.cfg, task["name"]
        stats_url = _stats_url(cfg.output, name)
        if storage.exists(stats_url):
            return read_json(stats_url)
        # One marker per attempt (a Ray retry after an actor died, or a rerun), so retries are counted.
        storage.write_bytes(storage.join(_attempts_dir(cfg.output, name), uuid.uuid4().hex), b"")
        t0 = time.perf_counter()
        counts: dict[str, Any] = {"missing_caption": Counter(), "failed_latent": Counter(), "bad_json": 0,
                                  "emb": Counter(), "latent": Counter(), "seconds": Counter()}
        samples = 0
        with open_verified(storage.join(cfg.source, name), task["sha256"], name) as src, \
                storage.atomic_write(storage.join(cfg.output, name)) as f:
            counts["seconds"]["verify"] = time.perf_counter() - t0
            writer = TarShardWriter(f)
            for chunk in _batched(iter_samples(src), cfg.batch_size):
                for (key, members), new in zip(chunk, self._chunk(chunk, counts)):
                    replaced = {n for n, _ in new}
                    writer.add_sample([m for m in members if m[0] not in replaced] + new)
                    for n, _ in new:
                        _, kind, cache = n.removesuffix(".safetensors").split(".", 2)  # KEY.emb.<id>.<variant>
                        counts[kind][cache] += 1
                samples += len(chunk)
            if samples != task["samples"]:  # raised inside the atomic write: nothing is published
                raise SourceMismatch(f"source shard {name}: {samples} samples, its manifest says {task['samples']}")
            sha, nbytes = writer.close()
        secs = counts["seconds"]
        secs["total"] = time.perf_counter() - t0
        secs["io"] = secs["total"] - secs["text"] - secs["latent"]
        secs["load"], self._unreported_load = self._unreported_load, 0.0
        attempts = len(storage.list_prefix(_attempts_dir(cfg.output, name)))
        stats = {"shard": name, "index": task["index"], "source_sha256": task["sha256"], "sha256": sha,
                 "bytes": nbytes, "samples": samples, "input": task["input"], "buckets": task["buckets"], **self.ids(),
                 **{k: dict(sorted(counts[k].items())) for k in ("emb", "latent", "missing_caption", "failed_latent")},
                 "bad_json": counts["bad_json"], "attempts": attempts, "retries": attempts - 1, "seconds": {k: round(v, 3) for k, v in sorted(secs.items())}}
        write_json(stats_url, stats)  # the done-marker: last
        return stats


# --------------------------------------------------------------------------- executors


def _map_local(cfg: PrecomputeConfig, tasks: list[dict]) -> Iterator[tuple[dict, dict | Exception]]:
    """One in-process worker over the shards in order; yields (task, stats or the exception)."""
    worker = ShardEncoder(to_dict(cfg))
    log.info("precompute: encoders loaded in %.1fs (%s)", worker.load_seconds, worker.ids())
    for task in tasks:
        try:
            yield task, worker.process(task)
        except Exception as e:  # noqa: BLE001 - counted and raised by the driver after the other shards
            log.error("precompute: %s failed: %s", task["name"], e)
            yield task, e


def _actor_resources(ray: Any, n_actors: int) -> dict:
    """One device per actor: a GPU share when the cluster has GPUs, else an equal share of the CPUs."""
    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0)), int(res.get("CPU", 1))
    if gpus:
        return {"num_gpus": min(1.0, gpus / n_actors), "num_cpus": 1}
    return {"num_gpus": 0, "num_cpus": max(1, cpus // n_actors)}


def _map_ray(cfg: PrecomputeConfig, tasks: list[dict]) -> Iterator[tuple[dict, dict | Exception]]:
    """A pool of actors (one per device), each handed the next shard in order when it finishes one."""
    import ray

    runtime = RayExecutor(cfg.ray, cfg.max_task_retries)  # starts (and later stops) Ray, or joins a cluster
    actors = []
    try:
        n = cfg.actors or max(1, int(ray.cluster_resources().get("GPU", 0)))
        n = min(n, len(tasks))
        res = _actor_resources(ray, n)
        cls = ray.remote(ShardEncoder).options(max_restarts=cfg.max_task_retries,
                                               max_task_retries=cfg.max_task_retries, **res)
        actors = [cls.remote(to_dict(cfg)) for _ in range(n)]
        log.info("precompute: %d Ray actor(s), %s each", n, res)
        todo, running = deque(tasks), {}
        for actor in actors[: len(todo)]:
            task = todo.popleft()
            running[actor.process.remote(task)] = (actor, task)
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, task = running.pop(ref)
            try:
                yield task, ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a RayTaskError carries the worker's message
                log.error("precompute: %s failed: %s", task["name"], e)
                yield task, e
            if todo:
                nxt = todo.popleft()
                running[actor.process.remote(nxt)] = (actor, nxt)
    finally:
        for actor in actors:
            ray.kill(actor)
        runtime.close()


# --------------------------------------------------------------------------- driver side


def _load_source(cfg: PrecomputeConfig) -> tuple[dict, str]:
    """The source manifest and the sha256 of its bytes (the lineage pin)."""
    url = storage.join(cfg.source, "manifest.json")
    if not storage.exists(url):
        raise FileNotFoundError(f"no manifest.json under {cfg.source}: not a finished `tessera data ingest` output")
    raw = storage.read_bytes(url)
    manifest = json.loads(raw)
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{cfg.source}: manifest format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest, hashlib.sha256(raw).hexdigest()


def _check_resume(cfg: PrecomputeConfig, h: str) -> None:
    """Refuse to mix shards of another config or source into an existing output."""
    for name in ("_staging/run.json", "manifest.json"):
        url = storage.join(cfg.output, name)
        if storage.exists(url):
            prev = read_json(url).get("output_config_hash")
            if prev != h:
                raise ConfigError(f"{cfg.output} holds a precompute of another config or source ({name}: "
                                  f"output_config_hash {prev} != {h}); use a new output or delete the old one")
            return
    write_json(storage.join(cfg.output, "_staging", "run.json"), {"output_config_hash": h})


def plan_tasks(source_manifest: dict) -> list[dict]:
    """One task per source shard, in manifest order."""
    return [{"name": s["name"], "index": i, "sha256": s["sha256"], "samples": s["samples"],
             "input": s.get("input", s["samples"]), "buckets": s["buckets"]}
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
        "precompute": {"samples": samples, "emb": emb, "latent": latent,
                       "missing_caption": _sum(stats, "missing_caption"),
                       "failed_latent": _sum(stats, "failed_latent"),
                       "bad_json": sum(s["bad_json"] for s in stats),
                       "stage_seconds": {k: round(v, 3) for k, v in sorted(stage.items())},
                       "text_encoder": stats[0]["text_encoder"] if stats else None,
                       "autoencoder": stats[0]["autoencoder"] if stats else None},
    }


def _run_pending(cfg: PrecomputeConfig, pending: list[dict]) -> None:
    """Process the unfinished shards with a progress bar; raise PrecomputeError naming every failure."""
    mapper = _map_local if cfg.executor == "local" else _map_ray
    progress, failures = Progress(len(pending), "precompute"), []
    try:
        for task, result in mapper(cfg, pending):
            if isinstance(result, Exception):
                failures.append(f"{task['name']}: {type(result).__name__}: {result}")
            progress.update(task["samples"])
    finally:
        rate = progress.close()
    log.info("precompute: %d shard(s), %.1f samples/s", len(pending), rate)
    if failures:
        raise PrecomputeError(f"{len(failures)} of {len(pending)} shard(s) failed (finished shards are kept; "
                              "rerun to retry):\n  " + "\n  ".join(failures))


def _cleanup_staging(out: str) -> None:
    for url in storage.list_prefix(storage.join(out, "_staging")):
        storage.delete(url)
    if not storage.is_s3(out):
        shutil.rmtree(storage.local_path(storage.join(out, "_staging")), ignore_errors=True)


def run_precompute(cfg: PrecomputeConfig) -> dict:
    """Run (or resume) a precompute and return the manifest written to ``OUT/manifest.json``."""
    t0 = time.perf_counter()
    storage.configure(cfg.storage)
    src, src_sha = _load_source(cfg)
    _check_resume(cfg, output_config_hash(cfg, src_sha))
    tasks = plan_tasks(src)
    if not tasks:
        raise ValueError(f"{cfg.source} has no shards")
    pending = [t for t in tasks if not storage.exists(_stats_url(cfg.output, t["name"]))]
    log.info("precompute: %d shard(s), %d already done -> %s", len(tasks), len(tasks) - len(pending), cfg.output)
    if pending:
        _run_pending(cfg, pending)
    stats = [read_json(_stats_url(cfg.output, t["name"])) for t in tasks]
    manifest = build_manifest(cfg, src, src_sha, stats, time.perf_counter() - t0)
    write_json(storage.join(cfg.output, "manifest.json"), manifest)  # written last
    _cleanup_staging(cfg.output)
    p = manifest["precompute"]
    log.info("precompute stage seconds (summed over shards): %s", p["stage_seconds"])
    log.info("precompute done: %d samples, emb %s, latent %s, missing captions %s -> %s", p["samples"], p["emb"],
             p["latent"], p["missing_caption"], cfg.output)
    return manifest


# --------------------------------------------------------------------------- CLI


def precompute_command(args: argparse.Namespace) -> int:
    """Run or resume a precompute from a config file plus overrides."""
    cfg = load_from_args(PrecomputeConfig, args)
    m = run_precompute(cfg)
    p, t = m["precompute"], m["timing"]
    print(f"precomputed {p['samples']} samples in {len(m['shards'])} shards -> {cfg.output} "
          f"({t['samples_per_s']} samples/s, {t['wall_seconds']} s)")
    print(f"  text encoder id: {p['text_encoder']}  (loader: text_encoder_id={p['text_encoder']})")
    if p["autoencoder"]:
        print(f"  autoencoder id: {p['autoencoder']}  (loader: autoencoder_id={p['autoencoder']})")
    print(f"  stage seconds: {p['stage_seconds']}")
    return 0


def add_precompute_command(data_subparsers: argparse._SubParsersAction) -> None:
    """Add ``tessera data precompute`` (``--config``, ``--dry-run``, dotted overrides)."""
    p = data_subparsers.add_parser("precompute", help="derived dataset with frozen text embeddings (and latents) "
                                                      "added to every sample")
    add_config_args(p, required=True)
    p.set_defaults(func=precompute_command)
