"""``tessera data ingest``: sources -> per-sample processing -> deduplicated, bucketed webdataset shards.

One input partition is one output shard (``DIR/shards/NNNNN.tar``, numbered by global partition
order, sources in config order). Three phases keep the within-run dedup deterministic whatever order
tasks finish in, so a kill -9 and a rerun reproduce an uninterrupted run's shard hashes:

1. ``stage_partition`` (one task per partition): read + process every input, write
   ``_staging/NNNNN.tar`` then ``_staging/NNNNN.hashes.json`` (the phase's done-marker).
2. the driver: :func:`tessera.data_pipeline.dedup.decide` over (partition, position) order.
3. ``finalize_partition`` (one task per partition): filter the staging tar into ``shards/NNNNN.tar``,
   write ``rejects/NNNNN.parquet``, then ``shards/NNNNN.stats.json`` (the shard's done-marker).

Finally ``manifest.json`` is written last. Every output is atomic and its marker written last, so
a retried or rerun task is harmless and finished work is skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Iterable, Iterator, Literal

from tessera.data_pipeline.dedup import Candidate, DedupConfig, decide
from tessera.data_pipeline.executors import LocalExecutor, RayConfig, RayExecutor, count_task, make_executor
from tessera.data_pipeline.manifest import AccountingError, build_manifest, check_shard_accounting, output_config_hash
from tessera.data_pipeline.process import ProcessConfig
from tessera.data_pipeline.shards import TarShardWriter, read_json, sample_members, write_json, write_rejects
from tessera.data_pipeline.sources import Partition, SourceConfig
from tessera import storage
from tessera.config import ConfigError, from_dict, to_dict
from tessera.log import progress
from tessera.storage import StorageConfig
from tessera.tars import iter_samples

log = logging.getLogger("tessera.data")

BATCH = 64  # samples per process_batch call (score filters run batched)


@dataclass(kw_only=True)
class IngestConfig:
    """Everything ``tessera data ingest`` needs; ``output`` is a local dir or ``s3://`` prefix."""

    sources: list[SourceConfig]
    output: str
    process: ProcessConfig = field(default_factory=ProcessConfig)
    samples_per_shard: int = 10_000
    executor: Literal["ray", "local"] = "ray"
    ray: RayConfig = field(default_factory=RayConfig)
    max_task_retries: int = 3
    dedup: DedupConfig = field(default_factory=DedupConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    seed: int = 0  # for any randomised source or filter; part of the output hash

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("sources must list at least one source")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.max_task_retries < 0:
            raise ValueError(f"max_task_retries must be >= 0, got {self.max_task_retries}")
        if not self.output:
            raise ValueError("output must name a directory or s3:// prefix")


# --------------------------------------------------------------------------- paths


def shard_url(out: str, n: int, suffix: str) -> str:
    """``DIR/shards/NNNNN<suffix>`` (suffix ``.tar`` or ``.stats.json``)."""
    return storage.join(out, "shards", f"{n:05d}{suffix}")


def _staging(out: str, n: int, suffix: str) -> str:
    return storage.join(out, "_staging", f"{n:05d}{suffix}")


def _rejects_url(out: str, n: int) -> str:
    return storage.join(out, "rejects", f"{n:05d}.parquet")


def _mark_attempt(out: str, n: int, phase: str) -> None:
    """Leave one marker per task attempt, so retries (Ray's or a rerun's) are counted in the stats."""
    storage.write_bytes(storage.join(out, "_staging", "attempts", f"{n:05d}", f"{phase}-{uuid.uuid4().hex}"), b"")


def _attempts(out: str, n: int) -> dict[str, int]:
    counts = {"stage": 0, "finalize": 0}
    for url in storage.list_prefix(storage.join(out, "_staging", "attempts", f"{n:05d}")):
        phase = url.rsplit("/", 1)[-1].split("-", 1)[0]
        counts[phase] = counts.get(phase, 0) + 1
    return counts


# --------------------------------------------------------------------------- worker side


_PROCESSORS: dict[str, Any] = {}


def _processor(cfg: IngestConfig):
    """One SampleProcessor per worker process and config (scorers may load models: build once)."""
    from tessera.data_pipeline.process import SampleProcessor
    from tessera.config import config_hash

    h = config_hash(cfg.process)
    if h not in _PROCESSORS:
        _PROCESSORS.clear()
        _PROCESSORS[h] = SampleProcessor(cfg.process)
    return _PROCESSORS[h]


def _task_config(task: dict) -> IngestConfig:
    cfg = from_dict(IngestConfig, task["config"], source=f"task {task['name']}")
    storage.configure(cfg.storage)
    return cfg


def _batched(it: Iterable, n: int) -> Iterator[list]:
    it = iter(it)
    while batch := list(islice(it, n)):
        yield batch


def _location(meta: dict) -> dict:
    return {"url": meta.get("url"), "path": meta.get("path")}


def stage_partition(task: dict) -> dict:
    """Phase 1 task: read and process one partition into a staging tar plus its hashes file."""
    from tessera.data_pipeline.sample import Processed
    from tessera.data_pipeline.sources import build_source

    cfg, n = _task_config(task), task["index"]
    hashes_url = _staging(cfg.output, n, ".hashes.json")
    if storage.exists(hashes_url):
        return {"index": n, "input": 0, "skipped": True}
    _mark_attempt(cfg.output, n, "stage")
    t0 = time.perf_counter()
    source = build_source(cfg.sources[task["source_index"]])
    processor = _processor(cfg)
    samples, rejects, keys, position = [], [], set(), 0
    with storage.atomic_write(_staging(cfg.output, n, ".tar")) as f:
        writer = TarShardWriter(f)
        for batch in _batched(source.read(Partition(**task["partition"])), BATCH):
            results = processor.process_batch(batch)
            if len(results) != len(batch):
                raise AccountingError(f"process_batch returned {len(results)} results for {len(batch)} inputs")
            for r in results:
                if isinstance(r, Processed) and r.key in keys:
                    rejects.append({"position": position, "source_id": r.meta.get("source_id"), "reason": "duplicate",
                                    "detail": f"same key as an earlier sample: {r.key}", **_location(r.meta)})
                elif isinstance(r, Processed):
                    keys.add(r.key)
                    writer.add_sample(sample_members(r.key, r.image, r.ext, r.caption, r.meta))
                    samples.append({"position": position, "key": r.key, "sha256": r.sha256, "phash": r.phash,
                                    "bucket": r.bucket, "source_id": r.meta.get("source_id"),
                                    "captioned": bool(r.caption), **_location(r.meta)})
                else:
                    rejects.append({"position": position, "source_id": r.source_id, "reason": r.reason,
                                    "detail": r.detail, **_location(r.meta)})
                position += 1
        writer.close()
    seconds = time.perf_counter() - t0
    write_json(hashes_url, {"index": n, "input": position, "samples": samples, "rejects": rejects, "seconds": seconds})
    return {"index": n, "input": position, "skipped": False}


def finalize_partition(task: dict) -> dict:
    """Phase 3 task: drop the driver's duplicates, write the final shard, its rejects and its stats."""
    cfg, n = _task_config(task), task["index"]
    out = cfg.output
    stats_url = shard_url(out, n, ".stats.json")
    if storage.exists(stats_url):
        return read_json(stats_url)
    _mark_attempt(out, n, "finalize")
    t0 = time.perf_counter()
    staged = read_json(_staging(out, n, ".hashes.json"))
    drops = {int(p): (reason, detail) for p, reason, detail in task["drops"]}
    by_key = {s["key"]: s for s in staged["samples"]}
    rejects, written, buckets, uncaptioned = list(staged["rejects"]), [], {}, 0
    staged_tar = _staging(out, n, ".tar")
    with storage.open_read(staged_tar) as src, storage.atomic_write(shard_url(out, n, ".tar")) as f:
        writer = TarShardWriter(f)
        for sample in iter_samples(src, staged_tar):
            s = by_key[sample.key]
            if s["position"] in drops:
                reason, detail = drops[s["position"]]
                rejects.append({**{k: s.get(k) for k in ("position", "source_id", "url", "path")},
                                "reason": reason, "detail": detail})
                continue
            writer.add_sample(sample.named())
            written.append(s["position"])
            buckets[s["bucket"]] = buckets.get(s["bucket"], 0) + 1
            uncaptioned += not s.get("captioned", True)  # kept with an empty alt (process.require_caption: false)
        sha, nbytes = writer.close()
    check_shard_accounting(n, staged["input"], written, [r["position"] for r in rejects], len(staged["samples"]))
    write_rejects(_rejects_url(out, n), rejects)
    reasons: dict[str, int] = {}
    for r in rejects:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    attempts = _attempts(out, n)
    stats = {
        "shard": f"shards/{n:05d}.tar", "index": n, "partition": task["partition"],
        "input": staged["input"], "written": len(written), "rejected": len(rejects),
        "kept_without_caption": uncaptioned,
        "reasons": dict(sorted(reasons.items())), "buckets": dict(sorted(buckets.items())),
        "sha256": sha, "bytes": nbytes, "attempts": attempts,
        "retries": sum(max(0, v - 1) for v in attempts.values()),
        "seconds": {"stage": round(staged["seconds"], 3), "finalize": round(time.perf_counter() - t0, 3)},
    }
    write_json(stats_url, stats)  # the done-marker: last
    storage.delete(_staging(out, n, ".tar"))
    return stats


# --------------------------------------------------------------------------- driver side


def plan_partitions(cfg: IngestConfig) -> list[dict]:
    """Every partition of every source (config order), as plain-data task dicts numbered globally."""
    from tessera.data_pipeline.sources import build_source

    plain = to_dict(cfg)
    tasks = []
    for si, src_cfg in enumerate(cfg.sources):
        for part in build_source(src_cfg).partitions(cfg.samples_per_shard):
            n = len(tasks)
            tasks.append({"name": f"{n:05d}", "index": n, "source_index": si,
                          "partition": dataclasses.asdict(part), "config": plain})
    return tasks


def _check_resume(cfg: IngestConfig) -> None:
    """Refuse to mix shards of a different config into an existing output directory."""
    h = output_config_hash(cfg)
    for name in ("_staging/run.json", "manifest.json"):
        url = storage.join(cfg.output, name)
        if storage.exists(url):
            prev = read_json(url).get("output_config_hash")
            if prev != h:
                raise ConfigError(
                    f"{cfg.output} holds an ingest made with a different config ({name}: output_config_hash "
                    f"{prev} != {h}); use a new output directory or delete the old one"
                )
            return
    write_json(storage.join(cfg.output, "_staging", "run.json"), {"output_config_hash": h})


def _run_phase(executor, fn, tasks: list[dict], desc: str, count_key: str) -> list[dict]:
    """Run one phase's tasks with a progress bar; return their results (in completion order)."""
    results: list[dict] = []
    samples, rate, t0 = 0, 0.0, time.perf_counter()
    with progress(total=len(tasks), desc=desc, unit="shard") as bar:
        for r in executor.map(fn, tasks):
            results.append(r)
            samples += int(r.get(count_key, 0))
            rate = count_task(bar, samples, t0)
    log.info("%s: %d tasks, %.1f samples/s", desc, len(tasks), rate)
    return results


def _read_all(urls: list[str]) -> list[dict]:
    """Read many small JSON files concurrently (S3 GETs are latency-bound)."""
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(read_json, urls))


