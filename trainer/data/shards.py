"""Reading ``tessera-shards/1`` datasets: the manifest catalog, and a reader's verified, streamed shard access.

Local shards are read in place; S3 shards come through the node's shard cache (``cache.py``), downloaded once per
node, ahead of use by a prefetch thread. Either way a shard is indexed once (member offsets from the tar headers,
keys per bucket from the ``.json`` members) and each member is read with ``os.pread`` when a batch needs it: no
process holds a shard in memory, so a worker's memory does not grow with shard size.

A shard that cannot be used (missing, cut off, corrupt: sha256 checked before any of its samples is used) is
remembered and all of its slots become counted holes, with the shard named in the stats.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from tessera import storage
from tessera.tars import TarReadError, index_members
from tessera.trainer.data.cache import CacheFull, Handle, ShardCache, ShardUnavailable, hash_file
from tessera.trainer.data.plan import seed_int, shuffle_buffer

log = logging.getLogger("tessera.data")

FORMAT = "tessera-shards/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


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
    """One verified shard, open: member locations and its keys per bucket in tar order."""

    members: dict[str, dict[str, tuple[int, int]]]  # key -> ext -> (offset, size)
    by_bucket: dict[str, list[str]]
    fd: int
    handle: Handle | None  # the cache's lock on it (S3 shards); None for local shards
    bad_json: int = 0  # unparsable .json members; their slots surface as "missing_from_shard" holes


def _index_tar(fd: int, name: str, strict: bool) -> tuple[dict, dict, int]:
    """Member offsets of a tar (webdataset keys, tessera.tars), and keys per bucket from the .json members."""
    with open(fd, "rb", closefd=False) as f:
        members = index_members(f, name, strict=strict)
    by_bucket: dict[str, list[str]] = {}
    bad = 0
    for key, exts in members.items():
        if "json" not in exts:
            continue
        try:
            off, n = exts["json"]
            bucket = json.loads(os.pread(fd, n, off))["bucket"]
        except (ValueError, KeyError, TypeError):
            bad += 1  # unplaceable: its slot becomes a counted hole
            continue
        by_bucket.setdefault(bucket, []).append(key)
    return members, by_bucket, bad


class ShardReader:
    """One reader's shard access: verification, indexes of the shards in use, a prefetch thread (S3)."""

    def __init__(self, catalog: Catalog, *, verify: str, seed: int, shuffle_size: int, cache: ShardCache | None,
                 keep_open: int = 2) -> None:
        self.catalog, self.verify, self.seed, self.shuffle_size = catalog, verify, seed, shuffle_size
        self.cache, self.keep_open = cache, keep_open
        self.verified: dict[int, bool] = {}  # shard -> ok (per process, local shards and verify="always")
        self.bad: dict[int, str] = {}  # shard -> hole reason
        self.new_bad: list[tuple[str, str]] = []  # (name, reason) found since the last drain
        self._index: OrderedDict[int, ShardIndex] = OrderedDict()
        self._order: OrderedDict = OrderedDict()
        self._ready: dict[int, Handle | BaseException] = {}  # prefetched shards, handed to index()
        self._wanted: set[int] = set()
        self._cv = threading.Condition()
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = False

    def new_epoch(self) -> None:
        """With verify="always", every epoch re-hashes each shard on first use."""
        if self.verify == "always":
            self.verified.clear()
            for s in list(self._index):
                self._drop(s)

    # ---------------------------------------------------------------- prefetch (S3)

    def prefetch(self, shards: list[int]) -> None:
        """Download these shards into the node cache ahead of use, in order, on a background thread."""
        if self.cache is None:
            return
        for s in shards:
            with self._cv:
                if s in self._wanted or s in self._index or s in self.bad:
                    continue
                self._wanted.add(s)
            self._queue.put(s)
        if self._thread is None and not self._queue.empty():
            self._thread = threading.Thread(target=self._prefetch_loop, name="shard-prefetch", daemon=True)
            self._thread.start()

    def _prefetch_loop(self) -> None:
        while (s := self._queue.get()) is not None and not self._stop:
            try:
                got: Handle | BaseException = self._acquire(s)
            except BaseException as e:  # handed to the consumer, which counts or raises it
                got = e
            with self._cv:
                self._ready[s] = got
                self._cv.notify_all()

    def _acquire(self, s: int) -> Handle:
        assert self.cache is not None
        return self.cache.acquire(self.catalog.urls[s], self.catalog.sha256[s], self.catalog.nbytes[s],
                                  self.catalog.names[s], hashed=self.verify == "first_open")

    def _take(self, s: int) -> Handle:
        """The shard's cache handle: from the prefetcher if it was asked for, else fetched now."""
        with self._cv:
            if s in self._wanted:
                self._cv.wait_for(lambda: s in self._ready)
                self._wanted.discard(s)
                got = self._ready.pop(s)
                if isinstance(got, BaseException):
                    raise got
                return got
        return self._acquire(s)

    # ---------------------------------------------------------------- open, index

    def _open(self, s: int) -> ShardIndex:
        url, name = self.catalog.urls[s], self.catalog.names[s]
        # verify="never" reads a shard as far as tarfile can, damaged headers included (only a hash checks bytes).
        strict = self.verify != "never"
        handle = self._take(s) if storage.is_s3(url) else None
        fd = handle.fd if handle else os.open(storage.local_path(url), os.O_RDONLY)
        try:
            must_hash = self.verify == "always" if handle else self.verify != "never"
            if must_hash and not self.verified.get(s):
                path = handle.path if handle else str(storage.local_path(url))
                if hash_file(path) != (self.catalog.sha256[s], self.catalog.nbytes[s]):
                    raise ShardUnavailable("corrupt_shard", f"shard {name}: sha256/bytes mismatch with the manifest")
            members, by_bucket, bad = _index_tar(fd, name, strict)
        except BaseException:
            self.cache.release(handle) if handle else os.close(fd)
            raise
        return ShardIndex(members=members, by_bucket=by_bucket, fd=fd, handle=handle, bad_json=bad)

    def index(self, s: int) -> ShardIndex | None:
        """The shard's index, or None if it cannot be used (reported once per process in ``new_bad``)."""
        if s in self.bad:
            return None
        if s in self._index:
            self._index.move_to_end(s)
            return self._index[s]
        try:
            idx = self._open(s)
        except (ShardUnavailable, TarReadError, OSError) as e:
            if isinstance(e, (CacheFull, TimeoutError)):
                raise  # the node cannot make room: an error to fix, not a hole
            reason = e.reason if isinstance(e, ShardUnavailable) else "corrupt_shard"
            log.warning("skipping shard %s (%s): %s", self.catalog.names[s], reason, e)
            self.bad[s] = reason
            self.new_bad.append((self.catalog.names[s], reason))
            return None
        self.verified[s] = True
        self._index[s] = idx
        while len(self._index) > self.keep_open:
            self._drop(next(iter(self._index)))
        return idx

    def retain(self, shards: list[int]) -> None:
        """Close every open shard not in ``shards`` (a new window begins)."""
        for s in [s for s in self._index if s not in set(shards)]:
            self._drop(s)

    def _drop(self, s: int) -> None:
        idx = self._index.pop(s)
        if idx.handle is not None:
            self.cache.release(idx.handle)
        else:
            os.close(idx.fd)

    def read(self, idx: ShardIndex, key: str, ext: str) -> bytes:
        """The bytes of member KEY.ext."""
        off, n = idx.members[key][ext]
        return os.pread(idx.fd, n, off)

    def resolve(self, slot: np.ndarray, bucket_name: str) -> tuple[ShardIndex | None, str | None, str]:
        """(index, key, reason): the sample of slot (order_epoch, shard, bucket, j), or a hole reason."""
        oe, s, _, j = (int(x) for x in slot)
        idx = self.index(s)
        if idx is None:
            return None, None, self.bad[s]
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
        """Stop the prefetcher and release every shard."""
        if self._thread is not None:
            self._stop = True  # the shard being downloaded is finished, the queued ones are not
            self._queue.put(None)
            self._thread.join(timeout=60)
            self._thread = None
        with self._cv:
            for got in self._ready.values():
                if isinstance(got, Handle):
                    self.cache.release(got)
            self._ready.clear()
            self._wanted.clear()
        for s in list(self._index):
            self._drop(s)
