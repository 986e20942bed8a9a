"""The node-local shard cache: each S3 shard is downloaded once per node and shared by the node's ranks and workers.

A directory on local disk (``LoaderConfig.cache_dir``), bounded in bytes (``cache_gb``), named by content:

* ``<sha256>.tar``: a complete shard, renamed into place only after every byte arrived from one object version;
* ``<sha256>.ok``: written once the file's sha256 matched the manifest, so a node hashes a shard once, not once
  per worker (``verify: first_open``);
* ``<sha256>.lock``: ``flock``-ed exclusively while one process downloads or hashes the shard, shared while a
  reader uses it (eviction skips shards in use). The kernel drops the lock of a process that dies, so a crash
  leaves no stale lock, and a stale ``<sha256>.part.<pid>`` is removed by the next download of that shard.

A download is concurrent ranged GETs written with ``pwrite`` into a preallocated temp file in 1 MiB reads, so a
process never holds a shard in memory. Each range must report the manifest's size (``Content-Range``) and the same
ETag as the others; a range cut off is resumed at its offset, pinned to that ETag. Written here rather than with
``storage.read_ranges``, which fills memory buffers: a shard of GBs must go to disk in bounded memory.

What cannot be read becomes :class:`ShardUnavailable` with a counted reason naming the shard (``missing_shard``,
``corrupt_shard``: size or sha256 unlike the manifest, ``unreadable_shard``: cut off or changed during every
retry); a cache that cannot make room raises :class:`CacheFull`. Nothing waits forever: every lock wait and every
wait for room ends after ``lock_timeout_s`` with an error naming the shard.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import logging
import os
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tessera.storage.s3_client import call, split_url

log = logging.getLogger("tessera.data")
_CHUNK = 1 << 20
_RESERVE = 64 << 20  # bytes kept free on the cache's disk besides the bound


class ShardUnavailable(Exception):
    """A shard that cannot be used; ``reason`` is the counted hole reason and the message names the shard."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message)
        self.reason, self.message = reason, message

    def __str__(self) -> str:
        return self.message


class CacheFull(RuntimeError):
    """The node's shard cache cannot hold a shard it needs (bound too small, or disk full)."""


@dataclass
class Handle:
    """A shard file open for reading (``fd``), with its lock held shared (``lock``) until released."""

    fd: int
    lock: int
    path: str


