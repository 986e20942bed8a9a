"""Reading ``tessera-shards/1`` datasets: the manifest catalog, verified shard access, slot resolution.

A shard is verified (streamed sha256 against the manifest) when a worker first opens it, before any of
its samples is used; a corrupt shard is remembered and all of its slots become counted holes. A verified
shard is indexed once (member offsets, keys per bucket from the ``.json`` members); local shards are then
read by offset (``os.pread``), S3 shards are downloaded whole to memory (needed for the hash anyway) and
kept in a small LRU.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from tessera import storage
from tessera.tars import TarReadError, index_members
from tessera.trainer.data.plan import seed_int, shuffle_buffer

log = logging.getLogger("tessera.data")

FORMAT = "tessera-shards/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_CHUNK = 1 << 20
_MAX_INDEXES = 256  # shard indexes cached per process (a re-index re-reads tar headers, not the hash)


@dataclass
class Catalog:
    """All shards of one or more datasets, with per-bucket sample counts from the manifests."""

    urls: list[str]  # shard urls, in manifest order, datasets concatenated
    names: list[str]  # "<dataset index>:<shard name>", stable ids for state and stats
    sha256: list[str]
    nbytes: list[int]
    buckets: list[str]  # sorted bucket names "HxW"
    counts: np.ndarray  # (S, K) int64
    fingerprint: str  # sha256 over shard names + hashes: a state only loads into the same data

    @classmethod
    def load(cls, paths: list[str]) -> Catalog:
        """Read each dataset's manifest.json (local dir or s3:// prefix)."""
        entries = []
        for d, root in enumerate(paths):
            manifest = json.loads(storage.read_text(storage.join(root, "manifest.json")))
            if manifest.get("format") != FORMAT:
                raise ValueError(f"{root}: manifest format {manifest.get('format')!r}, expected {FORMAT!r}")
            for sh in manifest["shards"]:
                entries.append((storage.join(root, sh["name"]), f"{d}:{sh['name']}", sh))
        if not entries:
            raise ValueError(f"no shards in {paths}")
        buckets = sorted({b for _, _, sh in entries for b in sh["buckets"]})
        col = {b: i for i, b in enumerate(buckets)}
        counts = np.zeros((len(entries), len(buckets)), np.int64)
        for i, (_, _, sh) in enumerate(entries):
            for b, n in sh["buckets"].items():
                counts[i, col[b]] = n
        fp = hashlib.sha256("\n".join(f"{n} {sh['sha256']}" for _, n, sh in entries).encode()).hexdigest()
        return cls(urls=[u for u, _, _ in entries], names=[n for _, n, _ in entries],
                   sha256=[sh["sha256"] for _, _, sh in entries], nbytes=[int(sh["bytes"]) for _, _, sh in entries],
                   buckets=buckets, counts=counts, fingerprint=fp)


@dataclass
class ShardIndex:
    """One verified shard: member locations and its keys per bucket in tar order."""

    members: dict[str, dict[str, tuple[int, int]]]  # key -> ext -> (offset, size)
    by_bucket: dict[str, list[str]]
    data: bytes | None  # S3 shards live in memory; local shards are read by offset
    path: str | None
    bad_json: int = 0  # unparsable .json members; their slots surface as "missing_from_shard" holes


class CorruptShard(Exception):
    """The shard's bytes do not match the manifest (or it cannot be read as a tar)."""


def _hash_local(path: str) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _index_tar(fileobj: io.IOBase, name: str, read_at, strict: bool) -> tuple[dict, dict, int]:
    """Member offsets of a seekable tar (webdataset keys, tessera.tars), and keys per bucket from the .json members."""
    members = index_members(fileobj, name, strict=strict)
    by_bucket: dict[str, list[str]] = {}
    bad = 0
    for key, exts in members.items():
        if "json" not in exts:
            continue
        try:
            bucket = json.loads(read_at(*exts["json"]))["bucket"]
        except (ValueError, KeyError, TypeError):
            bad += 1  # unplaceable: its slot becomes a counted hole
            continue
        by_bucket.setdefault(bucket, []).append(key)
    return members, by_bucket, bad


