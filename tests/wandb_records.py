"""Read W&B offline ``.wandb`` files in tests (wandb >= 0.19 ships no Python reader).

The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of
records, each with a 7-byte header (masked crc32, little-endian length, type FULL/FIRST/MIDDLE/LAST).
Payloads are ``wandb_internal_pb2.Record`` protobufs.
"""

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_payloads(path: Path) -> list[bytes]:
    """Every complete record payload in one .wandb file."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"not a W&B datastore: {path}"
    pos, out, pending = 7, [], b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < 7:
            pos += left_in_block
            continue
        _crc, length, rtype = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and rtype == 0:
            pos += left_in_block  # zero padding at the end of a block
            continue
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if rtype == FULL:
            out.append(payload)
        elif rtype == FIRST:
            pending = payload
        elif rtype == MIDDLE:
            pending += payload
        elif rtype == LAST:
            out.append(pending + payload)
            pending = b""
    return out


def records(run_dir: Path) -> list:
    """All records of all offline runs under ``run_dir/wandb``."""
    from wandb.proto import wandb_internal_pb2

    recs = []
    for f in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        for p in read_payloads(f):
            r = wandb_internal_pb2.Record()
            r.ParseFromString(p)
            recs.append(r)
    return recs


def history(run_dir: Path) -> list[dict]:
    """Logged history rows (key -> decoded JSON value)."""
    rows = []
    for r in records(run_dir):
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


def run_ids(run_dir: Path) -> set[str]:
    """The W&B run ids recorded."""
    return {r.run.run_id for r in records(run_dir) if r.WhichOneof("record_type") == "run"}


def parse(payload: bytes):
    """One record payload as a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    r = wandb_internal_pb2.Record()
    r.ParseFromString(payload)
    return r
