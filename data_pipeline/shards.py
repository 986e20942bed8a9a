"""Shard files: byte-deterministic webdataset tars, per-shard stats and rejects parquet.

We write tars with :mod:`tarfile` directly rather than ``webdataset.TarWriter``: the writer pins every
header field (mtime, uid/gid, user/group names, mode) and the member order, so the same samples always
give the same bytes, which is what lets a killed-and-resumed run reproduce an uninterrupted run's
shard hashes. Streaming mode (``w|``) never seeks, so the same code writes into an S3 multipart upload.
Shards are read back with :mod:`tessera.tars`, the one tar reader.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import OrderedDict
from typing import BinaryIO

from tessera import storage

IMAGE_EXTS = ("jpg", "jpeg", "webp", "png")
REJECT_COLUMNS = ("position", "source_id", "reason", "detail", "url", "path")
_MTIME = 0  # fixed so that bytes do not depend on when a shard was written
# Exception texts may carry object addresses ("<_io.BytesIO object at 0x7f..>"), which differ per run.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class _HashingFile:
    """Write-through file wrapper that counts bytes and computes sha256 on the fly."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        """Hash, count and forward ``data``."""
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        """Flush the wrapped file."""
        self.f.flush()


class TarShardWriter:
    """Append members to a tar with fixed metadata; ``close()`` returns (sha256, bytes)."""

    def __init__(self, f: BinaryIO) -> None:
        self._out = _HashingFile(f)
        self._tar = tarfile.open(fileobj=self._out, mode="w|", format=tarfile.PAX_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        """Append one member."""
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = _MTIME
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def add_sample(self, members: list[tuple[str, bytes]]) -> None:
        """Append the members of one sample in the given order."""
        for name, data in members:
            self.add(name, data)

    def close(self) -> tuple[str, int]:
        """Finish the archive (end blocks + padding) and return its sha256 and size."""
        self._tar.close()
        return self._out.sha.hexdigest(), self._out.bytes


def sample_members(key: str, image: bytes, ext: str, caption: str, meta: dict) -> list[tuple[str, bytes]]:
    """The three members of one sample: ``KEY.<ext>``, ``KEY.txt``, ``KEY.json``."""
    if "." in key:
        raise ValueError(f"sample key must not contain dots: {key!r}")
    record = {"key": key, **meta}
    js = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return [(f"{key}.{ext}", image), (f"{key}.txt", caption.encode("utf-8")), (f"{key}.json", js.encode("utf-8"))]


def write_json(url: str, obj: dict) -> None:
    """Atomically write a JSON document (sorted keys, so equal content gives equal bytes)."""
    storage.write_bytes(url, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def read_json(url: str) -> dict:
    """Read a JSON document from local disk or S3."""
    return json.loads(storage.read_bytes(url))


def write_rejects(url: str, rows: list[dict]) -> None:
    """Write every rejected input of a shard (sorted by position) as parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows, key=lambda r: r["position"])
    cols: dict[str, list] = OrderedDict((c, []) for c in REJECT_COLUMNS)
    for r in rows:
        for c in REJECT_COLUMNS:
            v = r.get(c)
            if c == "detail" and v:
                v = _ADDRESS.sub("", str(v))
            cols[c].append(int(v) if c == "position" else (None if v is None else str(v)))
    schema = pa.schema([("position", pa.int64())] + [(c, pa.string()) for c in REJECT_COLUMNS[1:]])
    table = pa.table(cols, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(url, buf.getvalue())


def read_rejects(url: str) -> list[dict]:
    """Rows of a rejects parquet file as dicts."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(url))).to_pylist()
