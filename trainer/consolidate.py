"""Whole weights from a checkpoint, offline and without a process group: what ``tessera sample``, ``export`` and
``eval`` (and the fine-tuning base loader) read.

A training checkpoint holds every rank's slices (``trainer/shards.py``): consolidating one weight set (``raw``:
the fp32 master weights, ``ema``) fetches only that kind's byte ranges from every shard and assembles full
tensors, on any machine, whatever world size wrote them. A weight set may also be one whole safetensors file:
the merged model of a LoRA fine-tuning checkpoint (``model.safetensors``), or both files of a checkpoint written
by an earlier Tessera (``model.safetensors``, ``ema.safetensors``). A file, when present, is what is read.
"""

from __future__ import annotations

import hashlib

import torch

from tessera import storage
from tessera.trainer import checkpoint as C
from tessera.trainer.shards import ShardIndex

FILES = {"raw": "model.safetensors", "ema": "ema.safetensors"}
KIND = {"raw": "weight", "ema": "ema"}  # weight set -> the shards' tensor kind


def shard_index(url: str) -> ShardIndex | None:
    """The checkpoint's shard index, or None for a checkpoint without shards."""
    path = storage.join(url, "index.json")
    return ShardIndex(url, C.read_json(path)) if storage.exists(path) else None


def weight_sets(url: str) -> dict[str, str]:
    """The weight sets a checkpoint holds, ``raw`` first: variant -> its name, the file's name (e.g.
    ``model.safetensors``) when a whole file holds it, else the variant itself (assembled from the shards)."""
    index, out = None, {}
    for variant, file in FILES.items():
        if storage.exists(storage.join(url, file)):
            out[variant] = file
            continue
        index = index or shard_index(url)
        if index is not None and index.has(KIND[variant]):
            out[variant] = variant
    if "raw" not in out:
        raise FileNotFoundError(f"{url}: no weights (neither {FILES['raw']} nor an index.json of shards)")
    return out


def pick(url: str, use_ema: bool = True) -> str:
    """The weight set sampling reads: the EMA when asked for and present, else the raw weights."""
    sets = weight_sets(url)
    return sets["ema" if use_ema and "ema" in sets else "raw"]


def read_weights(url: str, name: str) -> dict[str, torch.Tensor]:
    """Full fp32 tensors (and ``buffer/<name>`` buffers) of weight set ``name`` (as ``weight_sets`` names it)."""
    if name.endswith(".safetensors"):
        return C.read_tensors(storage.join(url, name))
    index = shard_index(url)
    if index is None or name not in KIND:
        raise FileNotFoundError(f"{url}: no weight set {name!r}")
    out = index.full(KIND[name])
    out.update({f"buffer/{n}": t for n, t in index.buffer_tensors().items()})
    return out


def weights_sha256(url: str, name: str) -> str:
    """sha256 identifying a weight set: of the file's bytes, or of the assembled tensors (names and bytes, in name
    order) for a sharded one, so the same weights give the same digest whatever world size saved them."""
    h = hashlib.sha256()
    if name.endswith(".safetensors"):
        with storage.open_read(storage.join(url, name)) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    tensors = read_weights(url, name)
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}:{t.dtype}:{list(t.shape)}\n".encode())
        h.update(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
    return h.hexdigest()
