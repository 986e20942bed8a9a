"""Quickstart data split: a deterministic held-out set of real images + captions, and the training dataset.

Held-out samples are chosen by a hash of their key (``holdout_fraction`` of them, independent of shard
order), so the split is the same on every machine and every rerun. They are written as plain files:

    <holdout>/images/KEY.<ext>     the real image, exactly as ingested (already at its bucket size)
    <holdout>/index.jsonl          {"key", "caption", "bucket", "source", "file"} per held-out sample

and every other sample goes, with all its members unchanged, into ``<train>`` (a ``tessera-shards/1``
dataset with lineage back to the ingest), which precompute and the trainer read. The train manifest is
written last: it is the done-marker of the whole split.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tessera.data_pipeline.manifest import FORMAT
from tessera.data_pipeline.shards import IMAGE_EXTS, TarShardWriter, write_json
from tessera import __version__, storage
from tessera.tars import read_samples

log = logging.getLogger("tessera.quickstart")


@dataclass
class HeldOut:
    """One held-out real sample."""

    key: str
    caption: str
    bucket: str  # "HxW"
    source: str
    file: str  # path of the image file

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        h, w = self.bucket.split("x")
        return int(h), int(w)


def is_held_out(key: str, fraction: float, seed: int = 0) -> bool:
    """Deterministic Bernoulli(fraction) draw from the sample key."""
    h = hashlib.sha256(f"holdout:{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64 < fraction


def _split_shard(src_url: str, dst_url: str, images_dir: Path, fraction: float, seed: int) -> tuple[dict, list[dict]]:
    """Copy one shard's training samples to ``dst_url`` and its held-out samples to files."""
    held, buckets, n_train = [], Counter(), 0
    with storage.atomic_write(dst_url) as f:
        writer = TarShardWriter(f)
        for sample in read_samples(src_url):
            key, by_ext = sample.key, sample.members
            meta = json.loads(by_ext["json"])  # a JSON member, never a pickle
            if is_held_out(key, fraction, seed):
                ext = next(e for e in IMAGE_EXTS if e in by_ext)
                path = images_dir / f"{key}.{ext}"
                path.write_bytes(by_ext[ext])
                held.append({"key": key, "caption": by_ext["txt"].decode("utf-8"), "bucket": meta["bucket"],
                             "source": meta.get("source", ""), "file": str(path)})
                continue
            writer.add_sample(sample.named())
            buckets[meta["bucket"]] += 1
            n_train += 1
        sha, nbytes = writer.close()
    return {"sha256": sha, "bytes": nbytes, "samples": n_train, "input": n_train,
            "buckets": dict(sorted(buckets.items()))}, held


def split_dataset(source: str, train_out: str, holdout_dir: str, fraction: float, seed: int = 0) -> dict:
    """Split an ingested dataset into ``train_out`` (shards) and ``holdout_dir`` (files); returns a summary."""
    raw = storage.read_bytes(storage.join(source, "manifest.json"))
    src = json.loads(raw)
    images_dir = Path(holdout_dir) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    shards, held = [], []
    for s in src["shards"]:
        entry, h = _split_shard(storage.join(source, s["name"]), storage.join(train_out, s["name"]), images_dir,
                                fraction, seed)
        shards.append({"name": s["name"], **entry})
        held += h
    held.sort(key=lambda r: r["key"])
    with open(Path(holdout_dir) / "index.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in held)
    n_train = sum(s["samples"] for s in shards)
    buckets: Counter = Counter()
    for s in shards:
        buckets.update(s["buckets"])
    manifest = {
        "format": FORMAT, "tessera_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_config_hash": src.get("source_config_hash"), "output_config_hash": None,
        "config": {"split": {"holdout_fraction": fraction, "seed": seed, "holdout_dir": str(holdout_dir)}},
        "shards": shards,
        # Every sample of the source is either here (written) or held out (counted as a reason).
        "totals": {"input": src["totals"]["written"], "written": n_train, "rejected": len(held)},
        "reasons": {"held_out": len(held)}, "buckets": dict(sorted(buckets.items())), "retries": 0,
        "lineage": {"source": source, "source_manifest_sha256": hashlib.sha256(raw).hexdigest()},
        "caches": src.get("caches") or {"emb": [], "latent": []},
    }
    if n_train + len(held) != src["totals"]["written"]:
        raise RuntimeError(f"split lost samples: {n_train} train + {len(held)} held out != "
                           f"{src['totals']['written']} in {source}")
    write_json(storage.join(train_out, "manifest.json"), manifest)  # the done-marker: last
    log.info("split %s: %d train, %d held out", source, n_train, len(held))
    return {"train": n_train, "held_out": len(held), "buckets": manifest["buckets"]}


def load_holdout(holdout_dir: str) -> list[HeldOut]:
    """The held-out samples, sorted by key."""
    with open(Path(holdout_dir) / "index.jsonl", encoding="utf-8") as f:
        return [HeldOut(**json.loads(line)) for line in f if line.strip()]


def pick_prompts(held: list[HeldOut], n: int) -> list[HeldOut]:
    """``n`` square held-out samples for the sample grids: alternating emoji and clip art, by key order.

    Skin-tone variants are skipped when there are enough others: at 32 px they look alike, and a grid should
    show different subjects.
    """
    square = [h for h in held if h.hw[0] == h.hw[1]]
    distinct = [h for h in square if "skin tone" not in h.caption]
    square = distinct if len(distinct) >= n else square
    by_source: dict[str, list[HeldOut]] = {}
    for h in square:
        by_source.setdefault(h.source, []).append(h)
    # Spread the picks over each source's key order rather than its first few (keys are hashes: no bias).
    queues = [lst[:: max(1, len(lst) // n)] for _, lst in sorted(by_source.items())]
    picked: list[HeldOut] = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked
