"""The S3 client (botocore, the client layer under boto3), its retries and their counts.

* Retries are botocore's own ``standard`` or ``adaptive`` mode (``StorageConfig.retry_mode``): botocore
  decides what is retryable and how long to back off. Two hooks on the client's event system make every
  retry visible: ``needs-retry.s3`` notes why an attempt failed, and ``request-created.s3`` counts and logs
  a retry when botocore really sends the next attempt (:func:`retry_stats`; urls, never credentials).
* One condition botocore does not retry, so the needs-retry hook does: S3's 409
  ``ConditionalRequestConflict``, which AWS documents as retryable for conditional writes but botocore's
  standard conditions do not list.
* The client is built lazily with the standard credential chain; the server comes from
  ``StorageConfig.endpoint_url`` or ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import random
import threading
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger("tessera.storage")
MiB = 1024 * 1024
_MIN_PART = 5 * MiB  # S3's minimum part size (except the last part)
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket", "NoSuchUpload"}
_CONFLICT = "ConditionalRequestConflict"


@dataclass(kw_only=True)
class StorageConfig:
    """Where the S3 server is and how botocore retries; local paths ignore it."""

    endpoint_url: str | None = None  # None: AWS_ENDPOINT_URL, else AWS
    region: str | None = None  # None: the credential chain's region (AWS_DEFAULT_REGION, profile)
    retry_mode: Literal["standard", "adaptive"] = "standard"  # adaptive adds client-side rate limiting
    max_retries: int = 5  # retries after the first attempt (botocore's max_attempts)
    multipart_threshold_mb: int = 8  # objects of at least this size use a multipart upload
    multipart_chunk_mb: int = 8  # part size (S3 minimum: 5 MiB)
    # Parts uploaded, or byte ranges fetched, at once for one object (write_buffers / read_ranges): one stream to
    # S3 runs at ~100 MB/s, so a checkpoint shard of GBs needs several in flight.
    transfer_workers: int = 8

    def __post_init__(self) -> None:
        if self.retry_mode not in ("standard", "adaptive"):
            raise ValueError(f"retry_mode must be 'standard' or 'adaptive', got {self.retry_mode!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.multipart_threshold_mb < 1:
            raise ValueError(f"multipart_threshold_mb must be >= 1, got {self.multipart_threshold_mb}")
        if self.transfer_workers < 1:
            raise ValueError(f"transfer_workers must be >= 1, got {self.transfer_workers}")
        if self.multipart_chunk_mb * MiB < _MIN_PART:
            raise ValueError(f"multipart_chunk_mb must be >= 5 (S3's minimum part size), got {self.multipart_chunk_mb}")


class StorageError(OSError):
    """An S3 operation failed for a reason other than not-found / exists / access denied."""


_CFG = StorageConfig()
_CLIENTS: dict[tuple, Any] = {}
_LOADER: Any = None  # botocore's data loader, shared by every client of this process
_LOCK = threading.Lock()
_RETRIES: collections.Counter[str] = collections.Counter()
_tls = threading.local()  # per thread: the url of the call in flight and why its last attempt failed


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
    """S3 retries by reason (throttle, server_error, connection, conflict) plus gave_up / abort_failed."""
    with _LOCK:
        return dict(_RETRIES)


def current() -> StorageConfig:
    """The storage config in effect."""
    return _CFG


def count(key: str) -> None:
    """Add one to a retry_stats() counter."""
    with _LOCK:
        _RETRIES[key] += 1


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``."""
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"S3 url has no bucket: {url}")
    return bucket, key


def client() -> Any:
    """The S3 client for (endpoint, region, pid): cached, and rebuilt after fork or configure()."""
    cfg = _CFG
    endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    key = (endpoint, cfg.region, os.getpid())
    with _LOCK:
        c = _CLIENTS.get(key)
        if c is None:
            c = _CLIENTS[key] = _build_client(cfg, endpoint)
    return c


