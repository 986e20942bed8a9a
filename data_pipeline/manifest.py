"""``DIR/manifest.json`` (format ``tessera-shards/1``, docs/CONTRACTS.md) and the accounting invariant.

Invariant: every input of a shard is exactly one of written or rejected(reason); the totals are the
sums over shards. A violation is an error, never a warning.
"""

from __future__ import annotations

import datetime
from collections import Counter
from typing import Any

from tessera import __version__, storage
from tessera.config import config_hash, to_dict

FORMAT = "tessera-shards/1"


def derived_manifest(cfg: Any, src: dict, src_sha: str, fp: str, stats: list[dict], wall: float
                     ) -> tuple[dict, Counter, int]:
    """The shared head of a derived dataset's manifest (recaption, condition): the source's sample accounting
    carried over unchanged, the new shards' hashes, retries, timing and lineage; plus the summed stage seconds and
    the sample count, for the caller's own section."""
    shards = [{"name": s["shard"], "sha256": s["sha256"], "bytes": s["bytes"], "samples": s["samples"],
               "input": s["input"], "buckets": s["buckets"]} for s in stats]
    stage: Counter = Counter()
    for s in stats:
        stage.update(s["seconds"])
    samples = sum(s["samples"] for s in stats)
    head = {
        "format": FORMAT, "tessera_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_config_hash": src.get("source_config_hash"), "output_config_hash": fp, "job_fingerprint": fp,
        "config": to_dict(cfg), "shards": shards,
        # Samples are the source's, unchanged: its accounting (and any caches and captions it carries) carries over.
        "totals": src["totals"], "reasons": src.get("reasons", {}), "buckets": src.get("buckets", {}),
        "retries": sum(s["retries"] for s in stats),
        "timing": {"wall_seconds": round(wall, 3), "task_seconds": round(stage["total"], 3),
                   "samples_per_s": round(samples / max(wall, 1e-9), 2)},
        "lineage": {"source": cfg.source, "source_manifest_sha256": src_sha},
        "caches": src.get("caches") or {"emb": [], "latent": []},
    }
    return head, stage, samples


class AccountingError(RuntimeError):
    """Some input was neither written nor rejected, or was counted twice."""


def output_config_hash(cfg: Any) -> str:
    """Hash of the config fields that change shard bytes (not executor, Ray or storage settings)."""
    keys = ("sources", "process", "samples_per_shard", "dedup", "seed")
    return config_hash({k: to_dict(getattr(cfg, k)) for k in keys})


def check_shard_accounting(index: int, n_input: int, written: list[int], rejected: list[int], staged: int) -> None:
    """Raise unless positions 0..n_input-1 are each written or rejected exactly once."""
    seen = sorted(written + rejected)
    if seen != list(range(n_input)):
        missing = sorted(set(range(n_input)) - set(seen))[:10]
        twice = sorted(p for p, c in Counter(seen).items() if c > 1)[:10]
        raise AccountingError(
            f"shard {index:05d}: {n_input} inputs but {len(written)} written + {len(rejected)} rejected "
            f"(missing positions {missing}, counted twice {twice}, staged {staged})"
        )


def _add(into: dict[str, int], counts: dict[str, int]) -> None:
    for k, v in counts.items():
        into[k] = into.get(k, 0) + int(v)


def build_manifest(cfg: Any, stats: list[dict], wall_seconds: float) -> dict:
    """Assemble the manifest from every shard's stats, checking the accounting invariant again."""
    shards, reasons, buckets = [], {}, {}
    totals = {"input": 0, "written": 0, "rejected": 0}
    retries = 0
    for s in sorted(stats, key=lambda s: s["index"]):
        if s["input"] != s["written"] + s["rejected"] or s["rejected"] != sum(s["reasons"].values()):
            raise AccountingError(f"{s['shard']}: input {s['input']} != written {s['written']} + rejected "
                                  f"{s['rejected']} (reasons sum {sum(s['reasons'].values())})")
        shards.append({"name": s["shard"], "sha256": s["sha256"], "bytes": s["bytes"], "samples": s["written"],
                       "input": s["input"], "buckets": s["buckets"]})
        _add(totals, {k: s[k] for k in totals})
        _add(reasons, s["reasons"])
        _add(buckets, s["buckets"])
        retries += s.get("retries", 0)
    if totals["input"] != totals["written"] + totals["rejected"]:
        raise AccountingError(f"totals do not add up: {totals}")
    stage_s = sum(s["seconds"]["stage"] for s in stats)
    return {
        "format": FORMAT,
        "tessera_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_config_hash": config_hash(to_dict(cfg.sources)),
        "output_config_hash": output_config_hash(cfg),
        "config": to_dict(cfg),
        "shards": shards,
        "totals": totals,
        "reasons": dict(sorted(reasons.items())),
        "buckets": dict(sorted(buckets.items())),
        # Written with an empty alt (process.require_caption: false), for `tessera data recaption` to caption.
        "kept_without_caption": sum(s.get("kept_without_caption", 0) for s in stats),
        "retries": retries,
        "timing": {"wall_seconds": round(wall_seconds, 3), "task_seconds": round(stage_s, 3),
                   "samples_per_s": round(totals["input"] / max(wall_seconds, 1e-9), 2)},
        "lineage": {"source": None, "source_manifest_sha256": None},
        "caches": {"emb": [], "latent": []},
    }


def load_manifest(out: str) -> dict:
    """Read ``DIR/manifest.json``; a missing one means the ingest never finished."""
    import json

    url = storage.join(out, "manifest.json")
    if not storage.exists(url):
        raise FileNotFoundError(f"no manifest.json under {out}: the ingest did not finish (rerun it to resume)")
    return json.loads(storage.read_bytes(url))
