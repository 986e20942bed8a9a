"""``tessera data recaption``: VLM (or measured) captions as new caption variants, in a derived dataset.

Each source shard becomes an output shard of the same name holding every original member unchanged except
``KEY.json``, which gains ``captions[<variant>]`` (kept captions) and ``caption_meta[<variant>]`` (provenance and
filter verdict, kept or not). As in ingest and precompute, the shard is the unit of work: the tar is written
atomically, then ``NNNNN.stats.json`` (the done-marker), then ``manifest.json`` last, with lineage to the
source manifest. A rerun (also after ``kill -9`` of the driver or an actor) skips finished shards; a rerun with
another job fingerprint (captioners, models, prompts, sampling, filters, batching) into the same output is
refused, naming what differs.

This module is the driver and its two executors: a pool of long-lived Ray actors (one per GPU, or one per
core), each loading the captioners once and taking the next shard in order when it finishes one, or the same
worker in-process. The worker is ``worker.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from collections import Counter, deque
from typing import Any, Iterator

from tessera import storage
from tessera.cli_args import load_from_args
from tessera.config import ConfigError, to_dict
from tessera.data_pipeline.executors import RayExecutor
from tessera.data_pipeline.manifest import FORMAT, derived_manifest
from tessera.data_pipeline.precompute_config import plan_tasks, stats_url
from tessera.data_pipeline.shards import read_json, write_json
from tessera.log import progress
from tessera.recaption.config import RecaptionConfig, fingerprint_parts, job_fingerprint

log = logging.getLogger("tessera.recaption")


class RecaptionError(RuntimeError):
    """Some shards failed; finished shards are kept, and a rerun retries the rest."""


def load_source(source: str) -> tuple[dict, str]:
    """The source manifest and the sha256 of its bytes (the lineage pin)."""
    url = storage.join(source, "manifest.json")
    if not storage.exists(url):
        raise FileNotFoundError(f"no manifest.json under {source}: not a finished Tessera dataset")
    raw = storage.read_bytes(url)
    manifest = json.loads(raw)
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{source}: manifest format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest, hashlib.sha256(raw).hexdigest()


def model_identities(cfg: RecaptionConfig) -> dict[str, str]:
    """variant -> what names its weights (local weight-file fingerprint, or hub id and revision)."""
    from tessera.recaption.hf import model_identity

    return {c.variant: model_identity(c.hf) for c in cfg.captioners if c.hf is not None}


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two fingerprint-part trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def check_fingerprint(cfg: RecaptionConfig, parts: dict, fp: str) -> None:
    """Refuse to mix shards of another job (captioners, models, prompts, sampling, filters) into an output."""
    for name in ("_staging/run.json", "manifest.json"):
        url = storage.join(cfg.output, name)
        if storage.exists(url):
            prev = read_json(url)
            prev_fp = prev.get("job_fingerprint")
            if prev_fp != fp:
                old = prev.get("fingerprint_parts") or (prev.get("recaption") or {}).get("fingerprint_parts") or {}
                raise ConfigError(f"{cfg.output} holds a recaption with another job fingerprint ({name}: {prev_fp} != "
                                  f"{fp}; differs in {', '.join(_diff(old, to_dict(parts))) or 'source'}); use a new "
                                  "output or delete the old one")
            return
    done = [u for u in storage.list_prefix(storage.join(cfg.output, "shards")) if u.endswith(".stats.json")]
    if done:  # finished shards with no record of the job that wrote them: never mix them into this one
        raise ConfigError(f"{cfg.output} holds {len(done)} finished shard(s) (e.g. {done[0]}) but no _staging/run.json "
                          "or manifest.json naming the job that wrote them; use a new output or delete the old one")
    write_json(storage.join(cfg.output, "_staging", "run.json"), {"job_fingerprint": fp,
                                                                   "fingerprint_parts": to_dict(parts)})


# --------------------------------------------------------------------------- executors


def _map_local(cfg: RecaptionConfig, tasks: list[dict]) -> Iterator[tuple[dict, dict | Exception]]:
    """One in-process worker over the shards in order; yields (task, stats or the exception)."""
    from tessera.recaption.worker import ShardCaptioner

    worker = ShardCaptioner(to_dict(cfg), "local", cfg.threads, ray_tasks=False)
    log.info("recaption: captioners loaded in %.1fs", worker.load_seconds)
    for task in tasks:
        try:
            yield task, worker.process(task)
        except Exception as e:  # noqa: BLE001 - counted and raised by the driver after the other shards
            log.error("recaption: %s failed: %s", task["name"], e)
            yield task, e


def actor_plan(cfg: RecaptionConfig, resources: dict, n_tasks: int) -> dict:
    """How the pool is laid out: ``n`` actors with Ray ``resources`` and torch ``threads`` each, and whether batches
    are prepared by Ray ``tasks``. One actor per GPU when a model captioner can use GPUs (decode then runs in CPU
    tasks, never in the GPU actor), else one per core, leaving CPU for the tasks if there are any."""
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if gpus and any(c.uses_model for c in cfg.captioners):
        per = max([c.vllm.tensor_parallel_size for c in cfg.captioners if c.vllm is not None] or [1])
        n = min(cfg.actors or max(1, int(gpus // per)), n_tasks)
        return {"n": n, "resources": {"num_gpus": min(float(per), gpus / n), "num_cpus": 1}, "threads": cfg.threads,
                "tasks": cfg.prepare_on != "actor"}
    n = max(1, min(cfg.actors or max(1, int(cpus)), n_tasks))
    share, tasks = cpus / n, cfg.prepare_on == "tasks"
    return {"n": n, "resources": {"num_gpus": 0, "num_cpus": max(0.25, share - (cfg.prepare_cpus if tasks else 0))},
            "threads": cfg.threads or max(1, int(share)), "tasks": tasks}


def _map_ray(cfg: RecaptionConfig, tasks: list[dict]) -> Iterator[tuple[dict, dict | Exception]]:
    """A pool of actors, each handed the next shard in order when it finishes one."""
    import ray

    from tessera.recaption.worker import ShardCaptioner

    runtime = RayExecutor(cfg.ray, cfg.max_task_retries)  # starts (and later stops) Ray, or joins a cluster
    actors = []
    try:
        plan = actor_plan(cfg, ray.cluster_resources(), len(tasks))
        cls = ray.remote(ShardCaptioner).options(max_restarts=cfg.max_task_retries,
                                                 max_task_retries=cfg.max_task_retries, **plan["resources"])
        actors = [cls.remote(to_dict(cfg), f"actor-{i}", plan["threads"], plan["tasks"]) for i in range(plan["n"])]
        log.info("recaption: %d Ray actor(s), %s and %s torch thread(s) each; batches prepared %s", plan["n"],
                 plan["resources"], plan["threads"], "by Ray CPU tasks" if plan["tasks"] else "in the actors")
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
                log.error("recaption: %s failed: %s", task["name"], e)
                yield task, e
            if todo:
                nxt = todo.popleft()
                running[actor.process.remote(nxt)] = (actor, nxt)
    finally:
        for actor in actors:
            ray.kill(actor)
        runtime.close()


# --------------------------------------------------------------------------- driver


def _run_pending(cfg: RecaptionConfig, pending: list[dict]) -> None:
    """Caption the unfinished shards with a progress bar (images/s, tokens/s); raise naming every failure."""
    mapper = _map_local if cfg.executor == "local" else _map_ray
    failures: list[str] = []
    images, tokens, t0 = 0, 0, time.perf_counter()
    with progress(total=len(pending), desc="recaption", unit="shard") as bar:
        for task, result in mapper(cfg, pending):
            if isinstance(result, Exception):
                failures.append(f"{task['name']}: {type(result).__name__}: {result}")
            else:
                images, tokens = images + result["images"], tokens + result["generated_tokens"]
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(images=images, images_per_s=f"{images / dt:.2f}", tokens_per_s=f"{tokens / dt:.1f}",
                            refresh=False)
            bar.update(1)
    if failures:
        raise RecaptionError(f"{len(failures)} of {len(pending)} shard(s) failed (finished shards are kept; rerun "
                             "to retry):\n  " + "\n  ".join(failures))


def throughput(stats: list[dict], wall: float, fresh: set[str]) -> dict:
    """Images (each through every captioner) and generated tokens per second: this run's over its wall time, and
    per actor over the shards it processed."""
    per: dict[str, Counter] = {}
    for s in stats:
        c = per.setdefault(s["worker"], Counter())
        c.update(images=s["images"], tokens=s["generated_tokens"], seconds=s["seconds"]["total"])
    done = [s for s in stats if s["shard"] in fresh]
    images, tokens = sum(s["images"] for s in done), sum(s["generated_tokens"] for s in done)
    return {"images": images, "images_per_s": round(images / max(wall, 1e-9), 3),
            "tokens_per_s": round(tokens / max(wall, 1e-9), 2),
            "per_actor": {w: {"images": c["images"], "seconds": round(c["seconds"], 3),
                              "images_per_s": round(c["images"] / max(c["seconds"], 1e-9), 3),
                              "tokens_per_s": round(c["tokens"] / max(c["seconds"], 1e-9), 2)}
                          for w, c in sorted(per.items())}}


def _variant_totals(stats: list[dict]) -> dict:
    total: dict[str, Counter] = {}
    for s in stats:
        for v, c in s["variants"].items():
            total.setdefault(v, Counter()).update(c)
    out = {}
    for v, c in sorted(total.items()):
        out[v] = dict(sorted(c.items()))
        out[v]["mean_text_tokens"] = round(c["text_tokens"] / c["written"], 2) if c["written"] else 0.0
    return out


def build_manifest(cfg: RecaptionConfig, src: dict, src_sha: str, parts: dict, fp: str, stats: list[dict],
                   wall: float, fresh: set[str]) -> dict:
    """The derived dataset's manifest: the source's sample accounting, new shard hashes, lineage, recaption totals."""
    head, stage, samples = derived_manifest(cfg, src, src_sha, fp, stats, wall)
    declared = set(src.get("caption_variants") or ["alt"]) | {c.variant for c in cfg.captioners}
    return {
        **head,
        "caption_variants": sorted(declared),
        "recaption": {"fingerprint_parts": to_dict(parts), "captioners": stats[0]["provenance"] if stats else [],
                      "filters": to_dict(cfg.filters), "variants": _variant_totals(stats), "samples": samples,
                      "bad_json": sum(s["bad_json"] for s in stats),
                      "missing_image": sum(s["missing_image"] for s in stats),
                      "throughput": throughput(stats, wall, fresh),
                      "stage_seconds": {k: round(v, 3) for k, v in sorted(stage.items())}},
    }


def _cleanup_staging(out: str) -> None:
    for url in storage.list_prefix(storage.join(out, "_staging")):
        storage.delete(url)
    if not storage.is_s3(out):
        root = storage.local_path(out)
        shutil.rmtree(root / "_staging", ignore_errors=True)
        for stale in root.glob("shards/.*.tessera-tmp"):  # writes cut short by a killed worker
            stale.unlink(missing_ok=True)


def run_recaption(cfg: RecaptionConfig) -> dict:
    """Run (or resume) a recaption and return the manifest written to ``OUT/manifest.json``."""
    t0 = time.perf_counter()
    storage.configure(cfg.storage)
    src, src_sha = load_source(cfg.source)
    parts = fingerprint_parts(cfg, model_identities(cfg))
    fp = job_fingerprint(parts, src_sha)
    check_fingerprint(cfg, parts, fp)
    tasks = plan_tasks(src)
    if not tasks:
        raise ValueError(f"{cfg.source} has no shards")
    pending = [t for t in tasks if not storage.exists(stats_url(cfg.output, t["name"]))]
    log.info("recaption: %d shard(s), %d already done -> %s", len(tasks), len(tasks) - len(pending), cfg.output)
    if pending:
        _run_pending(cfg, pending)
    stats = [read_json(stats_url(cfg.output, t["name"])) for t in tasks]
    manifest = build_manifest(cfg, src, src_sha, parts, fp, stats, time.perf_counter() - t0,
                              {t["name"] for t in pending})
    write_json(storage.join(cfg.output, "manifest.json"), manifest)  # written last
    _cleanup_staging(cfg.output)
    r = manifest["recaption"]
    for w, p in r["throughput"]["per_actor"].items():
        log.info("recaption throughput %s: %d images in %.1f s (%.2f images/s, %.1f tokens/s)", w, p["images"],
                 p["seconds"], p["images_per_s"], p["tokens_per_s"])
    log.info("recaption done: %d samples -> %s; %s", r["samples"], cfg.output,
             {v: (c.get("written", 0), c.get("dropped", 0)) for v, c in r["variants"].items()})
    return manifest


def recaption_command(args: argparse.Namespace) -> int:
    """``tessera data recaption``: run or resume a recaption from a config file plus overrides."""
    cfg = load_from_args(RecaptionConfig, args)
    m = run_recaption(cfg)
    r = m["recaption"]
    print(f"recaptioned {r['samples']} samples in {len(m['shards'])} shards -> {cfg.output} "
          f"({r['throughput']['images_per_s']} images/s, {r['throughput']['tokens_per_s']} tokens/s, "
          f"{m['timing']['wall_seconds']} s)")
    for v, c in r["variants"].items():
        verdicts = {k.removeprefix("verdict_"): n for k, n in c.items() if k.startswith("verdict_") and n}
        print(f"  {v}: {c.get('written', 0)} written, {c.get('dropped', 0)} dropped, {c.get('retried', 0)} retried "
              f"({c.get('recovered', 0)} recovered); verdicts {verdicts}; mean {c['mean_text_tokens']} tokens")
    print(f"  train on them: data.caption_variants={{alt: 0.3, {next(iter(r['variants']), 'variant')}: 0.7}} "
          "(after `tessera data precompute` with variants: [])")
    return 0
