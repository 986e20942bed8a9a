"""``tessera data inspect`` / ``verify`` on a real (emoji) dataset, including corrupted shards."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from tessera.data_pipeline.cli import main
from tessera.data_pipeline.ingest import IngestConfig, run_ingest
from tessera.config import from_dict


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """30 emoji in 2 shards, ingested with the local executor."""
    out = tmp_path_factory.mktemp("iv") / "emoji"
    cfg = from_dict(IngestConfig, {
        "sources": [{"name": "emoji", "limit": 30}], "output": str(out), "samples_per_shard": 16,
        "executor": "local", "process": {"buckets": {"base_resolution": 64, "multiple": 16}},
    }, "test")  # fmt: skip
    run_ingest(cfg)
    return out


@pytest.fixture
def copy(dataset, tmp_path) -> Path:
    """A private copy of the dataset that a test may damage."""
    dst = tmp_path / "copy"
    shutil.copytree(dataset, dst)
    return dst


def test_inspect_prints_totals_reasons_buckets_and_captions(dataset, capsys):
    assert main(["data", "inspect", str(dataset), "--captions", "3"]) == 0
    out = capsys.readouterr().out
    m = json.loads((dataset / "manifest.json").read_text())
    assert f"input {m['totals']['input']}" in out and "rejected by reason:" in out
    for bucket in m["buckets"]:
        assert bucket in out
    assert "sample captions (shards/00000.tar):" in out and out.count(" emoji") >= 3


def test_verify_ok(dataset, capsys):
    assert main(["data", "verify", str(dataset)]) == 0
    assert "verify OK: 2 shards" in capsys.readouterr().out


def test_verify_names_a_shard_with_a_flipped_byte(copy, capsys):
    shard = copy / "shards" / "00001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["data", "verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "shards/00001.tar: sha256/size mismatch" in err and "00000.tar" not in err


def test_verify_checks_members_even_when_the_hash_matches(copy, capsys):
    """A shard rewritten without one caption (manifest updated to match) is still caught."""
    shard = copy / "shards" / "00000.tar"
    buf = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        dropped = None
        for info in src:
            if info.name.endswith(".txt") and dropped is None:
                dropped = info.name
                continue
            dst.addfile(info, src.extractfile(info))
    shard.write_bytes(buf.getvalue())
    m = json.loads((copy / "manifest.json").read_text())
    m["shards"][0].update(sha256=hashlib.sha256(buf.getvalue()).hexdigest(), bytes=len(buf.getvalue()))
    (copy / "manifest.json").write_text(json.dumps(m))
    assert main(["data", "verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert f"shards/00000.tar: sample {dropped[:-4]}" in err and "missing ['txt']" in err


def test_verify_reports_truncated_and_missing_shards(copy, capsys):
    (copy / "shards" / "00000.tar").write_bytes((copy / "shards" / "00000.tar").read_bytes()[:1000])  # inside the first image
    (copy / "shards" / "00001.tar").unlink()
    assert main(["data", "verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "shards/00000.tar: unreadable tar" in err and "shards/00001.tar: missing" in err


def test_inspect_without_manifest_says_the_ingest_did_not_finish(tmp_path):
    with pytest.raises(FileNotFoundError, match="did not finish"):
        main(["data", "inspect", str(tmp_path)])


def _variant_rows(text: str) -> dict[str, list[str]]:
    """The per-variant table of ``inspect``: variant -> its columns."""
    lines = text.split("caption variants (", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return {ln.split()[0]: ln.split() for ln in lines}


def test_inspect_shows_each_caption_variant_in_tokens_with_examples(dataset, capsys):
    from tessera.data_pipeline.inspect_verify import token_counter

    assert main(["data", "inspect", str(dataset), "--captions", "2"]) == 0
    out = capsys.readouterr().out
    records = [json.loads(d) for p in sorted((dataset / "shards").glob("*.tar")) for n, d in _members(p)
               if n.endswith(".json")]
    total = len(records)
    assert f"caption variants ({total} of {total} samples scanned; lengths in minilm tokens):" in out
    count = token_counter("minilm")
    rows = _variant_rows(out)
    assert set(rows) == {"alt", "name"}
    for v in ("alt", "name"):
        n = sorted(count([r["captions"][v] for r in records]))
        assert rows[v][1:4] == [str(total), "0", f"{sum(n) / len(n):.1f}"] and rows[v][6] == str(n[-1])
    first = records[0]
    assert f"{first['key']} alt          {first['captions']['alt']!r}" in out
    assert f"name         {first['captions']['name']!r}" in out


def test_inspect_shows_recaption_verdicts_and_drops(dataset, tmp_path, capsys):
    from tessera.recaption.config import RecaptionConfig
    from tessera.recaption.run import run_recaption

    out = tmp_path / "rc"
    run_recaption(from_dict(RecaptionConfig, {
        "source": str(dataset), "output": str(out), "executor": "local",
        "captioners": [{"name": "attributes", "variant": "attributes"}],
        "filters": {"max_tokens": 20, "reject": ["too_long"]}}, "test"))
    records = [json.loads(d) for p in sorted((out / "shards").glob("*.tar")) for n, d in _members(p)
               if n.endswith(".json")]
    dropped, kept = sum(not r["caption_meta"]["attributes"]["kept"] for r in records), len(records)
    kept -= dropped
    assert 0 < dropped < kept
    assert main(["data", "inspect", str(out)]) == 0
    row = " ".join(_variant_rows(capsys.readouterr().out)["attributes"])
    assert row.startswith(f"attributes {kept} 0 ") and row.endswith(f"ok {kept}, too_long {dropped}; dropped {dropped}")


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(i.name, tar.extractfile(i).read()) for i in tar]
