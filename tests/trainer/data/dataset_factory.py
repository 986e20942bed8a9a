"""Write small ``tessera-shards/1`` datasets (the CONTRACTS.md format) for loader tests and benchmarks."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save as save_safetensors

from tessera import storage

DEFAULT_BUCKETS = {"16x16": 0.5, "16x32": 0.3, "32x16": 0.2}


@dataclass
class DatasetInfo:
    """What was written: keys per shard, each key's bucket, and the manifest."""

    root: str
    shard_keys: list[list[str]]
    bucket_of: dict[str, str]
    manifest: dict
    captions: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        """All sample keys."""
        return [k for ks in self.shard_keys for k in ks]

    def shard_url(self, i: int) -> str:
        """The url of shard i."""
        return storage.join(self.root, self.manifest["shards"][i]["name"])


def _image_bytes(h: int, w: int, rng: np.random.Generator, fmt: str, smooth: bool = False) -> bytes:
    if smooth:  # photo-like: coarse noise upsampled, so JPEGs have realistic sizes (~10-30 KB at 256 px)
        small = rng.integers(0, 256, size=(max(h // 16, 1), max(w // 16, 1), 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))
    else:
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG" if fmt == "jpg" else fmt.upper(), quality=90)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
    tf.addfile(ti, io.BytesIO(data))


def write_dataset(root: str, *, shards: int = 4, per_shard: int = 24, buckets: dict[str, float] | None = None,
                  variants: dict[str, float] | None = None, missing_variant: dict[str, float] | None = None,
                  emb: dict[str, tuple[int, int]] | None = None, latent: dict[str, tuple[int, int, int]] | None = None,
                  fmt: str = "jpg", seed: int = 0, bad_image: set[str] = frozenset(),
                  no_caption: set[str] = frozenset(), blank_alt: set[str] = frozenset(),
                  smooth: bool = False, pad: int = 0) -> DatasetInfo:
    """Write ``shards`` tars of ``per_shard`` samples with random buckets, captions and optional caches.

    ``missing_variant[v]`` is the fraction of samples whose caption variant ``v`` is absent; ``emb`` maps
    an encoder id to (L, D) and ``latent`` an autoencoder id to (C, h, w) for precomputed members.
    Keys in ``bad_image`` get undecodable image bytes, keys in ``no_caption`` get no caption at all, keys in
    ``blank_alt`` an empty ``alt`` and ``KEY.txt`` (as an ingest with ``require_caption: false`` keeps an
    uncaptioned image; their other variants stay); the manifest still matches those shards (they are bad
    samples, not corrupt shards). ``pad`` adds a ``KEY.pad.bin`` member of that many zero bytes per sample, which
    the loader never reads (big shards at no decoding cost).
    """
    buckets = buckets or DEFAULT_BUCKETS
    variants = variants or {"alt": 1.0, "vlm_short": 1.0}
    missing_variant = missing_variant or {}
    rng = np.random.default_rng(seed)
    prng = random.Random(seed)
    names, weights = list(buckets), np.asarray(list(buckets.values()), float)
    entries, shard_keys, bucket_of, all_caps = [], [], {}, {}
    totals: dict[str, int] = {}
    for s in range(shards):
        buf = io.BytesIO()
        counts: dict[str, int] = {}
        keys = []
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(per_shard):
                key = f"s{s:03d}k{i:04d}"
                bucket = names[int(rng.choice(len(names), p=weights / weights.sum()))]
                h, w = (int(x) for x in bucket.split("x"))
                caps = {v: f"{v} caption of {key}" for v in variants if prng.random() >= missing_variant.get(v, 0.0)}
                if key in no_caption:
                    caps = {}
                if key in blank_alt:
                    caps["alt"] = ""
                meta = {"key": key, "source": "factory", "source_id": key, "path": f"/src/{key}.{fmt}",
                        "orig_size": [w * 2, h * 2], "bucket": bucket, "sha256": "", "phash": "",
                        "captions": caps, "scores": {}, "meta": {}}
                img = _image_bytes(h, w, rng, fmt, smooth)
                _add(tf, f"{key}.{fmt}", b"not an image" if key in bad_image else img)
                if key not in no_caption:
                    _add(tf, f"{key}.txt", b"" if key in blank_alt else f"primary caption of {key}".encode())
                _add(tf, f"{key}.json", json.dumps(meta).encode())
                for enc, (length, dim) in (emb or {}).items():
                    for v in (v for v, text in caps.items() if text):  # precompute embeds no blank caption
                        t = {"hidden": torch.randn(length, dim), "mask": torch.ones(length, dtype=torch.int8),
                             "pooled": torch.randn(dim)}
                        _add(tf, f"{key}.emb.{enc}.{v}.safetensors", save_safetensors(t))
                if pad:
                    _add(tf, f"{key}.pad.bin", bytes(pad))
                for ae, shape in (latent or {}).items():
                    _add(tf, f"{key}.latent.{ae}.safetensors", save_safetensors({"latent": torch.randn(*shape)}))
                counts[bucket] = counts.get(bucket, 0) + 1
                keys.append(key)
                bucket_of[key] = bucket
                all_caps[key] = caps
        data = buf.getvalue()
        name = f"shards/{s:05d}.tar"
        storage.write_bytes(storage.join(root, name), data)
        storage.write_bytes(storage.join(root, f"shards/{s:05d}.stats.json"), json.dumps({"samples": per_shard}).encode())
        entries.append({"name": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                        "samples": per_shard, "buckets": counts})
        for b, n in counts.items():
            totals[b] = totals.get(b, 0) + n
        shard_keys.append(keys)
    manifest = {"format": "tessera-shards/1", "tessera_version": "0.1.0", "created": "2024-01-01T00:00:00Z",
                "source_config_hash": "test", "config": {}, "shards": entries,
                "totals": {"input": shards * per_shard, "written": shards * per_shard, "rejected": 0},
                "reasons": {}, "buckets": totals, "lineage": {"source": None, "source_manifest_sha256": None},
                "caches": {"emb": [f"{e}.{v}" for e in (emb or {}) for v in variants], "latent": list(latent or {})}}
    storage.write_bytes(storage.join(root, "manifest.json"), json.dumps(manifest, indent=1).encode())
    return DatasetInfo(root=root, shard_keys=shard_keys, bucket_of=bucket_of, manifest=manifest, captions=all_caps)


def corrupt_shard(info: DatasetInfo, i: int) -> None:
    """Flip bytes in the middle of shard i (same size, so only the hash catches it)."""
    url = info.shard_url(i)
    data = bytearray(storage.read_bytes(url))
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(255 - b for b in data[mid:mid + 16])
    storage.write_bytes(url, bytes(data))
