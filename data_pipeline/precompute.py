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

This module is the driver and its two executors: a pool of long-lived Ray actors, one per device, each
loading the encoders once and taking the next shard in order when it finishes one, or the same worker
in-process. The worker is ``precompute_worker``; the config and manifest are ``precompute_config``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from collections import deque
from typing import Any, Iterator

from tessera import storage
from tessera.cli_args import load_from_args
from tessera.config import ConfigError, to_dict
from tessera.data_pipeline.executors import RayExecutor, count_task
from tessera.data_pipeline.manifest import FORMAT
from tessera.data_pipeline.precompute_config import (
    PrecomputeConfig, PrecomputeError, build_manifest, output_config_hash, plan_tasks, stats_url,
)  # fmt: skip
from tessera.data_pipeline.precompute_worker import ShardEncoder
from tessera.data_pipeline.shards import read_json, write_json
from tessera.log import progress

log = logging.getLogger("tessera.data")

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


# --------------------------------------------------------------------------- driver


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


def _run_pending(cfg: PrecomputeConfig, pending: list[dict]) -> None:
    """Process the unfinished shards with a progress bar; raise PrecomputeError naming every failure."""
    mapper = _map_local if cfg.executor == "local" else _map_ray
    failures: list[str] = []
    samples, rate, t0 = 0, 0.0, time.perf_counter()
    with progress(total=len(pending), desc="precompute", unit="shard") as bar:
        for task, result in mapper(cfg, pending):
            if isinstance(result, Exception):
                failures.append(f"{task['name']}: {type(result).__name__}: {result}")
            samples += task["samples"]
            rate = count_task(bar, samples, t0)
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
    pending = [t for t in tasks if not storage.exists(stats_url(cfg.output, t["name"]))]
    log.info("precompute: %d shard(s), %d already done -> %s", len(tasks), len(tasks) - len(pending), cfg.output)
    if pending:
        _run_pending(cfg, pending)
    stats = [read_json(stats_url(cfg.output, t["name"])) for t in tasks]
    manifest = build_manifest(cfg, src, src_sha, stats, time.perf_counter() - t0)
    write_json(storage.join(cfg.output, "manifest.json"), manifest)  # written last
    _cleanup_staging(cfg.output)
    p = manifest["precompute"]
    log.info("precompute stage seconds (summed over shards): %s", p["stage_seconds"])
    log.info("precompute done: %d samples, emb %s, latent %s, missing captions %s -> %s", p["samples"], p["emb"],
             p["latent"], p["missing_caption"], cfg.output)
    return manifest


def precompute_command(args: argparse.Namespace) -> int:
    """``tessera data precompute``: run or resume a precompute from a config file plus overrides."""
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