@dataclass
class ShardReader:
    """Per-process shard access with verification, indexing and small caches."""

    catalog: Catalog
    verify: str  # "first_open" | "always" | "never"
    seed: int
    shuffle_size: int
    s3_cache_shards: int = 4
    verified: dict[int, bool] = field(default_factory=dict)  # shard -> ok (first_open memo)
    _index: OrderedDict = field(default_factory=OrderedDict)
    _order: OrderedDict = field(default_factory=OrderedDict)
    _fds: OrderedDict = field(default_factory=OrderedDict)
    new_corrupt: list[str] = field(default_factory=list)  # names found corrupt since last drain

    def new_epoch(self) -> None:
        """With verify="always", every epoch re-hashes each shard on first use."""
        if self.verify == "always":
            self.verified.clear()
            self._index.clear()

    def _check(self, s: int, digest: str, n: int) -> None:
        ok = digest == self.catalog.sha256[s] and n == self.catalog.nbytes[s]
        if not ok:
            raise CorruptShard(f"{self.catalog.names[s]}: sha256/bytes mismatch with the manifest")

    def _open(self, s: int) -> ShardIndex:
        url, name = self.catalog.urls[s], self.catalog.names[s]
        must_hash = self.verify != "never" and s not in self.verified
        # verify="never" reads a shard as far as tarfile can, damaged headers included (only a hash checks bytes).
        strict = self.verify != "never"
        if storage.is_s3(url):
            data = storage.read_bytes(url)
            if must_hash:
                self._check(s, hashlib.sha256(data).hexdigest(), len(data))
            members, by_bucket, bad = _index_tar(io.BytesIO(data), name, lambda o, n: data[o:o + n], strict)
            return ShardIndex(members=members, by_bucket=by_bucket, data=data, path=None, bad_json=bad)
        path = str(storage.local_path(url))
        if must_hash:
            self._check(s, *_hash_local(path))
        fd = self._fd(path)
        with open(path, "rb") as f:
            members, by_bucket, bad = _index_tar(f, name, lambda o, n: os.pread(fd, n, o), strict)
        return ShardIndex(members=members, by_bucket=by_bucket, data=None, path=path, bad_json=bad)

    def index(self, s: int) -> ShardIndex | None:
        """The shard's index, or None if it is corrupt (reported once per process in new_corrupt)."""
        if self.verified.get(s) is False:
            return None
        if s in self._index:
            self._index.move_to_end(s)
            return self._index[s]
        try:
            idx = self._open(s)
        except (CorruptShard, TarReadError, OSError) as e:
            log.warning("skipping corrupt shard %s: %s", self.catalog.names[s], e)
            self.verified[s] = False
            self.new_corrupt.append(self.catalog.names[s])
            return None
        self.verified[s] = True
        self._index[s] = idx
        # S3 indexes hold the shard bytes, so keep only a few; local ones are small but not free.
        in_memory = [k for k, v in self._index.items() if v.data is not None]
        if len(in_memory) > self.s3_cache_shards:
            self._index.pop(in_memory[0])
        if len(self._index) > _MAX_INDEXES:
            self._index.popitem(last=False)
        return idx

    def _fd(self, path: str) -> int:
        if path in self._fds:
            self._fds.move_to_end(path)
            return self._fds[path]
        fd = os.open(path, os.O_RDONLY)
        self._fds[path] = fd
        if len(self._fds) > 64:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def read(self, idx: ShardIndex, key: str, ext: str) -> bytes:
        """The bytes of member KEY.ext."""
        off, n = idx.members[key][ext]
        if idx.data is not None:
            return idx.data[off:off + n]
        return os.pread(self._fd(idx.path), n, off)

    def resolve(self, slot: np.ndarray, bucket_name: str) -> tuple[ShardIndex | None, str | None, str]:
        """(index, key, reason): the sample of slot (order_epoch, shard, bucket, j), or a hole reason."""
        oe, s, _, j = (int(x) for x in slot)
        idx = self.index(s)
        if idx is None:
            return None, None, "corrupt_shard"
        ck = (s, oe, bucket_name)
        order = self._order.get(ck)
        if order is None:
            keys = idx.by_bucket.get(bucket_name, [])
            order = shuffle_buffer(keys, self.shuffle_size, seed_int("samples", self.seed, oe, s, bucket_name))
            self._order[ck] = order
            if len(self._order) > 4096:
                self._order.popitem(last=False)
        if j >= len(order):
            return idx, None, "missing_from_shard"
        return idx, order[j], ""

    def close(self) -> None:
        """Close cached file descriptors."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
