"""The condition worker: one source shard -> one output shard whose samples gain ``KEY.cond.<name>.png``.

``condition_shard(task)`` is a plain function of plain data, so either executor runs it (a Ray task per shard, or
in-process); annotators are built once per process and config. It is idempotent: the tar is written atomically,
then ``NNNNN.stats.json`` (the done-marker), so a retried or rerun task that finds the marker returns it.

A condition has the size of the image it is made from, which ingest stored at its aspect-ratio bucket: conditions
share the image's bucket, and the loader checks it. A sample whose image is missing or undecodable gets no
condition and is counted (``missing_image``, ``undecodable_image``); the loader then counts it as a hole.
"""

from __future__ import annotations

import io
import time
import uuid
from collections import Counter
from itertools import islice
from typing import Any

import numpy as np

from tessera import storage
from tessera.config import config_hash, from_dict, to_dict
from tessera.data_pipeline.condition_config import ConditionJobConfig, cond_member
from tessera.data_pipeline.precompute_config import SourceMismatch, attempts_dir, stats_url
from tessera.data_pipeline.precompute_worker import open_verified
from tessera.data_pipeline.shards import IMAGE_EXTS, TarShardWriter, read_json, write_json
from tessera.tars import Sample, iter_samples

_ANNOTATORS: dict[str, tuple[str, Any]] = {}


def annotators(cfg: ConditionJobConfig) -> dict[str, Any]:
    """name -> built annotator, once per process and config (a model-based one keeps its weights loaded)."""
    from tessera.evaluation.annotators import build_annotator

    out = {}
    for name, a in cfg.conditions.items():
        h = config_hash(to_dict(a))
        if name not in _ANNOTATORS or _ANNOTATORS[name][0] != h:
            _ANNOTATORS[name] = (h, build_annotator(a))
        out[name] = _ANNOTATORS[name][1]
    return out


def png(arr: np.ndarray) -> bytes:
    """A condition as PNG: one channel (mode L) or RGB."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB").save(buf, format="PNG")
    return buf.getvalue()


def decode(sample: Sample) -> tuple[np.ndarray | None, str | None]:
    """(RGB (H, W, 3) uint8, None) or (None, why): ``missing_image`` or ``undecodable_image``."""
    from PIL import Image

    ext = next((e for e in IMAGE_EXTS if e in sample.members), None)
    if ext is None:
        return None, "missing_image"
    try:
        with Image.open(io.BytesIO(sample.members[ext])) as im:
            return np.asarray(im.convert("RGB")), None
    except (OSError, ValueError, Image.DecompressionBombError):
        return None, "undecodable_image"


def _chunk(cfg: ConditionJobConfig, anns: dict, chunk: list[Sample], counts: dict[str, Counter],
           seconds: Counter) -> list[list[tuple[str, bytes]]]:
    """Each sample's new condition members (in condition-name order); failures counted per condition."""
    images, where = [], []
    for i, s in enumerate(chunk):
        for name in cfg.conditions:
            if cond_member(name) in s.members and not cfg.overwrite:
                raise ValueError(f"sample {s.key} already has {s.key}.{cond_member(name)}; set overwrite: true to "
                                 "replace it, or name the condition differently")
        img, why = decode(s)
        if img is None:
            for name in cfg.conditions:
                counts[name][why] += 1
            continue
        images.append(img)
        where.append(i)
    new: list[list[tuple[str, bytes]]] = [[] for _ in chunk]
    for name, ann in anns.items():
        t0 = time.perf_counter()
        for i, img, cond in zip(where, images, ann.annotate(images), strict=True):
            if cond.shape[:2] != img.shape[:2]:  # an annotator must keep the size: the condition shares the bucket
                raise ValueError(f"annotator {ann.name} made a {cond.shape[:2]} condition for the {img.shape[:2]} "
                                 f"image of sample {chunk[i].key}")
            new[i].append((f"{chunk[i].key}.{cond_member(name)}", png(cond)))
            counts[name]["written"] += 1
        seconds[name] += time.perf_counter() - t0
    return new


def condition_shard(task: dict) -> dict:
    """Source shard -> output shard (originals + conditions), then its stats (the done-marker); idempotent."""
    cfg = from_dict(ConditionJobConfig, task["config"], "condition task")
    storage.configure(cfg.storage)
    name = task["name"]
    done = stats_url(cfg.output, name)
    if storage.exists(done):
        return read_json(done)
    # One marker per attempt (a retry after a worker died, or a rerun), so retries are counted.
    storage.write_bytes(storage.join(attempts_dir(cfg.output, name), uuid.uuid4().hex), b"")
    t0 = time.perf_counter()
    anns = annotators(cfg)
    counts: dict[str, Counter] = {n: Counter() for n in cfg.conditions}
    seconds: Counter = Counter(load=time.perf_counter() - t0)
    samples = 0
    with open_verified(storage.join(cfg.source, name), task["sha256"], name) as src, \
            storage.atomic_write(storage.join(cfg.output, name)) as f:
        writer = TarShardWriter(f)
        it = iter_samples(src, name)
        while chunk := list(islice(it, cfg.batch_size)):
            for sample, new in zip(chunk, _chunk(cfg, anns, chunk, counts, seconds)):
                replaced = {n for n, _ in new}
                writer.add_sample([m for m in sample.named() if m[0] not in replaced] + new)
            samples += len(chunk)
        if samples != task["samples"]:  # raised inside the atomic write: nothing is published
            raise SourceMismatch(f"source shard {name}: {samples} samples, its manifest says {task['samples']}")
        sha, nbytes = writer.close()
    attempts = len(storage.list_prefix(attempts_dir(cfg.output, name)))
    seconds["total"] = time.perf_counter() - t0
    stats = {"shard": name, "index": task["index"], "source_sha256": task["sha256"], "sha256": sha, "bytes": nbytes,
             "samples": samples, "input": task["input"], "buckets": task["buckets"],
             "conditions": {n: dict(sorted(c.items())) for n, c in counts.items()},
             "attempts": attempts, "retries": attempts - 1,
             "seconds": {k: round(v, 3) for k, v in sorted(seconds.items())}}
    write_json(done, stats)  # the done-marker: last
    return stats