def _dedup_drops(cfg: IngestConfig, staged: list[dict]) -> dict[int, list]:
    """Phase 2: the global duplicate decision, grouped by partition as [position, reason, detail]."""
    cands = (Candidate(partition=h["index"], position=s["position"], key=s["key"], sha256=s["sha256"], phash=s["phash"])
             for h in staged for s in h["samples"])
    drops: dict[int, list] = {h["index"]: [] for h in staged}
    for (part, pos), (reason, detail) in sorted(decide(cands, cfg.dedup).items()):
        drops[part].append([pos, reason, detail])
    return drops


def _cleanup_staging(out: str) -> None:
    """Delete the staging area once the manifest is written (S3: aborted uploads need a lifecycle rule)."""
    for url in storage.list_prefix(storage.join(out, "_staging")):
        storage.delete(url)
    if not storage.is_s3(out):
        import shutil

        root = storage.local_path(out)
        shutil.rmtree(root / "_staging", ignore_errors=True)
        # Temp files of writes cut short by a killed worker (finished writes were renamed away).
        for stale in [*root.glob("shards/.*.tessera-tmp"), *root.glob("rejects/.*.tessera-tmp")]:
            stale.unlink(missing_ok=True)


def run_ingest(cfg: IngestConfig, executor: LocalExecutor | RayExecutor | None = None) -> dict:
    """Run (or resume) an ingest and return the manifest written to ``DIR/manifest.json``."""
    t0 = time.perf_counter()
    storage.configure(cfg.storage)
    _check_resume(cfg)
    tasks = plan_partitions(cfg)
    if not tasks:
        raise ValueError("the sources yielded no partitions (no inputs?)")
    done = set(storage.list_prefix(storage.join(cfg.output, "shards")))  # one LIST, not a HEAD per shard
    pending = [t for t in tasks if shard_url(cfg.output, t["index"], ".stats.json") not in done]
    if pending:
        own = executor is None
        executor = executor or make_executor(cfg.executor, cfg.ray, cfg.max_task_retries)
        try:
            _run_phase(executor, stage_partition, tasks, "ingest 1/2 read+process", "input")
            staged = _read_all([_staging(cfg.output, t["index"], ".hashes.json") for t in tasks])
            drops = _dedup_drops(cfg, staged)
            fin = [{**t, "drops": drops[t["index"]]} for t in pending]
            _run_phase(executor, finalize_partition, fin, "ingest 2/2 dedup+write", "input")
        finally:
            if own:
                executor.close()
    stats = _read_all([shard_url(cfg.output, t["index"], ".stats.json") for t in tasks])
    manifest = build_manifest(cfg, stats, wall_seconds=time.perf_counter() - t0)
    write_json(storage.join(cfg.output, "manifest.json"), manifest)  # written last
    _cleanup_staging(cfg.output)
    t = manifest["totals"]
    log.info("ingest done: %d input, %d written, %d rejected -> %s", t["input"], t["written"], t["rejected"],
             cfg.output)
    return manifest
