"""Local filesystem backend: plain paths and ``file://`` urls, written atomically (temp + fsync + rename)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

TMP_MARK = ".tessera-tmp"  # temp files carry this suffix, so listings skip in-flight writes
_COPY_BUFFER = 1024 * 1024
_IOV_MAX = 1024  # buffers per preadv call (POSIX IOV_MAX on Linux)


def local_path(url: str | os.PathLike) -> Path:
    """The filesystem path of a local url (plain path or ``file://``); any other scheme is an error."""
    url = os.fspath(url)
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    if "://" in url:
        raise ValueError(f"not a local path: {url}")
    return Path(url)


def open_read(url: str) -> BinaryIO:
    """Open a local file for binary reads."""
    return open(local_path(url), "rb")


@contextlib.contextmanager
def atomic_write(url: str, create_only: bool) -> Iterator[BinaryIO]:
    """Yield a temp file beside the target; fsync and rename it into place only if the block exits cleanly."""
    path = local_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    if create_only and path.exists():  # fail fast; the link below is the authoritative check
        raise FileExistsError(f"refusing to overwrite existing file: {url}")
    # os.open with 0o666 (not mkstemp's 0o600) so the final file gets the usual umask-based mode.
    tmp = path.parent / f".{path.name}.{os.urandom(6).hex()}{TMP_MARK}"
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
    """Publish ``tmp`` at ``path`` only if nothing is there (a hard link is atomic and exclusive)."""
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


def write_buffers(url: str, buffers: Sequence[memoryview]) -> None:
    """Atomically write the concatenation of ``buffers``, each written as it is (no joined copy)."""
    with atomic_write(url, create_only=False) as f:
        for b in buffers:
            f.write(b)


def read_ranges(url: str, requests: Sequence[tuple[int, Sequence[memoryview]]]) -> None:
    """For each ``(offset, views)``: fill the views, in order, from the file's bytes at ``offset`` onward
    (``preadv`` scatters one contiguous range into many tensors without an intermediate buffer)."""
    fd = os.open(local_path(url), os.O_RDONLY)
    try:
        for offset, views in requests:
            pending = [memoryview(v).cast("B") for v in views if memoryview(v).nbytes]
            while pending:
                n = os.preadv(fd, pending[:_IOV_MAX], offset)
                if n == 0:
                    raise EOFError(f"{url}: {sum(v.nbytes for v in pending)} bytes missing at offset {offset}")
                offset += n
                while pending and n >= pending[0].nbytes:  # drop the views filled, cut into a partly filled one
                    n -= pending.pop(0).nbytes
                if n:
                    pending[0] = pending[0][n:]
    finally:
        os.close(fd)


def exists(url: str) -> bool:
    """True if the path exists."""
    return local_path(url).exists()


def delete(url: str) -> None:
    """Delete a file; a missing file is a no-op (as on S3); a directory is an error."""
    path = local_path(url)
    if path.is_dir():
        raise IsADirectoryError(f"delete() removes files, not directories: {url}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def copy(src: str, dst: str) -> None:
    """Copy one file atomically (the destination appears complete or not at all)."""
    with open_read(src) as r, atomic_write(dst, create_only=False) as w:
        shutil.copyfileobj(r, w, _COPY_BUFFER)


def list_prefix(url: str) -> list[str]:
    """Every file under a directory, recursive and sorted; in-flight temp files are skipped."""
    root = local_path(url)
    if not root.is_dir():
        return []
    found = []
    for dirpath, _, files in os.walk(root):
        found += [os.path.join(dirpath, f) for f in files if not f.endswith(TMP_MARK)]
    return sorted(found)
