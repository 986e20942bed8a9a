"""One storage API for local paths and ``s3://bucket/key`` (AWS, MinIO, R2, Ceph, moto).

* Writes are atomic: locally a temp file in the same directory, fsync, then rename; on S3 a single PUT
  or a multipart upload whose CompleteMultipartUpload is issued only when the ``with`` block exits
  cleanly (aborted otherwise). ``create_only`` refuses to overwrite (``If-None-Match: *`` on S3).
* S3 calls retry throttling, 5xx and connection errors with exponential backoff and jitter; every
  retry is counted by reason (:func:`retry_stats`) and logged with the url, never with credentials.
* The S3 client (botocore, boto3's client layer) is built lazily with the standard credential chain;
  the server comes from ``StorageConfig.endpoint_url`` or ``AWS_ENDPOINT_URL`` (MinIO, R2, Ceph...).
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger("tessera.storage")
MiB = 1024 * 1024
# S3 limits: a part is >= 5 MiB (except the last), an upload has <= 10,000 parts, CopyObject <= 5 GiB.
_MIN_PART = 5 * MiB
_MAX_SINGLE_COPY = 5 * 1024 * MiB
_TMP_MARK = ".tessera-tmp"  # local temp files carry this, so listings can skip in-flight writes

_THROTTLE_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestLimitExceeded", "TooManyRequests", "TooManyRequestsException", "ProvisionedThroughputExceededException",
}
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "RequestTimeout", "ConditionalRequestConflict"}
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket", "NoSuchUpload"}


@dataclass(kw_only=True)
class StorageConfig:
    """Where the S3 server is and how hard to retry; local paths ignore it."""

    endpoint_url: str | None = None  # None: AWS_ENDPOINT_URL, else AWS
    region: str | None = None  # None: the credential chain's region (AWS_DEFAULT_REGION, profile)
    max_retries: int = 5  # retries after the first attempt
    backoff_base_s: float = 0.2  # first retry waits ~base, then doubles (with jitter)
    multipart_threshold_mb: int = 8  # objects of at least this size use a multipart upload
    multipart_chunk_mb: int = 8  # part size (S3 minimum: 5 MiB)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_base_s < 0:
            raise ValueError(f"backoff_base_s must be >= 0, got {self.backoff_base_s}")
        if self.multipart_threshold_mb < 1:
            raise ValueError(f"multipart_threshold_mb must be >= 1, got {self.multipart_threshold_mb}")
        if self.multipart_chunk_mb * MiB < _MIN_PART:
            raise ValueError(f"multipart_chunk_mb must be >= 5 (S3's minimum part size), got {self.multipart_chunk_mb}")


class StorageError(OSError):
    """An S3 operation failed for a reason other than not-found / exists / access denied."""


_CFG = StorageConfig()
_CLIENTS: dict[tuple, Any] = {}
_LOADER: Any = None  # botocore's data loader, shared by every client of this process
_LOCK = threading.Lock()
_RETRIES: collections.Counter[str] = collections.Counter()


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork() time would never be released in the child.
    global _LOCK
    _LOCK = threading.Lock()
    _CLIENTS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def configure(cfg: StorageConfig) -> None:
    """Set the storage config for this process; clients are rebuilt on next use."""
    global _CFG
    with _LOCK:
        _CFG = cfg
        _CLIENTS.clear()


def retry_stats() -> dict[str, int]:
    """S3 retries by reason (throttle, server_error, connection) plus gave_up / abort_failed counts."""
    with _LOCK:
        return dict(_RETRIES)


# --------------------------------------------------------------------------- urls


def is_s3(url: str | os.PathLike) -> bool:
    """True for ``s3://bucket/key`` urls."""
    return os.fspath(url).startswith("s3://")


def _split(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"S3 url has no bucket: {url}")
    return bucket, key


