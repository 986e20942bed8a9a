"""``tessera data precompute``: real offline MiniLM + identity autoencoder on a small real emoji ingest."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_st

import tessera.data_pipeline.precompute_worker as pw
from tessera.data_pipeline.cli import add_precompute_command
from tessera.data_pipeline.ingest import IngestConfig, run_ingest
from tessera.data_pipeline.inspect_verify import verify_dataset
from tessera.data_pipeline.precompute import run_precompute
from tessera.data_pipeline.precompute_config import PrecomputeConfig, PrecomputeError
from tessera.data_pipeline.precompute_worker import ShardEncoder, load_encoders
from tessera import storage
from tessera.config import ConfigError, from_dict

MINILM = {"name": "hf_encoder", "hf_encoder": {"path": "minilm", "max_length": 32}}


def make_cfg(source, output, **kw) -> PrecomputeConfig:
    """A local-executor precompute of every caption variant with MiniLM and the identity autoencoder."""
    data = {"source": str(source), "output": str(output), "text_encoder": MINILM, "autoencoder": {"name": "identity"},
            "variants": [], "batch_size": 16, "executor": "local",
            "ray": {"num_cpus": 2, "object_store_memory_mb": 200}, **kw}
    return from_dict(PrecomputeConfig, data, "test")


def tar_members(path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every member of a tar, in order."""
    with tarfile.open(path) as tar:
        return [(i.name, tar.extractfile(i).read()) for i in tar]


def shard_bytes(root: Path) -> dict[str, bytes]:
    """Every shard tar of a dataset, by file name."""
    return {p.name: p.read_bytes() for p in sorted((root / "shards").glob("*.tar"))}


@pytest.fixture(scope="module")
def source_ds(tmp_path_factory) -> Path:
    """~40 real emoji (two caption variants: alt, name) ingested into 3 shards of 32x32 images."""
    out = tmp_path_factory.mktemp("pc_src") / "ds"
    cfg = from_dict(IngestConfig, {"sources": [{"name": "emoji", "limit": 40}], "output": str(out),
                                   "samples_per_shard": 16, "executor": "local", "max_task_retries": 0,
                                   "process": {"min_side": 32, "buckets": {"base_resolution": 32, "multiple": 16}}},
                    "test")
    run_ingest(cfg)
    return out


@pytest.fixture(scope="module")
def minilm_out(source_ds, tmp_path_factory) -> tuple[Path, dict]:
    """The reference precompute (local executor) and its manifest."""
    out = tmp_path_factory.mktemp("pc_out") / "ds"
    return out, run_precompute(make_cfg(source_ds, out))


@pytest.fixture(scope="module")
def ray_runtime(ray_session):
    """The session's shared Ray runtime (tests/conftest.py)."""
    return ray_session


def test_members_shapes_and_values_match_direct_encode(source_ds, minilm_out):
    out, m = minilm_out
    text, _ = load_encoders(make_cfg(source_ds, out).text_encoder, None)
    tid = m["precompute"]["text_encoder"]
    assert tid == text.id and "." not in tid
    shards = {}
    for name in sorted(p.name for p in (source_ds / "shards").glob("*.tar")):
        src, dst = tar_members(source_ds / "shards" / name), dict(tar_members(out / "shards" / name))
        for member, data in src:  # every original member unchanged, in order, before the new ones
            assert dst[member] == data
        assert [n for n in dst if ".emb." not in n and ".latent." not in n] == [n for n, _ in src]
        keys = [n[:-5] for n, _ in src if n.endswith(".json")]
        assert len(dst) == len(src) + 3 * len(keys)  # + emb alt, emb name, latent
        shards[name] = (keys, dst)
    rows = [(key, v, json.loads(dst[f"{key}.json"])["captions"][v], dst)
            for keys, dst in shards.values() for key in keys for v in ("alt", "name")]
    ref = text.encode([c for _, _, c, _ in rows])  # one direct call: hidden (N, 32, 384), mask (N, 32)
    for r, (key, variant, _, dst) in enumerate(rows):
        t = load_st(dst[f"{key}.emb.{tid}.{variant}.safetensors"])
        n = int(ref.mask[r].sum())
        assert t["hidden"].dtype == torch.float16 and t["hidden"].shape == (n, 384)  # trimmed to valid tokens
        assert t["mask"].dtype == torch.int8 and t["mask"].tolist() == [1] * n
        torch.testing.assert_close(t["hidden"].float(), ref.hidden[r, :n], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(t["pooled"].float(), ref.pooled[r], rtol=2e-3, atol=2e-3)
    for keys, dst in shards.values():
        for key in keys:
            z = load_st(dst[f"{key}.latent.identity.safetensors"])["latent"]
            img = np.array(Image.open(io.BytesIO(dst[f"{key}.jpg"])).convert("RGB"))  # (32, 32, 3)
            expect = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, 32, 32)
            assert z.shape == (3, 32, 32) and z.dtype == torch.float16
            torch.testing.assert_close(z.float(), expect, rtol=0, atol=1e-3)
    n_samples = len(rows) // 2
    assert n_samples == m["precompute"]["samples"] == m["totals"]["written"]


