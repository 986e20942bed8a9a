"""``tessera data inspect`` (what is in a dataset) and ``tessera data verify`` (is it intact)."""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import BinaryIO

from tessera.data_pipeline.manifest import load_manifest
from tessera.data_pipeline.shards import IMAGE_EXTS
from tessera import storage
from tessera.tars import TarReadError, iter_samples, read_samples


def _bar(n: int, top: int, width: int = 30) -> str:
    return "#" * max(1 if n else 0, round(width * n / max(top, 1)))


def sample_captions(out: str, shard_name: str, k: int) -> list[tuple[str, str]]:
    """The first ``k`` (key, caption) pairs of one shard."""
    samples = read_samples(storage.join(out, shard_name), keep=lambda ext: ext == "txt")
    captions = ((s.key, s.members["txt"].decode("utf-8", "replace")) for s in samples if "txt" in s.members)
    return list(islice(captions, k))


def inspect_dataset(out: str, n_captions: int = 5) -> str:
    """A human summary: totals, reject reasons, bucket histogram and a few captions."""
    m = load_manifest(out)
    t = m["totals"]
    lines = [
        f"dataset {out}  ({m['format']}, tessera {m['tessera_version']}, created {m['created']})",
        f"shards {len(m['shards'])}  bytes {sum(s['bytes'] for s in m['shards']):,}  retries {m.get('retries', 0)}",
        f"input {t['input']:,}  written {t['written']:,}  rejected {t['rejected']:,}"
        + (f"  ({100 * t['written'] / t['input']:.1f}% kept)" if t["input"] else ""),
        "",
        "rejected by reason:",
    ]
    reasons = sorted(m["reasons"].items(), key=lambda kv: (-kv[1], kv[0]))
    lines += [f"  {r:<24} {n:>8,}" for r, n in reasons] or ["  (none)"]
    lines += ["", "buckets (HxW):"]
    top = max(m["buckets"].values(), default=0)
    order = sorted(m["buckets"].items(), key=lambda kv: int(kv[0].split("x")[0]) / int(kv[0].split("x")[1]))
    lines += [f"  {b:>9} {n:>8,} {_bar(n, top)}" for b, n in order] or ["  (none)"]
    first = next((s for s in m["shards"] if s["samples"]), None)
    if first is not None and n_captions > 0:
        lines += ["", f"sample captions ({first['name']}):"]
        lines += [f"  {k}  {c[:100]!r}" for k, c in sample_captions(out, first["name"], n_captions)]
    return "\n".join(lines)


class _HashingReader:
    """Read-through wrapper computing sha256 and size of everything read."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        """Read, hash and count up to ``n`` bytes."""
        data = self.f.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        """Hash whatever the tar reader left unread (end-of-archive padding)."""
        while self.read(1 << 20):
            pass


def _check_sample(key: str, members: dict[str, bytes]) -> str | None:
    """None if the sample has image + txt + parseable json and a decodable image header."""
    images = [e for e in members if e in IMAGE_EXTS]
    missing = [e for e in ("txt", "json") if e not in members] + ([] if images else ["image"])
    if missing or len(images) > 1:
        return f"sample {key}: members {sorted(members)} (missing {missing}, images {images})"
    try:
        meta = json.loads(members["json"])
        members["txt"].decode("utf-8")
    except (ValueError, UnicodeDecodeError) as e:
        return f"sample {key}: bad json/txt: {e}"
    if meta.get("key") != key:
        return f"sample {key}: json key {meta.get('key')!r} differs"
    from PIL import Image

    try:
        w, h = Image.open(io.BytesIO(members[images[0]])).size
    except Exception as e:  # noqa: BLE001 - any decoder failure is a finding
        return f"sample {key}: image header does not decode: {type(e).__name__}: {e}"
    if meta.get("bucket") and meta["bucket"] != f"{h}x{w}":
        return f"sample {key}: image is {h}x{w} but bucket says {meta['bucket']}"
    return None


def verify_shard(out: str, entry: dict) -> list[str]:
    """Problems with one shard: hash/size mismatch, sample count, or any bad sample."""
    name, url = entry["name"], storage.join(out, entry["name"])
    if not storage.exists(url):
        return [f"{name}: missing"]
    problems, samples = [], {}
    with storage.open_read(url) as raw:
        f = _HashingReader(raw)
        try:
            for sample in iter_samples(f, name):
                if sample.key in samples:
                    problems.append(f"{name}: sample {sample.key}: members not adjacent (split in two)")
                samples.setdefault(sample.key, {}).update(sample.members)
        except TarReadError as e:
            problems.append(str(e))  # "<name>: unreadable tar: ..."
        except OSError as e:
            problems.append(f"{name}: unreadable tar: {type(e).__name__}: {e}")
        f.drain()
    if f.sha.hexdigest() != entry["sha256"] or f.bytes != entry["bytes"]:
        problems.append(f"{name}: sha256/size mismatch (manifest {entry['sha256'][:12]}.. {entry['bytes']} B, "
                        f"found {f.sha.hexdigest()[:12]}.. {f.bytes} B)")
    if len(samples) != entry["samples"]:
        problems.append(f"{name}: {len(samples)} samples, manifest says {entry['samples']}")
    bad = [p for p in (_check_sample(k, m) for k, m in samples.items()) if p]
    problems += [f"{name}: {p}" for p in bad[:5]] + ([f"{name}: ... {len(bad) - 5} more"] if len(bad) > 5 else [])
    return problems


def verify_dataset(out: str, threads: int = 8) -> tuple[list[str], dict]:
    """Re-hash and re-read every shard of the manifest; return (problems, summary counts)."""
    m = load_manifest(out)
    with ThreadPoolExecutor(threads) as pool:
        problems = [p for ps in pool.map(lambda e: verify_shard(out, e), m["shards"]) for p in ps]
    listed = {s["name"] for s in m["shards"]}
    base = storage.join(out, "shards")
    for url in storage.list_prefix(base):
        name = "shards/" + url[len(base):].lstrip("/")
        if name.endswith(".tar") and name not in listed:
            problems.append(f"{name}: present but not in the manifest")
    summary = {"shards": len(m["shards"]), "samples": sum(s["samples"] for s in m["shards"])}
    return problems, summary