def local_path(url: str | os.PathLike) -> Path:
    """The filesystem path of a local url (plain path or ``file://``); S3 urls are an error."""
    url = os.fspath(url)
    if is_s3(url):
        raise ValueError(f"not a local path: {url}")
    return Path(url[len("file://"):] if url.startswith("file://") else url)


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or S3 url with ``/`` (leading slashes in parts are dropped)."""
    base = os.fspath(base)
    parts = tuple(p.strip("/") for p in parts if p.strip("/"))
    if is_s3(base):
        return "/".join((base.rstrip("/"), *parts)) if parts else base
    return os.path.join(base, *parts)


# --------------------------------------------------------------------------- S3 client + retries


def _client() -> Any:
    """The S3 client for (endpoint, region, pid): cached, and rebuilt after fork."""
    global _LOADER
    cfg = _CFG
    key = (cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL"), cfg.region, os.getpid())
    with _LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            import botocore.session
            from botocore.config import Config

            # A fresh session resolves credentials anew (standard chain); the shared loader keeps the
            # parsed service models, which are most of a client's ~0.2 s build time.
            session = botocore.session.Session()
            if _LOADER is None:
                _LOADER = session.get_component("data_loader")
            session.register_component("data_loader", _LOADER)
            # botocore's own retries are off: ours count and log every retry by reason.
            bc = Config(retries={"total_max_attempts": 1, "mode": "standard"}, max_pool_connections=32)
            if key[0] and "amazonaws.com" not in key[0]:
                # botocore >= 1.36 sends CRC checksum headers by default, which MinIO/Ceph/R2/B2 builds
                # reject; keep the pre-1.36 behaviour off AWS unless the user's env asks otherwise.
                bc = bc.merge(Config(
                    request_checksum_calculation=os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required"),
                    response_checksum_validation=os.environ.get("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required"),
                ))
            client = session.create_client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region, config=bc)
            _CLIENTS[key] = client
    return client


def _error_code(exc: BaseException) -> tuple[str, int]:
    resp = getattr(exc, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    return code, int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _retry_reason(exc: BaseException) -> str | None:
    """'throttle' | 'server_error' | 'connection' for retryable errors, else None."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, ResponseStreamingError

    if isinstance(exc, ClientError):
        code, status = _error_code(exc)
        if code in _THROTTLE_CODES or status in (429, 503):
            return "throttle"
        if code in _TRANSIENT_CODES or status >= 500:
            return "server_error"
        return None
    if isinstance(exc, (ConnectionError, HTTPClientError, ResponseStreamingError)):
        return "connection"
    return None


def _translate(exc: BaseException, url: str, op: str) -> BaseException:
    """Turn a botocore error into an OSError subclass whose message names the url."""
    code, status = _error_code(exc)
    detail = f"{code or type(exc).__name__}" + (f" (HTTP {status})" if status else "")
    if code in _NOT_FOUND_CODES or status == 404:
        return FileNotFoundError(f"S3 {op}: not found ({detail}): {url}")
    if code == "PreconditionFailed" or status == 412:
        return FileExistsError(f"S3 {op}: refusing to overwrite existing object: {url}")
    if code in ("AccessDenied", "403", "Forbidden") or status == 403:
        return PermissionError(f"S3 {op}: access denied ({detail}): {url}")
    return StorageError(f"S3 {op} failed ({detail}): {url}")


