"""``tessera data condition``: control conditions (edges, soft edges, colour layout, grayscale, depth, pose) for every
sample, in a derived dataset.

Each source shard becomes an output shard of the same name holding every original member unchanged plus, per
sample and condition, ``KEY.cond.<name>.png``: the registered annotator (``evaluation/annotators.py``) run on the
sample's image, at the image's size, hence in its aspect-ratio bucket. As in ingest, precompute and recaption the
shard is the unit of work: the tar is written atomically, then ``NNNNN.stats.json`` (the done-marker), then
``manifest.json`` last, with lineage to the source and each condition's annotator and settings under
``conditions``. A rerun skips finished shards; a rerun with another job fingerprint (annotators, their settings or
weights, overwrite) into the same output is refused, naming what differs.

Shards run as Ray tasks (a worker process keeps its annotators loaded across shards) or in this process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from typing import Any

from tessera import storage
from tessera.cli_args import load_from_args
from tessera.config import ConfigError, to_dict
from tessera.data_pipeline.condition_config import (
    ConditionError, ConditionJobConfig, build_manifest, fingerprint_parts, job_fingerprint,
)  # fmt: skip
from tessera.data_pipeline.condition_worker import condition_shard
from tessera.data_pipeline.executors import count_task, make_executor
from tessera.data_pipeline.manifest import FORMAT
from tessera.data_pipeline.precompute_config import plan_tasks, stats_url
from tessera.data_pipeline.shards import read_json, write_json
from tessera.log import progress

log = logging.getLogger("tessera.data")


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


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two fingerprint-part trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def check_fingerprint(cfg: ConditionJobConfig, parts: dict, fp: str) -> None:
    """Refuse to mix shards of another job (annotators, settings, weights, source) into an existing output."""
    for name in ("_staging/run.json", "manifest.json"):
        url = storage.join(cfg.output, name)
        if storage.exists(url):
            prev = read_json(url)
            if prev.get("job_fingerprint") != fp:
                old = prev.get("fingerprint_parts") or (prev.get("condition") or {}).get("fingerprint_parts") or {}
                raise ConfigError(f"{cfg.output} holds a condition job with another fingerprint ({name}: "
                                  f"{prev.get('job_fingerprint')} != {fp}; differs in "
                                  f"{', '.join(_diff(old, parts)) or 'source'}); use a new output or delete the old one")
            return
    done = [u for u in storage.list_prefix(storage.join(cfg.output, "shards")) if u.endswith(".stats.json")]
    if done:  # finished shards with no record of the job that wrote them: never mix them into this one
        raise ConfigError(f"{cfg.output} holds {len(done)} finished shard(s) (e.g. {done[0]}) but no record of the "
                          "job that wrote them; use a new output or delete the old one")
    write_json(storage.join(cfg.output, "_staging", "run.json"), {"job_fingerprint": fp, "fingerprint_parts": parts})


def _safe(task: dict) -> dict:
    """``condition_shard`` with its exception returned (named by shard), so every failed shard is reported."""
    try:
        return condition_shard(task)
    except Exception as e:  # noqa: BLE001 - counted and raised by the driver after the other shards
        return {"shard": task["name"], "error": f"{type(e).__name__}: {e}"}


def _run_pending(cfg: ConditionJobConfig, pending: list[dict], executor) -> None:
    """Condition the unfinished shards with a progress bar; raise ConditionError naming every failure."""
    own = executor is None
    executor = executor or make_executor(cfg.executor, cfg.ray, cfg.max_task_retries)
    failures: list[str] = []
    samples, t0 = 0, time.perf_counter()
    try:
        with progress(total=len(pending), desc="condition", unit="shard") as bar:
            for result in executor.map(_safe, pending):
                if "error" in result:
                    failures.append(f"{result['shard']}: {result['error']}")
                    log.error("condition: %s failed: %s", result["shard"], result["error"])
                else:
                    samples += result["samples"]
                count_task(bar, samples, t0)
    finally:
        if own:
            executor.close()
    if failures:
        raise ConditionError(f"{len(failures)} of {len(pending)} shard(s) failed (finished shards are kept; rerun to "
                             "retry):\n  " + "\n  ".join(failures))


def _cleanup_staging(out: str) -> None:
    for url in storage.list_prefix(storage.join(out, "_staging")):
        storage.delete(url)
    if not storage.is_s3(out):
        shutil.rmtree(storage.local_path(storage.join(out, "_staging")), ignore_errors=True)


def run_condition(cfg: ConditionJobConfig, executor=None) -> dict:
    """Run (or resume) a condition job and return the manifest written to ``OUT/manifest.json``; ``executor``: one
    already running (the quickstart's), else the config's is started and stopped here."""
    t0 = time.perf_counter()
    storage.configure(cfg.storage)
    src, src_sha = load_source(cfg.source)
    parts = fingerprint_parts(cfg)
    fp = job_fingerprint(parts, src_sha)
    check_fingerprint(cfg, parts, fp)
    tasks = [dict(t, config=to_dict(cfg)) for t in plan_tasks(src)]
    if not tasks:
        raise ValueError(f"{cfg.source} has no shards")
    pending = [t for t in tasks if not storage.exists(stats_url(cfg.output, t["name"]))]
    log.info("condition: %d shard(s), %d already done -> %s", len(tasks), len(tasks) - len(pending), cfg.output)
    if pending:
        _run_pending(cfg, pending, executor)
    stats = [read_json(stats_url(cfg.output, t["name"])) for t in tasks]
    manifest = build_manifest(cfg, src, src_sha, parts, fp, stats, time.perf_counter() - t0)
    write_json(storage.join(cfg.output, "manifest.json"), manifest)  # written last
    _cleanup_staging(cfg.output)
    log.info("condition done: %d samples -> %s; %s", manifest["condition"]["samples"], cfg.output,
             {n: {k: v for k, v in c.items() if k not in ("member", "annotator")}
              for n, c in manifest["conditions"].items() if n in cfg.conditions})
    return manifest


def condition_command(args: argparse.Namespace) -> int:
    """``tessera data condition``: run or resume a condition job from a config file plus overrides."""
    cfg = load_from_args(ConditionJobConfig, args)
    m = run_condition(cfg)
    print(f"conditioned {m['condition']['samples']} samples in {len(m['shards'])} shards -> {cfg.output} "
          f"({m['timing']['samples_per_s']} samples/s, {m['timing']['wall_seconds']} s)")
    for name in cfg.conditions:
        c = m["conditions"][name]
        fails = {k: v for k, v in c.items() if k not in ("member", "annotator", "written")}
        print(f"  {name}: {c.get('written', 0)} written as KEY.{c['member']} by {c['annotator']['name']}"
              + (f", not written: {fails}" if fails else ""))
    print(f"  train on it: data.path={cfg.output} model.control.condition={next(iter(cfg.conditions))}")
    return 0
