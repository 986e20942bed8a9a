"""Ingest from webdataset tars in S3 into an S3 output, then inspect/verify it on S3 (loopback moto)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from tessera.data_pipeline.cli import main
from tessera.data_pipeline.executors import LocalExecutor
from tessera.data_pipeline.ingest import IngestConfig, run_ingest
from tessera.data_pipeline.shards import read_rejects
from tessera import storage
from tessera.config import from_dict

pytestmark = pytest.mark.s3


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    """A blocky random colour image: distinct seeds give far-apart pHashes."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize(size, Image.Resampling.BILINEAR).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _tar(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def s3_input(s3_bucket) -> tuple[str, int]:
    """Two webdataset tars under s3://bucket/input with a cross-tar duplicate and a sample without image."""
    first = [(f"a{i:03d}", {"jpg": _jpeg(i, (160 + 8 * i, 120)), "txt": f"pattern number {i}".encode(),
                            "json": json.dumps({"license": "cc0"}).encode()}) for i in range(10)]  # fmt: skip
    second = [(f"b{i:03d}", {"jpg": _jpeg(100 + i, (120, 200)), "txt": f"tall pattern {i}".encode()}) for i in range(8)]
    second.append(("b_dup", {"jpg": first[3][1]["jpg"], "txt": b"a copy"}))
    second.append(("b_noimg", {"txt": b"caption without an image"}))
    storage.write_bytes(f"{s3_bucket}/input/part-000.tar", _tar(first))
    storage.write_bytes(f"{s3_bucket}/input/part-001.tar", _tar(second))
    return s3_bucket, len(first) + len(second)


def test_s3_in_s3_out_inspect_verify_and_corruption(s3_input, s3_server, capsys):
    bucket, n_in = s3_input
    out = f"{bucket}/datasets/ds"
    cfg = from_dict(IngestConfig, {
        "sources": [{"name": "webdataset", "path": f"{bucket}/input"}], "output": out, "executor": "local",
        "process": {"min_side": 64, "buckets": {"base_resolution": 64, "multiple": 16}},
        "storage": {"endpoint_url": s3_server},
    }, "test")  # fmt: skip
    m = run_ingest(cfg)
    assert [s["name"] for s in m["shards"]] == ["shards/00000.tar", "shards/00001.tar"]
    assert m["totals"] == {"input": n_in, "written": n_in - 2, "rejected": 2}
    assert m["reasons"] == {"duplicate": 1, "no_image": 1}
    listed = storage.list_prefix(out)
    assert not [u for u in listed if "/_staging/" in u]
    assert f"{out}/manifest.json" in listed and f"{out}/shards/00001.stats.json" in listed
    rej = read_rejects(f"{out}/rejects/00001.parquet")
    assert sorted(r["reason"] for r in rej) == ["duplicate", "no_image"]
    assert all(r["path"].startswith(f"{bucket}/input/part-001.tar#") for r in rej)

    class Counting(LocalExecutor):
        ran = 0

        def map(self, fn, tasks):
            Counting.ran += len(tasks)
            return super().map(fn, tasks)

    assert run_ingest(cfg, executor=Counting())["shards"] == m["shards"]  # rerun: everything skipped
    assert Counting.ran == 0

    assert main(["data", "inspect", out]) == 0
    shown = capsys.readouterr().out
    assert f"input {n_in}" in shown and "'pattern number 0'" in shown
    assert all(f" {b} " in shown for b in m["buckets"]) and len(m["buckets"]) >= 2
    assert main(["data", "verify", out]) == 0
    assert "verify OK: 2 shards" in capsys.readouterr().out

    data = bytearray(storage.read_bytes(f"{out}/shards/00001.tar"))
    data[700] ^= 0x01
    storage.write_bytes(f"{out}/shards/00001.tar", bytes(data))
    assert main(["data", "verify", out]) == 1
    bad = [line for line in capsys.readouterr().err.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 1 and bad[0].startswith("BAD shards/00001.tar: sha256/size mismatch")