def _backoff(url: str, op: str, reason: str, attempt: int) -> None:
    """Count, log and sleep before retry number ``attempt`` (1-based)."""
    with _LOCK:
        _RETRIES[reason] += 1
    # Exponential backoff with "equal jitter": spreads out many workers hitting one prefix.
    delay = min(30.0, _CFG.backoff_base_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
    log.warning("S3 %s %s: %s, retry %d/%d in %.2fs", op, url, reason, attempt, _CFG.max_retries, delay)
    time.sleep(delay)


def _call(url: str, op: str, **kwargs: Any) -> dict[str, Any]:
    """Run client method ``op`` with our retry loop; final errors become OSErrors naming the url."""
    from botocore.exceptions import BotoCoreError, ClientError

    attempt = 0
    while True:
        try:
            return getattr(_client(), op)(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            reason = _retry_reason(exc)
            if reason is not None and attempt < _CFG.max_retries:
                attempt += 1
                _backoff(url, op, reason, attempt)
                continue
            if reason is not None:
                with _LOCK:
                    _RETRIES["gave_up"] += 1
                log.error("S3 %s %s: giving up after %d retries (%s)", op, url, attempt, reason)
            raise _translate(exc, url, op) from exc


# --------------------------------------------------------------------------- reads


class _S3Reader(io.RawIOBase):
    """A streaming GetObject body that resumes with a Range request if the connection drops."""

    def __init__(self, url: str):
        self._url = url
        self._bucket, self._key = _split(url)
        resp = _call(url, "get_object", Bucket=self._bucket, Key=self._key)
        self._etag, self._body, self._pos = resp["ETag"], resp["Body"], 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        """Fill ``b`` from the body; on a dropped stream reopen at the current offset (same ETag)."""
        from botocore.exceptions import BotoCoreError

        view = memoryview(b).cast("B")
        attempt = 0
        while True:
            try:
                data = self._body.read(len(view))
                break
            except BotoCoreError as exc:
                reason = _retry_reason(exc)
                if reason is None or attempt >= _CFG.max_retries:
                    raise _translate(exc, self._url, "read") from exc
                attempt += 1
                _backoff(self._url, "read", reason, attempt)
                self._reopen()
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
        self._body = _call(self._url, "get_object", Bucket=self._bucket, Key=self._key, Range=rng, IfMatch=self._etag)["Body"]

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def open_read(url: str | os.PathLike) -> BinaryIO:
    """Open a local file or S3 object for streaming binary reads (works with tarfile ``'r|*'``)."""
    url = os.fspath(url)
    if is_s3(url):
        return io.BufferedReader(_S3Reader(url), buffer_size=1 * MiB)  # type: ignore[return-value]
    return open(local_path(url), "rb")


def read_bytes(url: str | os.PathLike) -> bytes:
    """The whole content of a local file or S3 object."""
    with open_read(url) as f:
        return f.read()


def read_text(url: str | os.PathLike) -> str:
    """The whole content as UTF-8 text."""
    return read_bytes(url).decode("utf-8")


# --------------------------------------------------------------------------- writes


@contextlib.contextmanager
def _local_atomic(url: str, create_only: bool) -> Iterator[BinaryIO]:
    path = local_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    if create_only and path.exists():  # fail fast; the link below is the authoritative check
        raise FileExistsError(f"refusing to overwrite existing file: {url}")
    # os.open with 0o666 (not mkstemp's 0o600) so the final file gets the usual umask-based mode.
    tmp = path.parent / f".{path.name}.{os.urandom(6).hex()}{_TMP_MARK}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            yield f  # type: ignore[misc]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if create_only:
            _link_exclusive(tmp, path, url)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _link_exclusive(tmp: Path, path: Path, url: str) -> None:
    """Publish ``tmp`` at ``path`` only if nothing is there (hard link is atomic and exclusive)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"refusing to overwrite existing file: {url}") from None
    except OSError:
        # Filesystems without hard links: claim the name with O_EXCL, then swap the content in.
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            raise FileExistsError(f"refusing to overwrite existing file: {url}") from None
        os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    """Persist a rename; a no-op where directories cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _S3Writer(io.BufferedIOBase):
    """Buffers writes; past the threshold streams parts of a multipart upload completed in finish()."""

    def __init__(self, url: str, create_only: bool):
        self.url, self.create_only = url, create_only
        bucket, key = _split(url)
        self._obj = {"Bucket": bucket, "Key": key}
        self._threshold = _CFG.multipart_threshold_mb * MiB
        self._chunk = _CFG.multipart_chunk_mb * MiB
        self._buf = bytearray()
        self._size = 0
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

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
        if self._upload_id is None and len(self._buf) >= self._threshold:
            self._upload_id = _call(self.url, "create_multipart_upload", **self._obj)["UploadId"]
        while self._upload_id is not None and len(self._buf) >= self._part_size():
            size = self._part_size()
            self._upload_part(bytes(self._buf[:size]))
            del self._buf[:size]  # CPython trims a bytearray's head in O(1)
        return n

    def _part_size(self) -> int:
        # Doubles every 1,000 parts so a stream of unknown length never exceeds S3's 10,000 parts.
        return self._chunk * 2 ** (len(self._parts) // 1000)

    def _upload_part(self, data: bytes) -> None:
        number = len(self._parts) + 1
        resp = _call(self.url, "upload_part", **self._obj, UploadId=self._upload_id, PartNumber=number, Body=data)
        self._parts.append({"PartNumber": number, "ETag": resp["ETag"]})

    def finish(self) -> None:
        """Publish the object: one PUT, or the last part + CompleteMultipartUpload."""
        cond = {"IfNoneMatch": "*"} if self.create_only else {}
        if self._upload_id is None:
            _call(self.url, "put_object", **self._obj, Body=bytes(self._buf), **cond)
            return
        if self._buf or not self._parts:
            self._upload_part(bytes(self._buf))
        self._buf = bytearray()
        parts = {"Parts": self._parts}
        _call(self.url, "complete_multipart_upload", **self._obj, UploadId=self._upload_id, MultipartUpload=parts, **cond)
        self._upload_id = None

    def abort(self) -> None:
        """Drop buffered data and abort the multipart upload, so nothing becomes visible."""
        self._buf = bytearray()
        if self._upload_id is None:
            return
        upload_id, self._upload_id = self._upload_id, None
        try:
            _call(self.url, "abort_multipart_upload", **self._obj, UploadId=upload_id)
        except OSError as exc:  # reported, but never masks the error that caused the abort
            with _LOCK:
                _RETRIES["abort_failed"] += 1
            log.error("could not abort multipart upload %s for %s: %s", upload_id, self.url, exc)


@contextlib.contextmanager
def _s3_atomic(url: str, create_only: bool) -> Iterator[BinaryIO]:
    writer = _S3Writer(url, create_only)
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


def atomic_write(url: str | os.PathLike, *, create_only: bool = False) -> contextlib.AbstractContextManager[BinaryIO]:
    """Context manager yielding a binary file; the target appears only if the block exits cleanly."""
    url = os.fspath(url)
    return _s3_atomic(url, create_only) if is_s3(url) else _local_atomic(url, create_only)


def write_bytes(url: str | os.PathLike, data: bytes, *, create_only: bool = False) -> None:
    """Atomically write ``data``; with ``create_only`` raise FileExistsError if the target exists."""
    with atomic_write(url, create_only=create_only) as f:
        f.write(data)


def write_text(url: str | os.PathLike, text: str, *, create_only: bool = False) -> None:
    """Atomically write UTF-8 text."""
    write_bytes(url, text.encode("utf-8"), create_only=create_only)


# --------------------------------------------------------------------------- objects and prefixes


def exists(url: str | os.PathLike) -> bool:
    """True if the local path or S3 object exists (S3: an object, not a prefix)."""
    url = os.fspath(url)
    if not is_s3(url):
        return local_path(url).exists()
    bucket, key = _split(url)
    try:
        _call(url, "head_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return False
    return True


def delete(url: str | os.PathLike) -> None:
    """Delete a file or object; deleting a missing one is a no-op (as on S3)."""
    url = os.fspath(url)
    if is_s3(url):
        bucket, key = _split(url)
        _call(url, "delete_object", Bucket=bucket, Key=key)
        return
    path = local_path(url)
    if path.is_dir():
        raise IsADirectoryError(f"delete() removes files, not directories: {url}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy one file/object; server-side when both are on S3, else streamed through atomic_write."""
    src, dst = os.fspath(src), os.fspath(dst)
    if is_s3(src) and is_s3(dst):
        _s3_copy(src, dst)
        return
    with open_read(src) as r, atomic_write(dst) as w:
        shutil.copyfileobj(r, w, 1 * MiB)


def _s3_copy(src: str, dst: str) -> None:
    (sb, sk), (db, dk) = _split(src), _split(dst)
    source = {"Bucket": sb, "Key": sk}
    size = _call(src, "head_object", **source)["ContentLength"]
    if size <= _MAX_SINGLE_COPY:
        _call(dst, "copy_object", Bucket=db, Key=dk, CopySource=source)
        return
    # CopyObject refuses objects over 5 GiB: copy byte ranges server-side as multipart parts.
    w = _S3Writer(dst, create_only=False)
    w._upload_id = _call(dst, "create_multipart_upload", **w._obj)["UploadId"]
    step = max(w._chunk, -(-size // 10_000))
    try:
        for number, start in enumerate(range(0, size, step), start=1):
            rng = f"bytes={start}-{min(start + step, size) - 1}"
            resp = _call(dst, "upload_part_copy", **w._obj, UploadId=w._upload_id, PartNumber=number,
                         CopySource=source, CopySourceRange=rng)
            w._parts.append({"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]})
        w.finish()
    except BaseException:
        w.abort()
        raise


def list_prefix(url: str | os.PathLike) -> list[str]:
    """Full urls of every file/object under a directory url, recursive and sorted."""
    url = os.fspath(url)
    if not is_s3(url):
        root = local_path(url)
        if not root.is_dir():
            return []
        found = []
        for dirpath, _, files in os.walk(root):
            found += [os.path.join(dirpath, f) for f in files if not f.endswith(_TMP_MARK)]
        return sorted(found)
    bucket, key = _split(url)
    # Directory semantics, like the local branch: "s3://b/runs/a" lists runs/a/..., not runs/ab/...
    prefix = key if not key or key.endswith("/") else key + "/"
    keys: list[str] = []
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    while True:  # ContinuationToken pages of <= 1,000 keys, each page retried on its own
        page = _call(url, "list_objects_v2", **kwargs)
        keys += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        if not page.get("IsTruncated"):
            break
        kwargs["ContinuationToken"] = page["NextContinuationToken"]
    return sorted(f"s3://{bucket}/{k}" for k in keys)