def test_the_empty_prompt_embedding_is_stored_and_training_reads_it_without_the_encoder(source_ds, minilm_out,
                                                                                           monkeypatch):
    """The dataset carries ``empty.<id>.safetensors`` (the CFG unconditional input); ``Frozen.empty()`` reads it and
    never builds the text encoder, and it equals the encoder's own embedding of ""."""
    from tessera.trainer import components as C

    out, m = minilm_out
    cfg = make_cfg(source_ds, out)
    tid = m["precompute"]["text_encoder"]
    url = C.empty_url(str(out), tid)
    stored = load_st((out / f"empty.{tid}.safetensors").read_bytes())
    ref = load_encoders(cfg.text_encoder, None)[0].empty_embedding()
    torch.testing.assert_close(stored["hidden"], ref.hidden.float().cpu())
    assert stored["mask"].tolist() == ref.mask.to(torch.int8).tolist()

    def no_encoder(_cfg):
        raise AssertionError("the text encoder was built just for the empty prompt")

    monkeypatch.setattr(C, "build_text_encoder", no_encoder)
    got = C.Frozen(cfg.text_encoder, None, torch.device("cpu"), empty_url=url).empty()
    torch.testing.assert_close(got.hidden, ref.hidden.float().cpu())
    assert got.mask.dtype == torch.bool and torch.equal(got.mask, ref.mask.cpu())
    with pytest.raises(AssertionError, match="built just for the empty prompt"):  # no stored one: the encoder
        C.Frozen(cfg.text_encoder, None, torch.device("cpu"), empty_url=str(out / "nope.safetensors")).empty()


def test_manifest_lineage_caches_and_verify(source_ds, minilm_out):
    out, m = minilm_out
    src_raw = (source_ds / "manifest.json").read_bytes()
    src = json.loads(src_raw)
    assert m == json.loads((out / "manifest.json").read_text())
    assert m["format"] == "tessera-shards/1"
    assert m["lineage"] == {"source": str(source_ds), "source_manifest_sha256": hashlib.sha256(src_raw).hexdigest()}
    tid = m["precompute"]["text_encoder"]
    assert m["caches"] == {"emb": [f"{tid}.alt", f"{tid}.name"], "latent": ["identity"]}
    assert [s["name"] for s in m["shards"]] == [s["name"] for s in src["shards"]]
    assert [s["samples"] for s in m["shards"]] == [s["samples"] for s in src["shards"]]
    assert m["totals"] == src["totals"] and m["buckets"] == src["buckets"]
    n = m["totals"]["written"]
    assert m["precompute"]["emb"] == {f"{tid}.alt": n, f"{tid}.name": n}
    assert m["precompute"]["missing_caption"] == {} and m["precompute"]["failed_latent"] == {}
    for s in m["shards"]:
        stats = json.loads((out / s["name"].replace(".tar", ".stats.json")).read_text())
        assert stats["sha256"] == s["sha256"] == hashlib.sha256((out / s["name"]).read_bytes()).hexdigest()
        assert set(stats["seconds"]) == {"io", "latent", "load", "text", "total", "verify"}
    assert not (out / "_staging").exists() and m["retries"] == 0
    problems, summary = verify_dataset(str(out))
    assert problems == [] and summary["samples"] == n


def test_failed_shard_then_rerun_recomputes_only_it(source_ds, minilm_out, tmp_path, monkeypatch):
    ref_out, ref = minilm_out
    out = tmp_path / "ds"
    real_open, real_process = pw.open_verified, ShardEncoder.process

    def dies_on_shard_1(url, sha, name):  # a worker killed while reading shard 1
        if name == "shards/00001.tar":
            raise RuntimeError("simulated worker death")
        return real_open(url, sha, name)

    monkeypatch.setattr(pw, "open_verified", dies_on_shard_1)
    with pytest.raises(PrecomputeError, match="shards/00001.tar"):
        run_precompute(make_cfg(source_ds, out))
    assert not (out / "manifest.json").exists() and not (out / "shards" / "00001.tar").exists()
    assert (out / "shards" / "00002.stats.json").exists()  # the other shards finished
    monkeypatch.setattr(pw, "open_verified", real_open)

    processed: list[str] = []

    def recording(self, task):
        processed.append(task["name"])
        return real_process(self, task)

    monkeypatch.setattr(ShardEncoder, "process", recording)
    m = run_precompute(make_cfg(source_ds, out))
    assert processed == ["shards/00001.tar"]
    assert shard_bytes(out) == shard_bytes(ref_out) and m["shards"] == ref["shards"]
    assert m["retries"] == 1  # the failed attempt is counted

    # Resume after a finished run: delete one shard's stats + tar, rerun, only it is recomputed.
    (out / "shards" / "00000.stats.json").unlink()
    (out / "shards" / "00000.tar").unlink()
    processed.clear()
    m = run_precompute(make_cfg(source_ds, out))
    assert processed == ["shards/00000.tar"]
    assert shard_bytes(out) == shard_bytes(ref_out) and m["shards"] == ref["shards"]


