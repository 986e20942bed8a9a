"""One storage API for local paths and ``s3://bucket/key`` (AWS, MinIO, R2, Ceph, moto).

Each function picks a backend by the url's scheme from :data:`BACKENDS`: ``file`` (plain paths and
``file://``, :mod:`tessera.storage.local`) or ``s3`` (:mod:`tessera.storage.s3`, whose client, config and
counted retries live in :mod:`tessera.storage.s3_client`). The backends share one interface
(``open_read``, ``atomic_write``, ``exists``, ``delete``, ``copy``, ``list_prefix``) and never import each other.

* Writes are atomic: locally a temp file in the same directory, fsync, then rename; on S3 a single PUT
  or a multipart upload whose CompleteMultipartUpload is issued only when the ``with`` block exits
  cleanly (aborted otherwise). ``create_only`` refuses to overwrite (``If-None-Match: *`` on S3).
* Big objects (checkpoint shards) move without a joined copy: ``write_buffers`` writes a sequence of buffers as
  one object (on S3, parts uploaded concurrently), ``read_ranges`` fills buffers from byte ranges (``preadv``
  locally, concurrent ranged GETs on S3), so a reader fetches only the bytes it needs.
* S3 calls are retried by botocore's standard (or adaptive) retry mode; every retry is counted by reason
  (:func:`retry_stats`) and logged with the url, never with credentials.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Sequence
from types import ModuleType
from typing import BinaryIO

from tessera.registry import Registry, RegistryError
from tessera.storage import local, s3
from tessera.storage.local import local_path
from tessera.storage.s3_client import MiB, StorageConfig, StorageError, configure, retry_stats

__all__ = [
    "BACKENDS", "MiB", "StorageConfig", "StorageError", "atomic_write", "configure", "copy", "delete", "exists",
    "is_s3", "join", "list_prefix", "local_path", "open_read", "read_bytes", "read_ranges", "read_text", "retry_stats",
    "scheme", "write_buffers", "write_bytes", "write_text",
]

BACKENDS: Registry[ModuleType] = Registry("storage backend")
BACKENDS.register("file")(local)
BACKENDS.register("s3")(s3)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme(url: str | os.PathLike) -> str:
    """The url's scheme (``s3``, ``file``); a plain path is ``file``."""
    m = _SCHEME.match(os.fspath(url))
    return m.group(1).lower() if m else "file"


def _backend(url: str) -> ModuleType:
    try:
        return BACKENDS.get(scheme(url))
    except RegistryError as exc:
        raise ValueError(f"no storage backend for {url!r}: {exc}") from None


def is_s3(url: str | os.PathLike) -> bool:
    """True for ``s3://bucket/key`` urls."""
    return os.fspath(url).startswith("s3://")


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or url with ``/`` (leading slashes in parts are dropped)."""
    base = os.fspath(base)
    parts = tuple(p.strip("/") for p in parts if p.strip("/"))
    if scheme(base) != "file":
        return "/".join((base.rstrip("/"), *parts)) if parts else base
    return os.path.join(base, *parts)


def open_read(url: str | os.PathLike) -> BinaryIO:
    """Open a local file or S3 object for streaming binary reads (works with tarfile ``'r|*'``)."""
    url = os.fspath(url)
    return _backend(url).open_read(url)


def read_bytes(url: str | os.PathLike) -> bytes:
    """The whole content of a local file or S3 object."""
    with open_read(url) as f:
        return f.read()


def read_text(url: str | os.PathLike) -> str:
    """The whole content as UTF-8 text."""
    return read_bytes(url).decode("utf-8")


def atomic_write(url: str | os.PathLike, *, create_only: bool = False) -> contextlib.AbstractContextManager[BinaryIO]:
    """Context manager yielding a binary file; the target appears only if the block exits cleanly."""
    url = os.fspath(url)
    return _backend(url).atomic_write(url, create_only)


def write_bytes(url: str | os.PathLike, data: bytes, *, create_only: bool = False) -> None:
    """Atomically write ``data``; with ``create_only`` raise FileExistsError if the target exists."""
    with atomic_write(url, create_only=create_only) as f:
        f.write(data)


def write_text(url: str | os.PathLike, text: str, *, create_only: bool = False) -> None:
    """Atomically write UTF-8 text."""
    write_bytes(url, text.encode("utf-8"), create_only=create_only)


def write_buffers(url: str | os.PathLike, buffers: Sequence) -> None:
    """Atomically write the concatenation of ``buffers`` (bytes-like) without joining them into one copy; on S3 the
    parts of the multipart upload go up concurrently (``StorageConfig.transfer_workers``)."""
    url = os.fspath(url)
    _backend(url).write_buffers(url, [memoryview(b) for b in buffers])


def read_ranges(url: str | os.PathLike, requests: Sequence[tuple[int, Sequence]]) -> None:
    """For each ``(offset, views)``: fill the writable views, in order, from the bytes at ``offset`` onward;
    on S3 one ranged GET per request, run concurrently."""
    url = os.fspath(url)
    _backend(url).read_ranges(url, [(int(off), [memoryview(v) for v in views]) for off, views in requests])


def exists(url: str | os.PathLike) -> bool:
    """True if the local path or S3 object exists (S3: an object, not a prefix)."""
    url = os.fspath(url)
    return _backend(url).exists(url)


def delete(url: str | os.PathLike) -> None:
    """Delete a file or object; deleting a missing one is a no-op (as on S3)."""
    url = os.fspath(url)
    _backend(url).delete(url)


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy one file/object: within a backend by its own copy (server-side on S3), across backends streamed."""
    src, dst = os.fspath(src), os.fspath(dst)
    backend = _backend(src)
    if backend is _backend(dst):
        backend.copy(src, dst)
        return
    with open_read(src) as r, atomic_write(dst) as w:
        shutil.copyfileobj(r, w, 1 * MiB)


def list_prefix(url: str | os.PathLike) -> list[str]:
    """Full urls of every file/object under a directory url, recursive and sorted."""
    url = os.fspath(url)
    return _backend(url).list_prefix(url)