def hash_file(path: str) -> tuple[str, int]:
    """(sha256, bytes) of a file, read in 1 MiB chunks."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


class ShardCache:
    """One node's cache directory; an instance per process (safe across threads of it)."""

    def __init__(self, root: str, max_bytes: int, *, part_bytes: int = 8 << 20, threads: int = 4,
                 retries: int = 3, lock_timeout_s: float = 600.0) -> None:
        os.makedirs(root, exist_ok=True)
        self.root, self.max_bytes, self.part_bytes = root, max_bytes, max(part_bytes, _CHUNK)
        self.threads, self.retries, self.lock_timeout_s = threads, retries, lock_timeout_s
        self.stats: Counter = Counter()  # downloads, download_bytes, hits, evictions, range_retries, lost_parts
        self._mutex = threading.Lock()

    def snapshot(self) -> Counter:
        """A copy of the counters (other threads of this process update them)."""
        with self._mutex:
            return Counter(self.stats)

    def _path(self, sha: str, ext: str) -> str:
        return os.path.join(self.root, f"{sha}.{ext}")

    def _flock(self, fd: int, op: int, deadline: float, name: str) -> None:
        """flock with a deadline (polled): a wait never hangs, and its end names the shard."""
        while True:
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"shard {name}: waited {self.lock_timeout_s:.0f} s for the cache lock in "
                                       f"{self.root} (another process of this node downloading it?)") from None
                time.sleep(0.02)

    def acquire(self, url: str, sha: str, size: int, name: str, hashed: bool) -> Handle:
        """The cached shard open for reading, downloaded first if this node does not have it; ``hashed``: it must
        also have matched the manifest's sha256 on this node."""
        lock = os.open(self._path(sha, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.lock_timeout_s
        try:
            while True:
                self._flock(lock, fcntl.LOCK_SH, deadline, name)
                path = self._path(sha, "tar")
                if self._ready(path, sha, size, hashed):
                    fd = os.open(path, os.O_RDONLY)
                    os.utime(path)  # recency for eviction
                    with self._mutex:
                        self.stats["hits"] += 1
                    return Handle(fd, lock, path)
                fcntl.flock(lock, fcntl.LOCK_UN)
                self._flock(lock, fcntl.LOCK_EX, deadline, name)
                try:
                    if not self._ready(path, sha, size, hashed):
                        self._fill(url, sha, size, name, hashed, deadline)
                except FileNotFoundError as e:
                    # The download's own part file vanished under it (seen on one node with 4 ranks x 2 workers;
                    # the cause is not found yet): counted, logged, and the shard downloaded again, a bounded
                    # number of times, rather than skipped as corrupt.
                    with self._mutex:
                        self.stats["lost_parts"] += 1
                        lost = self.stats["lost_parts"]
                    log.warning("shard %s: its download's part file vanished (%s); downloading again", name, e)
                    if lost > self.retries * 8:
                        raise
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        except BaseException:
            os.close(lock)
            raise

    def release(self, h: Handle) -> None:
        """Close the file and drop the shared lock (the shard becomes evictable)."""
        os.close(h.fd)
        os.close(h.lock)

    def _ready(self, path: str, sha: str, size: int, hashed: bool) -> bool:
        try:
            ok = os.stat(path).st_size == size
        except FileNotFoundError:
            return False
        return ok and (not hashed or os.path.exists(self._path(sha, "ok")))

    def _fill(self, url: str, sha: str, size: int, name: str, hashed: bool, deadline: float) -> None:
        """Under the shard's exclusive lock: hash a cached file not hashed yet, or download the shard."""
        path = self._path(sha, "tar")
        if os.path.exists(path) and os.stat(path).st_size == size:
            self._verify(path, sha, size, name)  # cached by a run with verify: never
            return
        for stale in glob.glob(glob.escape(self._path(sha, "part")) + ".*"):
            # A download by a process that died. Only a dead one's: a DataLoader worker forked while its parent
            # held this shard's lock shares that lock (flock belongs to the open file, which fork shares), so a
            # live process may be downloading beside us; its file is its own, and the last rename wins (same bytes).
            if not _alive(stale):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(stale)
        tmp = self._path(sha, f"part.{os.getpid()}.{threading.get_ident()}")
        self._make_room(size, name, deadline)
        try:
            etag = self._download(url, tmp, size, name)
            if hashed:
                self._verify(tmp, sha, size, name)
            os.rename(tmp, path)
            log.debug("cached %s (%d bytes, ETag %s) in %s", name, size, etag, self.root)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def _verify(self, path: str, sha: str, size: int, name: str) -> None:
        digest, n = hash_file(path)
        if (digest, n) != (sha, size):
            os.remove(path)
            raise ShardUnavailable("corrupt_shard", f"shard {name}: sha256/bytes mismatch with the manifest")
        with open(self._path(sha, "ok"), "w") as f:
            f.write(digest)

    def _download(self, url: str, tmp: str, size: int, name: str) -> str:
        """Concurrent ranged GETs into ``tmp``; returns the object's ETag."""
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:
                os.posix_fallocate(fd, 0, size)  # reserves the space now: a full disk fails here, not mid-way
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise CacheFull(f"shard {name} ({size} bytes): no space left on the cache disk of "
                                    f"{self.root}") from e
                raise
            ranges = [(a, min(a + self.part_bytes, size)) for a in range(0, size, self.part_bytes)]
            etags: list[str] = []
            for attempt in range(2):  # an object that changed during the download is downloaded once more
                try:
                    with ThreadPoolExecutor(max(1, min(self.threads, len(ranges)))) as pool:
                        list(pool.map(lambda r: self._range(url, fd, r, size, name, etags), ranges))
                    break
                except _Changed as e:
                    etags.clear()
                    if attempt:
                        raise ShardUnavailable("unreadable_shard", f"shard {name}: the object changed during the "
                                               f"download ({e}), twice") from None
        finally:
            os.close(fd)
        with self._mutex:
            self.stats["downloads"] += 1
            self.stats["download_bytes"] += size
        return etags[0] if etags else ""

    def _range(self, url: str, fd: int, rng: tuple[int, int], size: int, name: str, etags: list[str]) -> None:
        """One byte range, resumed at its offset when the body is cut off (``retries`` times)."""
        bucket, key = split_url(url)
        off, end = rng
        for attempt in range(self.retries + 1):
            kw = {"IfMatch": etags[0]} if etags and attempt else {}
            try:
                resp = call(url, "get_object", Bucket=bucket, Key=key, Range=f"bytes={off}-{end - 1}", **kw)
            except FileNotFoundError:
                raise ShardUnavailable("missing_shard", f"shard {name}: not found at {url}") from None
            except FileExistsError:  # 412: IfMatch failed
                raise _Changed("ETag no longer matches") from None
            except OSError as e:
                if "InvalidRange" in str(e):
                    raise ShardUnavailable("corrupt_shard", f"shard {name}: the object at {url} is smaller than "
                                           f"the manifest's {size} bytes") from None
                raise ShardUnavailable("unreadable_shard", f"shard {name}: {e}") from None
            total = int(resp.get("ContentRange", f"/{size}").rsplit("/", 1)[1])
            if total != size:
                resp["Body"].close()
                raise ShardUnavailable("corrupt_shard", f"shard {name}: the object at {url} has {total} bytes, "
                                       f"the manifest {size}")
            with self._mutex:
                if not etags:
                    etags.append(resp["ETag"])
                changed = etags[0] != resp["ETag"]
            if changed:
                resp["Body"].close()
                raise _Changed(f"ETag {resp['ETag']} after {etags[0]}")
            off = self._pump(resp["Body"], fd, off, end)
            if off >= end:
                return
            with self._mutex:
                self.stats["range_retries"] += 1
            log.warning("shard %s: download cut off at byte %d, resuming (%d/%d)", name, off, attempt + 1,
                        self.retries)
        raise ShardUnavailable("unreadable_shard", f"shard {name}: download cut off at byte {off} of {size} "
                               f"after {self.retries} retries")

    @staticmethod
    def _pump(body, fd: int, off: int, end: int) -> int:
        """Copy a response body to the file at ``off`` in 1 MiB reads; returns the offset reached."""
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        try:
            while off < end:
                chunk = body.read(min(_CHUNK, end - off))
                if not chunk:
                    break
                os.pwrite(fd, chunk, off)
                off += len(chunk)
        except (BotoCoreError, HTTPError, ConnectionError, TimeoutError):
            pass  # cut off: the caller resumes at `off`
        finally:
            body.close()
        return off

    def _make_room(self, size: int, name: str, deadline: float) -> None:
        """Evict the least recently used shards not in use until ``size`` more bytes fit (bound and disk)."""
        if size > self.max_bytes:
            raise CacheFull(f"shard {name} ({size} bytes) is larger than the shard cache bound ({self.max_bytes} "
                            f"bytes, data.cache_gb) of {self.root}")
        lock = os.open(os.path.join(self.root, ".evict.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                self._flock(lock, fcntl.LOCK_EX, deadline, name)
                try:
                    need = self._evict(size)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
                if need <= 0:
                    return
                if time.monotonic() > deadline:
                    raise CacheFull(f"shard {name} ({size} bytes): the shard cache {self.root} is full of shards in "
                                    f"use ({need} bytes short of data.cache_gb={self.max_bytes / 2**30:.3g} or of "
                                    "free disk); raise data.cache_gb or lower shuffle_buffer/prefetch_shards")
                time.sleep(0.2)  # another reader may finish with its shards
        finally:
            os.close(lock)

    def _evict(self, size: int) -> int:
        """One eviction pass; returns the bytes still missing (<= 0: room made). Lock files stay: a process may hold
        one open, and a new file of the same name would be a second lock."""
        files = []
        used = 0
        for entry in os.scandir(self.root):
            if entry.name.endswith(".tar") or ".part." in entry.name:
                st = entry.stat()
                used += st.st_size
                if entry.name.endswith(".tar"):
                    files.append((st.st_mtime, st.st_size, entry.name[: -len(".tar")]))
        free = shutil.disk_usage(self.root).free
        need = max(used + size - self.max_bytes, size + _RESERVE - free)
        for _, n, sha in sorted(files):
            if need <= 0:
                break
            lock = os.open(self._path(sha, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock)
                continue  # in use by a reader of this node
            try:
                for ext in ("tar", "ok"):
                    if os.path.exists(self._path(sha, ext)):
                        os.remove(self._path(sha, ext))
                need -= n
                with self._mutex:
                    self.stats["evictions"] += 1
            finally:
                os.close(lock)
        return need


def _alive(part: str) -> bool:
    """Whether the process named in ``<sha>.part.<pid>.<thread>`` is still running on this node."""
    try:
        pid = int(part.rsplit(".", 2)[-2])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class _Changed(Exception):
    """The object's ETag changed between the ranges of one download."""
