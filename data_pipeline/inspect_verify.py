"""``tessera data inspect`` (what is in a dataset) and ``tessera data verify`` (is it intact).

Inspect also shows every caption variant (``alt``, ``name``, and what ``tessera data recaption`` added): its
count, its length in a text encoder's tokens, the recaption filter verdicts, and examples next to ``alt``.
``token_counter`` is the one way the data tools measure a caption in tokens (the recaption filters use it too).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import BinaryIO, Callable

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


def inspect_dataset(out: str, n_captions: int = 5, scan: int = 2000, tokenizer: str | None = None) -> str:
    """A human summary: totals, reject reasons, bucket histogram, a few captions, and per caption variant its
    count, length in tokens and filter verdicts over the first ``scan`` samples, with examples next to ``alt``."""
    m = load_manifest(out)
    t = m["totals"]
    lines = [
        f"dataset {out}  ({m['format']}, tessera {m['tessera_version']}, created {m['created']})",
        f"shards {len(m['shards'])}  bytes {sum(s['bytes'] for s in m['shards']):,}  retries {m.get('retries', 0)}",
        f"input {t['input']:,}  written {t['written']:,}  rejected {t['rejected']:,}"
        + (f"  ({100 * t['written'] / t['input']:.1f}% kept)" if t["input"] else "")
        + (f"  kept without caption {m['kept_without_caption']:,} (empty alt, for `tessera data recaption`)"
           if m.get("kept_without_caption") else ""),
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
    if scan > 0:
        lines += variant_report(out, m, scan, tokenizer, n_captions)
    return "\n".join(lines)


# --------------------------------------------------------------------------- caption variants


def token_counter(path: str) -> Callable[[list[str]], list[int]]:
    """Caption lengths in a text encoder's tokens, special tokens excluded; ``path`` as encoder configs name it
    (``minilm``, a local directory or a hub id). A local ``tokenizer.json`` is read with ``tokenizers`` (fast to
    import, no padding or truncation: lengths are measured in full); anything else through ``AutoTokenizer``."""
    from tessera.trainer.text_encoders.runtime import resolve_path

    local = Path(resolve_path(path))
    if (local / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(local / "tokenizer.json"))
        tok.no_padding()
        tok.no_truncation()
        return lambda texts: [len(e.ids) for e in tok.encode_batch(list(texts), add_special_tokens=False)]
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(str(local) if local.exists() else path)
    return lambda texts: [len(ids) for ids in hf(list(texts), add_special_tokens=False)["input_ids"]] if texts else []


def _scan_json(out: str, m: dict, limit: int) -> list[dict]:
    """The ``KEY.json`` records of the first ``limit`` samples, in manifest order (unparseable ones left out)."""
    records: list[dict] = []
    for entry in m["shards"]:
        if len(records) >= limit:
            break
        for s in read_samples(storage.join(out, entry["name"]), keep=lambda ext: ext == "json"):
            try:
                records.append(json.loads(s.members["json"]))
            except (KeyError, ValueError):
                continue
            if len(records) >= limit:
                break
    return records


def _lengths_fn(m: dict, tokenizer: str | None) -> tuple[Callable[[list[str]], list[int]], str]:
    """(counter, unit): the recaption filters' tokenizer (else MiniLM's), or words when it cannot be loaded."""
    name = tokenizer or ((m.get("recaption") or {}).get("filters") or {}).get("tokenizer") or "minilm"
    try:
        return token_counter(name), f"{name} tokens"
    except (OSError, ImportError, ValueError) as e:
        logging.getLogger("tessera.data").warning("inspect: tokenizer %s unavailable (%s); counting words", name, e)
        return (lambda texts: [len(t.split()) for t in texts]), "words"


def _pct(sorted_vals: list[int], q: float) -> int:
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))] if sorted_vals else 0


def variant_report(out: str, m: dict, scan: int, tokenizer: str | None, n_examples: int) -> list[str]:
    """Per caption variant: count, empty, length in tokens (mean, p50, p90, max), verdicts; then examples."""
    records = _scan_json(out, m, scan)
    texts: dict[str, list[str]] = {}
    empty, verdicts, dropped = Counter(), {}, Counter()
    for r in records:
        for v, t in (r.get("captions") or {}).items():
            if isinstance(t, str) and t.strip():
                texts.setdefault(v, []).append(t)
            else:
                texts.setdefault(v, [])
                empty[v] += 1
        for v, meta in (r.get("caption_meta") or {}).items():
            verdicts.setdefault(v, Counter())[meta.get("verdict", "?")] += 1
            texts.setdefault(v, [])
            dropped[v] += 0 if meta.get("kept", True) else 1
    count, unit = _lengths_fn(m, tokenizer)
    total = m["totals"].get("written", 0)
    lines = ["", f"caption variants ({len(records):,} of {total:,} samples scanned; lengths in {unit}):",
             f"  {'variant':<14} {'count':>7} {'empty':>6} {'mean':>6} {'p50':>5} {'p90':>5} {'max':>5}  verdicts"]
    for v in sorted(texts, key=lambda v: (v != "alt", v)):
        n = sorted(count(texts[v])) if texts[v] else []
        mean = sum(n) / len(n) if n else 0.0
        ver = ", ".join(f"{k} {c:,}" for k, c in sorted(verdicts.get(v, {}).items(), key=lambda kv: (-kv[1], kv[0])))
        ver += f"; dropped {dropped[v]:,}" if dropped[v] else ""
        lines.append(f"  {v:<14} {len(texts[v]):>7,} {empty[v]:>6,} {mean:>6.1f} {_pct(n, 0.5):>5} {_pct(n, 0.9):>5} "
                     f"{(n[-1] if n else 0):>5}  {ver}".rstrip())
    lines += _examples(records, n_examples)
    return lines


def _examples(records: list[dict], k: int) -> list[str]:
    """A few samples' variants under their ``alt``, preferring samples that have more than ``alt``."""
    rich = [r for r in records if len(r.get("captions") or {}) > 1] or records
    if not rich or k <= 0:
        return []
    lines = ["", "examples (each variant next to alt):"]
    for r in rich[:k]:
        caps = r.get("captions") or {}
        for i, v in enumerate(sorted(caps, key=lambda v: (v != "alt", v))):
            lines.append(f"  {(r.get('key', '?') if i == 0 else ''):<24} {v:<12} {str(caps[v])[:100]!r}")
    return lines


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
