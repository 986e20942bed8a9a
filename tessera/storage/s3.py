"""S3 backend (AWS, MinIO, R2, Ceph, moto): streaming reads, atomic writes, copies and listings.

* Writes are atomic: one PUT, or a multipart upload completed only by ``finish()`` (aborted otherwise);
  ``create_only`` adds ``If-None-Match: *``.
* Every call goes through :func:`tessera.storage.s3_client.call`, so botocore retries it and the retries are
  counted. A GetObject body that breaks mid-read is ours to resume: botocore's retries end once the
  response headers have arrived, so the reader reopens at its offset with a Range request pinned to the ETag.
* Large objects move in parallel (checkpoint shards): ``write_buffers`` uploads the parts of one multipart
  upload from several threads, straight from the caller's buffers, and ``read_ranges`` fetches byte ranges
  with concurrent ranged GETs into the caller's buffers (``StorageConfig.transfer_workers`` at once).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

from tessera.storage.s3_client import MiB, call, client, count, current, split_url, translate

__all__ = ["atomic_write", "client", "copy", "delete", "exists", "list_prefix", "open_read", "read_ranges", "split_url",
           "write_buffers"]

log = logging.getLogger("tessera.storage")
_MAX_SINGLE_COPY = 5 * 1024 * MiB  # CopyObject's limit; larger objects are copied as ranged parts


# --------------------------------------------------------------------------- reads


class _Reader(io.RawIOBase):
    """A streaming GetObject body that resumes with a Range request if the connection drops mid-body."""

    def __init__(self, url: str):
        self._url = url
        self._bucket, self._key = split_url(url)
        resp = call(url, "get_object", Bucket=self._bucket, Key=self._key)
        self._etag, self._body, self._pos = resp["ETag"], resp["Body"], 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        """Fill ``b`` from the body; on a dropped stream reopen at the current offset (same ETag)."""
        from botocore.exceptions import ConnectionError, HTTPClientError, ResponseStreamingError

        view = memoryview(b).cast("B")
        attempt = 0
        while True:
            try:
                data = self._body.read(len(view))
                break
            except (ConnectionError, HTTPClientError, ResponseStreamingError) as exc:
                # botocore's retries ended when the headers arrived; a body that breaks is ours to resume.
                if attempt >= current().max_retries:
                    count("gave_up")
                    raise translate(exc, self._url, "read") from exc
                attempt += 1
                count("connection")
                log.warning("S3 read %s: stream broke at byte %d (%s), reopening %d/%d", self._url, self._pos,
                            type(exc).__name__, attempt, current().max_retries)
                self._reopen()  # no sleep of our own: botocore backs off if the reopening GET fails
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def readall(self) -> bytes:
        """Read to the end in 1 MiB reads (RawIOBase's default reads 8 KiB at a time)."""
        chunks = []
        while chunk := self.read(MiB):
            chunks.append(chunk)
        return b"".join(chunks)

    def _reopen(self) -> None:
        # IfMatch: never splice bytes of a newer object version onto the old one.
        with contextlib.suppress(Exception):
            self._body.close()
        rng = f"bytes={self._pos}-"
        self._body = call(self._url, "get_object", Bucket=self._bucket, Key=self._key, Range=rng,
                          IfMatch=self._etag)["Body"]

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def open_read(url: str) -> BinaryIO:
    """Open an object for streaming binary reads (works with tarfile ``'r|*'``)."""
    return io.BufferedReader(_Reader(url), buffer_size=1 * MiB)  # type: ignore[return-value]


def read_ranges(url: str, requests: Sequence[tuple[int, Sequence[memoryview]]]) -> None:
    """For each ``(offset, views)``: one ranged GET filling the views in order; the GETs run concurrently."""
    bucket, key = split_url(url)
    etag: list[str] = []  # the first response's ETag pins every later range to the same object version

    def fetch(offset: int, views: Sequence[memoryview]) -> None:
        pending = [memoryview(v).cast("B") for v in views if memoryview(v).nbytes]
        attempt = 0
        while pending:
            end = offset + sum(v.nbytes for v in pending) - 1
            kw = {"IfMatch": etag[0]} if etag else {}
            resp = call(url, "get_object", Bucket=bucket, Key=key, Range=f"bytes={offset}-{end}", **kw)
            if not etag:
                etag.append(resp["ETag"])
            try:
                offset = _fill(resp["Body"], pending, offset)
            except _Broken as exc:  # the body broke after the headers: botocore is done, we resume at the offset
                offset, attempt = exc.offset, attempt + 1
                if attempt > current().max_retries:
                    count("gave_up")
                    raise translate(exc.__cause__ or exc, url, "read") from exc
                count("connection")
                log.warning("S3 ranged read %s: stream broke at byte %d, retry %d/%d", url, offset, attempt,
                            current().max_retries)

    _run_parallel([(fetch, off, views) for off, views in requests])


class _Broken(OSError):
    """A response body that broke (or ended early) at object offset ``offset``."""

    def __init__(self, msg: str, offset: int):
        super().__init__(msg)
        self.offset = offset


def _fill(body: Any, pending: list[memoryview], offset: int) -> int:
    """Read ``body`` into the views, dropping each from ``pending`` once full; returns the offset reached."""
    from botocore.exceptions import ConnectionError, HTTPClientError, ResponseStreamingError

    try:
        while pending:
            v = pending[0]
            data = body.read(min(v.nbytes, MiB))
            if not data:
                raise _Broken(f"body ended early at byte {offset}", offset)
            v[: len(data)] = data
            offset += len(data)
            if len(data) == v.nbytes:
                pending.pop(0)
            else:
                pending[0] = v[len(data):]
    except (ConnectionError, HTTPClientError, ResponseStreamingError) as exc:
        raise _Broken(str(exc), offset) from exc
    finally:
        body.close()
    return offset


def _run_parallel(tasks: list[tuple]) -> list:
    """Run ``fn(*args)`` for each task on ``transfer_workers`` threads; the first error is raised after all end."""
    if len(tasks) <= 1:
        return [fn(*args) for fn, *args in tasks]
    with ThreadPoolExecutor(max_workers=min(len(tasks), current().transfer_workers)) as pool:
        futures = [pool.submit(fn, *args) for fn, *args in tasks]
        return [f.result() for f in futures]


# --------------------------------------------------------------------------- writes


class _Writer(io.BufferedIOBase):
    """Buffers writes; past the threshold streams parts of a multipart upload completed in finish()."""

    def __init__(self, url: str, create_only: bool):
        self.url, self.create_only = url, create_only
        bucket, key = split_url(url)
        self.obj = {"Bucket": bucket, "Key": key}
        self.chunk = current().multipart_chunk_mb * MiB
        self._threshold = current().multipart_threshold_mb * MiB
        self._buf = bytearray()
        self._size = 0
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._size

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError(f"write to closed S3 writer: {self.url}")
        n = memoryview(data).nbytes
        self._buf += data
        self._size += n
        if self.upload_id is None and len(self._buf) >= self._threshold:
            self.upload_id = call(self.url, "create_multipart_upload", **self.obj)["UploadId"]
        while self.upload_id is not None and len(self._buf) >= self._part_size():
            size = self._part_size()
            self._upload_part(bytes(self._buf[:size]))
            del self._buf[:size]  # CPython trims a bytearray's head in O(1)
        return n

    def _part_size(self) -> int:
        # Doubles every 1,000 parts so a stream of unknown length never exceeds S3's 10,000 parts.
        return self.chunk * 2 ** (len(self.parts) // 1000)

    def _upload_part(self, data: bytes) -> None:
        number = len(self.parts) + 1
        resp = call(self.url, "upload_part", **self.obj, UploadId=self.upload_id, PartNumber=number, Body=data)
        self.parts.append({"PartNumber": number, "ETag": resp["ETag"]})

    def finish(self) -> None:
        """Publish the object: one PUT, or the last part + CompleteMultipartUpload."""
        cond = {"IfNoneMatch": "*"} if self.create_only else {}
        if self.upload_id is None:
            call(self.url, "put_object", **self.obj, Body=bytes(self._buf), **cond)
            return
        if self._buf or not self.parts:
            self._upload_part(bytes(self._buf))
        self._buf = bytearray()
        parts = {"Parts": self.parts}
        call(self.url, "complete_multipart_upload", **self.obj, UploadId=self.upload_id, MultipartUpload=parts, **cond)
        self.upload_id = None

    def abort(self) -> None:
        """Drop buffered data and abort the multipart upload, so nothing becomes visible."""
        self._buf = bytearray()
        if self.upload_id is None:
            return
        upload_id, self.upload_id = self.upload_id, None
        try:
            call(self.url, "abort_multipart_upload", **self.obj, UploadId=upload_id)
        except OSError as exc:  # reported, but never masks the error that caused the abort
            count("abort_failed")
            log.error("could not abort multipart upload %s for %s: %s", upload_id, self.url, exc)


@contextlib.contextmanager
def atomic_write(url: str, create_only: bool) -> Iterator[BinaryIO]:
    """Yield a writer; the object appears only if the block exits cleanly (aborted otherwise)."""
    writer = _Writer(url, create_only)
    if create_only and exists(url):  # fail fast; the conditional PUT/complete is authoritative
        raise FileExistsError(f"refusing to overwrite existing object: {url}")
    try:
        yield writer  # type: ignore[misc]
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        writer.close()


class _Views(io.RawIOBase):
    """A seekable stream over a sequence of buffers: one request body without joining them into one copy
    (botocore seeks it back to the start to retry, and to measure its length)."""

    def __init__(self, views: Sequence[memoryview]):
        self._views = [memoryview(v).cast("B") for v in views]
        self._size, self._pos = sum(v.nbytes for v in self._views), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, min(self._size, pos + (0, self._pos, self._size)[whence]))
        return self._pos

    def readinto(self, b: Any) -> int:
        out, n, skip = memoryview(b).cast("B"), 0, self._pos
        for v in self._views:
            if skip >= v.nbytes:
                skip -= v.nbytes
                continue
            k = min(v.nbytes - skip, out.nbytes - n)
            out[n: n + k] = v[skip: skip + k]
            n, skip = n + k, 0
            if n == out.nbytes:
                break
        self._pos += n
        return n


def _cut(views: Sequence[memoryview], start: int, end: int) -> list[memoryview]:
    """The bytes ``[start, end)`` of the views' concatenation, as views (no copy)."""
    out, pos = [], 0
    for v in views:
        lo, hi = max(start, pos), min(end, pos + v.nbytes)
        if lo < hi:
            out.append(v[lo - pos: hi - pos])
        pos += v.nbytes
    return out


def write_buffers(url: str, buffers: Sequence[memoryview]) -> None:
    """Publish the concatenation of ``buffers`` as one object: a PUT, or a multipart upload whose parts are sent
    concurrently from the buffers themselves; CompleteMultipartUpload only after every part (aborted otherwise)."""
    views = [memoryview(b).cast("B") for b in buffers]
    total = sum(v.nbytes for v in views)
    w = _Writer(url, create_only=False)
    if total < w._threshold:
        call(url, "put_object", **w.obj, Body=_Views(views))
        return
    size = max(w.chunk, -(-total // 9_999))  # S3 allows 10,000 parts

    def send(number: int, part: list[memoryview]) -> dict[str, Any]:
        resp = call(url, "upload_part", **w.obj, UploadId=w.upload_id, PartNumber=number, Body=_Views(part))
        return {"PartNumber": number, "ETag": resp["ETag"]}

    w.upload_id = call(url, "create_multipart_upload", **w.obj)["UploadId"]
    try:
        w.parts = _run_parallel([(send, i + 1, _cut(views, lo, min(lo + size, total)))
                                 for i, lo in enumerate(range(0, total, size))])
        call(url, "complete_multipart_upload", **w.obj, UploadId=w.upload_id, MultipartUpload={"Parts": w.parts})
        w.upload_id = None
    except BaseException:
        w.abort()
        raise


# --------------------------------------------------------------------------- objects and prefixes


def exists(url: str) -> bool:
    """True if the object exists (an object, not a prefix)."""
    bucket, key = split_url(url)
    try:
        call(url, "head_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return False
    return True


def delete(url: str) -> None:
    """Delete an object; a missing one is a no-op."""
    bucket, key = split_url(url)
    call(url, "delete_object", Bucket=bucket, Key=key)


def copy(src: str, dst: str) -> None:
    """Server-side copy; objects over CopyObject's 5 GiB limit go as ranged multipart parts."""
    (sb, sk), (db, dk) = split_url(src), split_url(dst)
    source = {"Bucket": sb, "Key": sk}
    size = call(src, "head_object", **source)["ContentLength"]
    if size <= _MAX_SINGLE_COPY:
        call(dst, "copy_object", Bucket=db, Key=dk, CopySource=source)
        return
    w = _Writer(dst, create_only=False)
    w.upload_id = call(dst, "create_multipart_upload", **w.obj)["UploadId"]
    step = max(w.chunk, -(-size // 10_000))
    try:
        for number, start in enumerate(range(0, size, step), start=1):
            rng = f"bytes={start}-{min(start + step, size) - 1}"
            resp = call(dst, "upload_part_copy", **w.obj, UploadId=w.upload_id, PartNumber=number,
                        CopySource=source, CopySourceRange=rng)
            w.parts.append({"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]})
        w.finish()
    except BaseException:
        w.abort()
        raise


def list_prefix(url: str) -> list[str]:
    """Full urls of every object under a directory url, recursive and sorted."""
    bucket, key = split_url(url)
    # Directory semantics, like the local backend: "s3://b/runs/a" lists runs/a/..., not runs/ab/...
    prefix = key if not key or key.endswith("/") else key + "/"
    keys: list[str] = []
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    while True:  # ContinuationToken pages of <= 1,000 keys, each page retried on its own
        page = call(url, "list_objects_v2", **kwargs)
        keys += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        if not page.get("IsTruncated"):
            break
        kwargs["ContinuationToken"] = page["NextContinuationToken"]
    return sorted(f"s3://{bucket}/{k}" for k in keys)