_KILLED_RUN = """
import pathlib, sys, time
import tessera.data_pipeline.precompute as pc
from tessera.data_pipeline.precompute_worker import ShardEncoder
from tests.data_pipeline.test_precompute import make_cfg

source, out, ready = sys.argv[1:]
real_chunk = ShardEncoder._chunk

def chunk_then_hang(self, chunk, counts, declared):  # the third shard's first chunk hangs until the kill -9
    new = real_chunk(self, chunk, counts, declared)
    if pathlib.Path(out, "shards", "00001.stats.json").exists():
        pathlib.Path(ready).touch()
        time.sleep(600)
    return new

ShardEncoder._chunk = chunk_then_hang
pc.run_precompute(make_cfg(source, out))
"""


@pytest.mark.slow
def test_kill_9_mid_shard_then_rerun_gives_identical_hashes(source_ds, minilm_out, tmp_path):
    import os
    import subprocess
    import sys
    import time

    out, ready, script = tmp_path / "ds", tmp_path / "ready", tmp_path / "killed_run.py"
    script.write_text(_KILLED_RUN)
    root = Path(__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, str(script), str(source_ds), str(out), str(ready)], cwd=root, env=env)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.exists(), f"the run never reached the third shard (exit code {proc.poll()})"
    finally:
        proc.kill()  # SIGKILL: no cleanup, an open temp file is left behind
        proc.wait()
    assert not (out / "shards" / "00002.tar").exists() and not (out / "manifest.json").exists()
    m = run_precompute(make_cfg(source_ds, out))
    assert shard_bytes(out) == shard_bytes(minilm_out[0]) and m["shards"] == minilm_out[1]["shards"]
    assert verify_dataset(str(out))[0] == []
    assert m["retries"] == 1  # the killed attempt at shard 2 is counted