def _build_client(cfg: StorageConfig, endpoint: str | None) -> Any:
    global _LOADER
    import botocore.session
    from botocore.config import Config

    # A fresh session resolves credentials anew (standard chain); the shared loader keeps the parsed
    # service models, which are most of a client's build time.
    session = botocore.session.Session()
    if _LOADER is None:
        _LOADER = session.get_component("data_loader")
    session.register_component("data_loader", _LOADER)
    bc = Config(retries={"mode": cfg.retry_mode, "max_attempts": cfg.max_retries}, max_pool_connections=32)
    if endpoint and "amazonaws.com" not in endpoint:
        # botocore >= 1.36 sends CRC checksum headers by default, which MinIO/Ceph/R2/B2 builds reject;
        # keep the pre-1.36 behaviour off AWS unless the user's env asks otherwise.
        bc = bc.merge(Config(
            request_checksum_calculation=os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required"),
            response_checksum_validation=os.environ.get("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required"),
        ))
    c = session.create_client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region, config=bc)
    c.meta.events.register("needs-retry.s3", _on_needs_retry)
    c.meta.events.register("request-created.s3", _on_request_created)
    return c


@functools.cache
def _checkers() -> tuple[Any, Any, Any]:
    """botocore's own retry conditions (standard mode's, without the attempt limit) and throttle detector."""
    from botocore.retries import standard as s

    retryable = s.OrRetryChecker([s.TransientRetryableChecker(), s.ThrottledRetryableChecker(),
                                  s.ThrottlingStatusCodeChecker(), s.ModeledRetryableChecker()])
    return s.RetryEventAdapter(), retryable, s.ThrottlingErrorDetector(s.RetryEventAdapter())


def _on_needs_retry(**kwargs: Any) -> float | None:
    """needs-retry hook: note why the attempt failed (botocore decides); retry S3's 409 conflict ourselves."""
    adapter, retryable, throttling = _checkers()
    ctx = adapter.create_retry_context(**kwargs)
    reason = None
    if ctx.get_error_code() == _CONFLICT:
        reason = "conflict"
    elif retryable.is_retryable(ctx):
        reason = "throttle" if throttling.is_throttling_error_from_context(ctx) else \
            "connection" if ctx.caught_exception is not None else "server_error"
    kwargs["request_dict"]["context"]["tessera_failure"] = reason
    _tls.failure = reason
    if reason == "conflict" and ctx.attempt_number <= _CFG.max_retries:
        return random.uniform(0.0, 0.05 * 2 ** (ctx.attempt_number - 1))  # botocore's non-throttle backoff
    return None


def _on_request_created(request: Any, operation_name: str, **_: Any) -> None:
    """request-created hook: an attempt after the first is a retry that really happens: count and log it."""
    attempt = (request.context.get("retries") or {}).get("attempt", 1)
    if attempt <= 1:
        return
    reason = request.context.get("tessera_failure") or "other"
    count(reason)
    _tls.retries = getattr(_tls, "retries", 0) + 1
    log.warning("S3 %s %s: %s, retry %d/%d", operation_name, getattr(_tls, "url", None) or "?", reason,
                attempt - 1, _CFG.max_retries)


def _error_code(exc: BaseException) -> tuple[str, int]:
    resp = getattr(exc, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    return code, int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def translate(exc: BaseException, url: str, op: str) -> BaseException:
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


def call(url: str, op: str, **kwargs: Any) -> dict[str, Any]:
    """Run client method ``op`` (botocore retries it); a final error becomes an OSError naming the url."""
    from botocore.exceptions import BotoCoreError, ClientError

    _tls.url, _tls.failure, _tls.retries = url, None, 0
    try:
        return getattr(client(), op)(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        if _tls.failure is not None:  # the last attempt failed for a retryable reason: botocore gave up
            count("gave_up")
            log.error("S3 %s %s: giving up after %d retries (%s)", op, url, _tls.retries, _tls.failure)
        raise translate(exc, url, op) from exc
    finally:
        _tls.url = None
