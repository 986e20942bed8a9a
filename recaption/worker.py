"""The recaption worker: captioners loaded once, and the job that turns one source shard into one output shard.

:class:`ShardCaptioner` runs in-process (local executor) or as a Ray actor (one per GPU, or N on CPUs). A shard
is read in windows of ``window`` samples; within a window, samples are grouped by aspect bucket (sorted) and cut
into batches of ``batch_size``, so the batches, their seeds (job seed + captioner + first key + attempt) and hence
the output bytes depend only on the shard and the config, never on the actor count or the task order.

Each batch's CPU half (decode + processor, ``captioners.prepare_batch``) is submitted ``prefetch`` batches ahead,
so it overlaps with the model's ``generate`` in this process: as a Ray task on a CPU worker (so a GPU actor never
decodes), or in a thread of this process (the local executor, and actors on a CPU-only cluster).
Every caption is cleaned and checked (``filters``); a rejected caption of a stochastic captioner is generated
once more at ``retry_temperature``, then dropped (the sample keeps its other variants). Each sample's members
are written unchanged except ``KEY.json``, which gains ``captions[variant]`` and ``caption_meta[variant]``
(provenance and verdict). The tar is written atomically, then ``NNNNN.stats.json`` (the done-marker).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any, Iterator

from tessera import storage
from tessera.config import from_dict
from tessera.data_pipeline.precompute_config import SourceMismatch, attempts_dir, stats_url
from tessera.data_pipeline.precompute_worker import open_verified
from tessera.data_pipeline.shards import IMAGE_EXTS, TarShardWriter, read_json, write_json
from tessera.recaption.captioners import build_captioner, plain, prepare_batch
from tessera.recaption.config import RecaptionConfig
from tessera.recaption.filters import CaptionFilter
from tessera.tars import Sample, iter_samples


def batch_seed(seed: int, variant: str, key: str, attempt: int) -> int:
    """The seed of one generate call (31 bits: every engine accepts it)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{variant}:{key}:{attempt}".encode()).digest()[:4], "little") >> 1


def plan_batches(buckets: list[str], batch_size: int) -> list[list[int]]:
    """Indices of a window's samples grouped by bucket (sorted; window order within), cut into batches."""
    groups: dict[str, list[int]] = {}
    for i, b in enumerate(buckets):
        groups.setdefault(b, []).append(i)
    return [groups[b][j:j + batch_size] for b in sorted(groups) for j in range(0, len(groups[b]), batch_size)]


class _Prepare:
    """Submits the CPU half of batches: Ray tasks on CPU workers, or a local thread pool (same results)."""

    def __init__(self, cfg: RecaptionConfig, ray_tasks: bool) -> None:
        self._ray = None
        if ray_tasks:
            import ray

            self._ray = ray
            self._remote = ray.remote(num_cpus=cfg.prepare_cpus, max_retries=cfg.max_task_retries)(prepare_batch)
        else:
            self._pool = ThreadPoolExecutor(max_workers=cfg.prefetch)

    def submit(self, plain_cfg: dict, images: list[bytes]) -> Any:
        """Start one batch; returns a handle for ``result``."""
        if self._ray is not None:
            return self._remote.remote(plain_cfg, images)
        return self._pool.submit(prepare_batch, plain_cfg, images)

    def result(self, handle: Any) -> Any:
        """Wait for a batch's model inputs."""
        return self._ray.get(handle) if self._ray is not None else handle.result()


def _windows(samples: Iterator[Sample], n: int) -> Iterator[list[Sample]]:
    while window := list(islice(samples, n)):
        yield window