def test_source_mismatch_names_the_shard(source_ds, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(source_ds, src)
    tar = src / "shards" / "00002.tar"
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF  # inside the first member's data: still a readable tar, different bytes
    tar.write_bytes(bytes(data))
    with pytest.raises(PrecomputeError, match=r"shards/00002.tar.*SourceMismatch.*sha256"):
        run_precompute(make_cfg(src, tmp_path / "out"))
    assert not (tmp_path / "out" / "shards" / "00002.tar").exists()


def test_other_config_into_same_output_is_refused(source_ds, minilm_out, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(minilm_out[0], out)
    with pytest.raises(ConfigError, match="output_config_hash"):
        run_precompute(make_cfg(source_ds, out, store_dtype="fp32"))


def test_config_validation():
    with pytest.raises(ConfigError, match="output must differ"):
        make_cfg("/data/a", "/data/a/")
    with pytest.raises(ConfigError, match="bogus"):
        from_dict(PrecomputeConfig, {"source": "a", "output": "b", "bogus": 1}, "test")


def test_cli_dry_run_prints_resolved_config(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_precompute_command(parser.add_subparsers())
    cfg_file = Path(__file__).parents[2] / "configs" / "data" / "precompute_minilm.yaml"
    args = parser.parse_args(["precompute", "--config", str(cfg_file), "--dry-run", f"output={tmp_path}/o",
                              "batch_size=8"])
    with pytest.raises(SystemExit) as e:
        args.func(args)
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "batch_size: 8" in text and "path: minilm" in text and f"{tmp_path}/o" in text


def test_loader_reads_precomputed_transparently(minilm_out):
    from tessera.trainer.data import LoaderConfig, build_loader

    out, m = minilm_out
    tid = m["precompute"]["text_encoder"]
    cfg = LoaderConfig(path=str(out), batch_size=4, num_workers=0, epochs=1, shuffle_buffer=1,
                       caption_variants={"alt": 0.5, "name": 0.5}, text_encoder_id=tid, autoencoder_id="identity")
    loader = build_loader(cfg, 0, 1)
    members = {n: d for p in sorted((out / "shards").glob("*.tar")) for n, d in tar_members(p)}
    seen = 0
    for batch in loader:
        b, length = batch["text_hidden"].shape[:2]
        assert batch["text_hidden"].shape == (b, length, 384) and batch["text_mask"].shape == (b, length)
        assert batch["latent"].shape == (b, 3, 32, 32) and "image" not in batch
        for i, (key, variant) in enumerate(zip(batch["key"], batch["variant"])):
            t = load_st(members[f"{key}.emb.{tid}.{variant}.safetensors"])
            n = t["hidden"].shape[0]
            assert torch.equal(batch["text_hidden"][i, :n], t["hidden"])
            assert batch["text_mask"][i].tolist() == [1] * n + [0] * (length - n)  # re-padded per batch
            assert torch.equal(batch["latent"][i], load_st(members[f"{key}.latent.identity.safetensors"])["latent"])
        seen += b
    stats = loader.stats()
    carried = stats.get("partial_bucket_samples_carried", 0)  # the epoch's last partial batch waits for the next
    assert stats["skipped_total"] == 0 and seen + carried == m["totals"]["written"] and seen > carried
    assert set(stats["variants"]) == {"alt", "name"}


@pytest.mark.s3
def test_s3_round_trip_matches_local(source_ds, minilm_out, s3_bucket):
    for p in sorted(source_ds.rglob("*")):
        if p.is_file():
            storage.write_bytes(storage.join(s3_bucket, "src", str(p.relative_to(source_ds))), p.read_bytes())
    m = run_precompute(make_cfg(f"{s3_bucket}/src", f"{s3_bucket}/out"))
    assert m["shards"] == minilm_out[1]["shards"]
    for s in m["shards"]:
        assert storage.read_bytes(storage.join(s3_bucket, "out", s["name"])) == (minilm_out[0] / s["name"]).read_bytes()
    assert json.loads(storage.read_bytes(storage.join(s3_bucket, "out", "manifest.json")))["lineage"]["source"] \
        == f"{s3_bucket}/src"


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.long
def test_ray_actor_pool_is_byte_identical_to_local(source_ds, minilm_out, ray_runtime, tmp_path):
    m = run_precompute(make_cfg(source_ds, tmp_path / "ds", executor="ray", actors=2))
    assert shard_bytes(tmp_path / "ds") == shard_bytes(minilm_out[0]) and m["shards"] == minilm_out[1]["shards"]


def _tiny_bert(path: Path) -> None:
    """A 1-layer, 2-head x 16-dim BERT with MiniLM's tokenizer, saved as a real checkpoint dir."""
    import transformers

    from tessera.trainer.text_encoders import minilm_path

    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    tok.save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(str(path))


def test_second_encoder_keeps_the_first_caches(minilm_out, tmp_path):
    first, m1 = minilm_out
    _tiny_bert(tmp_path / "tiny")
    out = tmp_path / "ds2"
    cfg = from_dict(PrecomputeConfig, {
        "source": str(first), "output": str(out), "executor": "local", "batch_size": 16, "store_dtype": "bf16",
        "variants": ["alt"],
        "text_encoder": {"name": "hf_encoder", "hf_encoder": {"path": str(tmp_path / "tiny"), "max_length": 16}},
    }, "test")  # no autoencoder
    m2 = run_precompute(cfg)
    t1, t2 = m1["precompute"]["text_encoder"], m2["precompute"]["text_encoder"]
    assert t1 != t2
    assert m2["caches"] == {"emb": sorted([f"{t1}.alt", f"{t1}.name", f"{t2}.alt"]), "latent": ["identity"]}
    assert m2["lineage"]["source"] == str(first)
    for s in m1["shards"]:
        before, after = tar_members(first / s["name"]), dict(tar_members(out / s["name"]))
        assert all(after[n] == d for n, d in before) and len(after) == len(before) + s["samples"]
        tiny = [load_st(d) for n, d in after.items() if f".emb.{t2}.alt." in n]
        assert len(tiny) == s["samples"] and all(t["hidden"].dtype == torch.bfloat16 for t in tiny)
        assert all(t["hidden"].shape[1] == 32 and t["hidden"].shape[0] <= 16 for t in tiny)


def test_default_embeds_every_variant_present_and_counts_declared_ones_missing(source_ds, minilm_out, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(source_ds, src)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["caption_variants"] = ["alt", "vlm_long"]  # as a recaption declares the variants it wrote
    (src / "manifest.json").write_text(json.dumps(manifest))
    cfg = from_dict(PrecomputeConfig, {"source": str(src), "output": str(tmp_path / "out"), "text_encoder": MINILM,
                                       "executor": "local", "batch_size": 16}, "test")
    assert cfg.variants == []  # the default: `precompute` after `recaption` embeds the new variants unasked
    m = run_precompute(cfg)
    tid, n = m["precompute"]["text_encoder"], m["totals"]["written"]
    assert m["precompute"]["emb"] == {f"{tid}.alt": n, f"{tid}.name": n}  # name: present in every sample
    assert m["precompute"]["missing_caption"] == {"vlm_long": n}  # declared, absent: counted
    assert m["caption_variants"] == ["alt", "vlm_long"]
