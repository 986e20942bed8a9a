"""The precompute worker: frozen encoders loaded once, and the job that turns one source shard into one output shard.

:class:`ShardEncoder` runs in-process (local executor) or as a Ray actor (``precompute._map_ray``). Its
``process(task)`` is idempotent: the output tar is written atomically, then ``NNNNN.stats.json`` (the
done-marker), so a retried or rerun task that finds the marker returns it.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from collections import Counter
from itertools import islice
from typing import Any, BinaryIO, Iterable, Iterator

from tessera import storage
from tessera.trainer.components import empty_url
from tessera.config import config_hash, from_dict, to_dict
from tessera.data_pipeline.precompute_config import PrecomputeConfig, SourceMismatch, attempts_dir, stats_url
from tessera.data_pipeline.shards import IMAGE_EXTS, TarShardWriter, read_json, write_json
from tessera.tars import Sample, iter_samples
from tessera.trainer.autoencoders.configs import AutoencoderConfig
from tessera.trainer.text_encoders.configs import TextEncoderConfig


def _batched(it: Iterable, n: int) -> Iterator[list]:
    it = iter(it)
    while batch := list(islice(it, n)):
        yield batch


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


def _new_counts() -> dict[str, Any]:
    return {"missing_caption": Counter(), "failed_latent": Counter(), "bad_json": 0, "emb": Counter(),
            "latent": Counter(), "seconds": Counter()}


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

    def _chunk(self, chunk: list[Sample], counts: dict, declared: list[str]) -> list[list[tuple[str, bytes]]]:
        """One chunk of samples -> their new cache members (emb in variant order, then latent).

        With ``variants: []`` each sample's own variants are embedded, plus ``declared`` ones (the source
        manifest's ``caption_variants``) counted as missing where a sample lacks them.
        """
        keys = [s.key for s in chunk]
        items, images = [], []
        for i, sample in enumerate(chunk):
            by_ext = sample.members
            try:
                captions = json.loads(by_ext["json"]).get("captions") or {}
            except (KeyError, ValueError, AttributeError):
                captions = {}
                counts["bad_json"] += 1
            for v in self.cfg.variants or sorted(set(captions) | set(declared)):
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

    def write_empty(self) -> None:
        """``empty.<text encoder id>.safetensors`` at the output's root: the empty prompt's embedding (full length,
        unpadded mask), the unconditional input of classifier-free guidance, so a training run on this dataset
        never loads the text encoder just for it. Every worker may write it: the same bytes, written atomically."""
        import torch
        from safetensors.torch import save

        url = empty_url(self.cfg.output, self.text.id)
        if storage.exists(url):
            return
        emb = self.text.empty_embedding()
        t = {"hidden": emb.hidden[:1].float().cpu().contiguous(), "mask": emb.mask[:1].to(torch.int8).cpu()}
        if emb.pooled is not None:
            t["pooled"] = emb.pooled[:1].float().cpu().contiguous()
        storage.write_bytes(url, save(t))

    def process(self, task: dict) -> dict:
        """Source shard -> output shard (originals + caches), then its stats (the done-marker); idempotent."""
        cfg, name = self.cfg, task["name"]
        done = stats_url(cfg.output, name)
        self.write_empty()
        if storage.exists(done):
            return read_json(done)
        # One marker per attempt (a Ray retry after an actor died, or a rerun), so retries are counted.
        storage.write_bytes(storage.join(attempts_dir(cfg.output, name), uuid.uuid4().hex), b"")
        t0 = time.perf_counter()
        counts, samples = _new_counts(), 0
        with open_verified(storage.join(cfg.source, name), task["sha256"], name) as src, \
                storage.atomic_write(storage.join(cfg.output, name)) as f:
            counts["seconds"]["verify"] = time.perf_counter() - t0
            writer = TarShardWriter(f)
            for chunk in _batched(iter_samples(src, name), cfg.batch_size):
                for sample, new in zip(chunk, self._chunk(chunk, counts, task.get("variants", []))):
                    replaced = {n for n, _ in new}
                    writer.add_sample([m for m in sample.named() if m[0] not in replaced] + new)
                    for n, _ in new:
                        _, kind, cache = n.removesuffix(".safetensors").split(".", 2)  # KEY.emb.<id>.<variant>
                        counts[kind][cache] += 1
                samples += len(chunk)
            if samples != task["samples"]:  # raised inside the atomic write: nothing is published
                raise SourceMismatch(f"source shard {name}: {samples} samples, its manifest says {task['samples']}")
            sha, nbytes = writer.close()
        stats = self._stats(task, counts, samples, sha, nbytes, time.perf_counter() - t0)
        write_json(done, stats)  # the done-marker: last
        return stats

    def _stats(self, task: dict, counts: dict, samples: int, sha: str, nbytes: int, total: float) -> dict:
        """A finished shard's stats: hashes, cache member counts, failures, attempts and seconds per stage."""
        secs = counts["seconds"]
        secs["total"] = total
        secs["io"] = total - secs["text"] - secs["latent"]
        secs["load"], self._unreported_load = self._unreported_load, 0.0
        attempts = len(storage.list_prefix(attempts_dir(self.cfg.output, task["name"])))
        return {"shard": task["name"], "index": task["index"], "source_sha256": task["sha256"], "sha256": sha,
                "bytes": nbytes, "samples": samples, "input": task["input"], "buckets": task["buckets"], **self.ids(),
                **{k: dict(sorted(counts[k].items())) for k in ("emb", "latent", "missing_caption", "failed_latent")},
                "bad_json": counts["bad_json"], "attempts": attempts, "retries": attempts - 1,
                "seconds": {k: round(v, 3) for k, v in sorted(secs.items())}}