class ShardCaptioner:
    """The captioners and filter of one worker (loaded once) and the per-shard job; a Ray actor class too."""

    def __init__(self, plain_cfg: dict, worker: str = "local", threads: int | None = None, ray_tasks: bool = False):
        import torch

        self.cfg = cfg = from_dict(RecaptionConfig, plain_cfg, "recaption worker")
        storage.configure(cfg.storage)
        if threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.captioners = [build_captioner(c) for c in cfg.captioners]
        self.plain = [plain(c) for c in cfg.captioners]
        self.provenance = [c.provenance() for c in self.captioners]
        self.filter = CaptionFilter(cfg.filters)
        self.load_seconds = self._unreported_load = time.perf_counter() - t0
        self.worker = worker
        self.prep = _Prepare(cfg, ray_tasks)

    def process(self, task: dict) -> dict:
        """Source shard -> output shard (originals + new captions), then its stats (the done-marker); idempotent."""
        cfg, name = self.cfg, task["name"]
        done = stats_url(cfg.output, name)
        if storage.exists(done):
            return read_json(done)
        storage.write_bytes(storage.join(attempts_dir(cfg.output, name), uuid.uuid4().hex), b"")  # counts retries
        t0 = time.perf_counter()
        counts = {"variants": {c.variant: Counter() for c in cfg.captioners}, "seconds": Counter(),
                  "samples": Counter(bad_json=0, missing_image=0, images=0)}
        samples = 0
        with open_verified(storage.join(cfg.source, name), task["sha256"], name) as src, \
                storage.atomic_write(storage.join(cfg.output, name)) as f:
            writer = TarShardWriter(f)
            for window in _windows(iter_samples(src, name), cfg.window):
                for members in self._window(window, counts):
                    writer.add_sample(members)
                samples += len(window)
            if samples != task["samples"]:  # raised inside the atomic write: nothing is published
                raise SourceMismatch(f"source shard {name}: {samples} samples, its manifest says {task['samples']}")
            sha, nbytes = writer.close()
        stats = self._stats(task, counts, samples, sha, nbytes, time.perf_counter() - t0)
        write_json(done, stats)  # the done-marker: last
        return stats

    def _window(self, window: list[Sample], counts: dict) -> list[list[tuple[str, bytes]]]:
        """Caption one window of samples; returns each sample's members with its new ``KEY.json``."""
        records, images = [], []
        for s in window:
            try:
                records.append(json.loads(s.members["json"]))
            except (KeyError, ValueError):
                records.append(None)  # passed through unchanged, counted
                counts["samples"]["bad_json"] += 1
            ext = next((e for e in IMAGE_EXTS if e in s.members), None)
            images.append(None if ext is None else s.members[ext])
            if ext is None:
                counts["samples"]["missing_image"] += 1
        ok = [i for i, r in enumerate(records) if r is not None and images[i] is not None]
        counts["samples"]["images"] += len(ok)
        self._check_variants(window, records, ok)
        buckets = [str(records[i].get("bucket", "")) for i in ok]
        jobs = [(c, [ok[j] for j in batch]) for batch in plan_batches(buckets, self.cfg.batch_size)
                for c in range(len(self.captioners))]
        for c, idx, checked, gens, meta in self._run(jobs, window, records, images, counts):
            for i, chk, gen, m in zip(idx, checked, gens, meta):
                self._record(records[i], c, chk, gen, m, counts)
        out = []
        for s, r in zip(window, records):
            members = s.named()
            if r is not None:
                js = json.dumps(r, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
                members = [(n, js if n == f"{s.key}.json" else d) for n, d in members]
            out.append(members)
        return out

    def _check_variants(self, window: list[Sample], records: list, ok: list[int]) -> None:
        """A source caption of a variant this job writes is replaced only with ``overwrite: true``."""
        if self.cfg.overwrite:
            return
        for i in ok:
            have = set(records[i].get("captions") or {}) & {c.variant for c in self.cfg.captioners}
            if have:
                raise ValueError(f"sample {window[i].key} already has caption variant(s) {sorted(have)}; choose "
                                 "other variant names or set overwrite: true")

    def _alts(self, c: int, records: list, idx: list[int]) -> list[str]:
        src = getattr(self.captioners[c], "source_variant", None)
        return [str((records[i].get("captions") or {}).get(src) or "") if src else "" for i in idx]

    def _run(self, jobs: list, window: list[Sample], records: list, images: list, counts: dict) -> Iterator[tuple]:
        """Generate every job's batch, ``prefetch`` CPU halves ahead; yield (captioner, indices, checks, gens, meta)."""
        secs = counts["seconds"]
        submit = lambda c, idx: self.prep.submit(self.plain[c], [images[i] for i in idx])  # noqa: E731
        pending = deque(submit(c, idx) for c, idx in jobs[:self.cfg.prefetch])
        for n, (c, idx) in enumerate(jobs):
            t0 = time.perf_counter()
            prepared = self.prep.result(pending.popleft())
            if n + self.cfg.prefetch < len(jobs):
                pending.append(submit(*jobs[n + self.cfg.prefetch]))
            t1 = time.perf_counter()
            cap, key = self.captioners[c], window[idx[0]].key
            seed = batch_seed(self.cfg.seed, cap.cfg.variant, key, 0)
            gens = cap.generate(prepared, self._alts(c, records, idx), seed, None)
            t2 = time.perf_counter()
            checked = self.filter.check([g.text for g in gens], [g.finish_reason for g in gens])
            meta = [{"seed": seed, "attempts": 1} for _ in idx]
            secs["prepare_wait"] += t1 - t0
            secs["generate"] += t2 - t1
            secs["filter"] += time.perf_counter() - t2
            retry = [k for k, chk in enumerate(checked) if cap.stochastic and self.filter.rejects(chk.verdict)]
            if retry:
                self._retry(c, idx, retry, window, records, images, gens, checked, meta, counts)
            yield c, idx, checked, gens, meta

    def _retry(self, c: int, idx: list[int], retry: list[int], window: list[Sample], records: list, images: list,
               gens: list, checked: list, meta: list, counts: dict) -> None:
        """Generate the rejected captions of a batch once more at the retry temperature (in place)."""
        t0 = time.perf_counter()
        cap = self.captioners[c]
        sub = [idx[k] for k in retry]
        prepared = self.prep.result(self.prep.submit(self.plain[c], [images[i] for i in sub]))
        seed = batch_seed(self.cfg.seed, cap.cfg.variant, window[sub[0]].key, 1)
        again = cap.generate(prepared, self._alts(c, records, sub), seed, cap.cfg.hf.sampling.retry_temperature)
        rechecked = self.filter.check([g.text for g in again], [g.finish_reason for g in again])
        for k, g, chk in zip(retry, again, rechecked):
            meta[k] = {"seed": seed, "attempts": 2, "first_verdict": checked[k].verdict}
            gens[k], checked[k] = g, chk
        counts["seconds"]["retry"] += time.perf_counter() - t0

    def _record(self, record: dict, c: int, chk: Any, gen: Any, meta: dict, counts: dict) -> None:
        """Write one caption (if kept) and its provenance into the sample's JSON record; count it."""
        variant = self.cfg.captioners[c].variant
        kept = not self.filter.rejects(chk.verdict)
        if kept:
            record.setdefault("captions", {})[variant] = chk.text
        record.setdefault("caption_meta", {})[variant] = {
            **self.provenance[c], **meta, **gen.detail, "tokens": gen.tokens, "text_tokens": chk.text_tokens,
            "finish_reason": gen.finish_reason, "verdict": chk.verdict, "kept": kept,
            **({"stripped": chk.stripped} if chk.stripped else {})}
        v = counts["variants"][variant]
        v["written" if kept else "dropped"] += 1
        v[f"verdict_{chk.verdict}"] += 1
        v["retried"] += meta["attempts"] - 1
        v["recovered"] += int(meta["attempts"] > 1 and kept)
        v["generated_tokens"] += gen.tokens
        v["text_tokens"] += chk.text_tokens if kept else 0

    def _stats(self, task: dict, counts: dict, samples: int, sha: str, nbytes: int, total: float) -> dict:
        """A finished shard's stats: hashes, per-variant counts and verdicts, throughput, attempts, seconds."""
        secs = counts["seconds"]
        secs["total"] = total
        secs["load"], self._unreported_load = self._unreported_load, 0.0
        attempts = len(storage.list_prefix(attempts_dir(self.cfg.output, task["name"])))
        variants = {v: dict(sorted(c.items())) for v, c in counts["variants"].items()}
        captions = sum(c["written"] + c["dropped"] for c in counts["variants"].values())
        return {"shard": task["name"], "index": task["index"], "source_sha256": task["sha256"], "sha256": sha,
                "bytes": nbytes, "samples": samples, "input": task["input"], "buckets": task["buckets"],
                "worker": self.worker, "variants": variants, "captions": captions,
                "provenance": [{"variant": c.variant, **p} for c, p in zip(self.cfg.captioners, self.provenance)],
                "generated_tokens": sum(c["generated_tokens"] for c in counts["variants"].values()),
                **dict(sorted(counts["samples"].items())), "attempts": attempts, "retries": attempts - 1,
                "seconds": {k: round(v, 3) for k, v in sorted(secs.items())}}
