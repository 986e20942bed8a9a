"""``tessera data recaption`` end to end on a real emoji ingest with tiny random VLMs (Qwen2-VL chat, BLIP plain)
and the weight-free ``attributes`` captioner: the derived dataset, provenance, counts, resume and refusals."""

from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from tessera.config import ConfigError
from tessera.data_pipeline.inspect_verify import verify_dataset
from tessera.recaption.run import RecaptionError, run_recaption
from tessera.recaption.worker import ShardCaptioner
from tests.recaption.conftest import blip_captioner, make_cfg, qwen_captioner

ATTRIBUTES = {"name": "attributes", "variant": "attributes"}
NEW = ("vlm_short", "blip", "attributes")


def captioners(qwen: Path, blip: Path) -> list[dict]:
    return [qwen_captioner(qwen), blip_captioner(blip), ATTRIBUTES]


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(i.name, tar.extractfile(i).read()) for i in tar]


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "shards").glob("*.tar"))}


def records(root: Path) -> dict[str, dict]:
    """Every sample's KEY.json, by key, across the dataset (a key seen twice fails)."""
    out: dict[str, dict] = {}
    for p in sorted((root / "shards").glob("*.tar")):
        for name, data in tar_members(p):
            if name.endswith(".json"):
                assert name[:-5] not in out, f"{name} appears twice"
                out[name[:-5]] = json.loads(data)
    return out


@pytest.fixture(scope="module")
def local_out(emoji_ds, tiny_qwen, tiny_blip, tmp_path_factory) -> tuple[Path, dict]:
    """The reference recaption (local executor) and its manifest."""
    out = tmp_path_factory.mktemp("rc_out") / "ds"
    return out, run_recaption(make_cfg(emoji_ds, out, captioners(tiny_qwen, tiny_blip)))


def test_every_source_sample_once_with_its_members_and_alt_unchanged(emoji_ds, local_out):
    out, _ = local_out
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == \
        sorted(p.name for p in (emoji_ds / "shards").glob("*.tar"))
    for src_tar in sorted((emoji_ds / "shards").glob("*.tar")):
        src, dst = tar_members(src_tar), tar_members(out / "shards" / src_tar.name)
        assert [n for n, _ in dst] == [n for n, _ in src]  # same members, same order
        for (name, before), (_, after) in zip(src, dst):
            if not name.endswith(".json"):
                assert after == before  # image and KEY.txt byte for byte
                continue
            old, new = json.loads(before), json.loads(after)
            assert {k: new[k] for k in old if k != "captions"} == {k: v for k, v in old.items() if k != "captions"}
            assert {v: new["captions"][v] for v in old["captions"]} == old["captions"]  # alt (and name) unchanged
            assert set(new["caption_meta"]) == set(NEW)
    assert set(records(out)) == set(records(emoji_ds))  # each key exactly once


def test_provenance_and_verdicts_per_caption(local_out, tiny_qwen):
    out, _ = local_out
    for key, r in records(out).items():
        for v in NEW:
            meta = r["caption_meta"][v]
            assert meta["kept"] == (v in r["captions"]) == (meta["verdict"] == "ok")
            assert {"captioner", "seed", "attempts", "tokens", "text_tokens", "finish_reason", "verdict"} <= set(meta)
        q = r["caption_meta"]["vlm_short"]
        assert (q["captioner"], q["model"]) == ("hf", str(tiny_qwen)) and q["weights"].startswith("sha256:")
        assert q["sampling"]["max_new_tokens"] == 10 and len(q["prompt_sha256"]) == 16
        assert q["finish_reason"] in ("stop", "length") and q["tokens"] <= 10
        if q["attempts"] == 2:  # rejected once, generated again at the retry temperature
            assert q["first_verdict"] != "ok"
        a = r["caption_meta"]["attributes"]
        assert a["attempts"] == 1 and a["measured"]["background"] == "white"  # deterministic: never retried
        assert r["captions"]["attributes"].startswith(r["captions"]["alt"] + ", ")


def test_manifest_counts_lineage_throughput_and_verify(emoji_ds, local_out):
    out, m = local_out
    src = json.loads((emoji_ds / "manifest.json").read_text())
    assert m == json.loads((out / "manifest.json").read_text())
    assert m["lineage"]["source"] == str(emoji_ds) and m["totals"] == src["totals"]
    assert [(s["name"], s["samples"]) for s in m["shards"]] == [(s["name"], s["samples"]) for s in src["shards"]]
    assert m["caption_variants"] == sorted(["alt", *NEW])
    r = m["recaption"]
    counted = {v: Counter() for v in NEW}
    for rec in records(out).values():
        for v, meta in rec["caption_meta"].items():
            counted[v]["written" if meta["kept"] else "dropped"] += 1
            counted[v][f"verdict_{meta['verdict']}"] += 1
            counted[v]["retried"] += meta["attempts"] - 1
    for v in NEW:
        assert {k: r["variants"][v].get(k, 0) for k in counted[v]} == dict(counted[v])
    assert r["variants"]["attributes"]["written"] == src["totals"]["written"]
    assert sum(r["variants"]["vlm_short"].get(k, 0) for k in ("written", "dropped")) == src["totals"]["written"]
    assert r["variants"]["vlm_short"]["retried"] > 0  # the random model's captions run to max_new_tokens
    assert [c["variant"] for c in r["captioners"]] == list(NEW)
    assert r["throughput"]["per_actor"]["local"]["images"] == src["totals"]["written"]
    assert r["throughput"]["images_per_s"] > 0 and r["throughput"]["tokens_per_s"] > 0
    assert not (out / "_staging").exists()
    assert verify_dataset(str(out))[0] == []


def test_rerun_skips_finished_shards_and_another_job_is_refused(emoji_ds, local_out, tiny_qwen, tiny_blip, tmp_path,
                                                                 monkeypatch):
    ref, m_ref = local_out
    out = tmp_path / "ds"
    shutil.copytree(ref, out)
    (out / "shards" / "00001.stats.json").unlink()
    (out / "shards" / "00001.tar").unlink()
    processed: list[str] = []
    real = ShardCaptioner.process

    def recording(self, task):
        processed.append(task["name"])
        return real(self, task)

    monkeypatch.setattr(ShardCaptioner, "process", recording)
    m = run_recaption(make_cfg(emoji_ds, out, captioners(tiny_qwen, tiny_blip)))
    assert processed == ["shards/00001.tar"] and shard_bytes(out) == shard_bytes(ref) and m["shards"] == m_ref["shards"]

    other_prompt = [qwen_captioner(tiny_qwen, prompt="What is in the picture?"), blip_captioner(tiny_blip), ATTRIBUTES]
    with pytest.raises(ConfigError, match=r"another job fingerprint.*differs in captioners\.vlm_short"):
        run_recaption(make_cfg(emoji_ds, out, other_prompt))
    with pytest.raises(ConfigError, match=r"differs in .*filters"):
        run_recaption(make_cfg(emoji_ds, out, captioners(tiny_qwen, tiny_blip), filters={"max_tokens": 20}))


def test_a_variant_the_source_has_needs_overwrite(local_out, tmp_path):
    src, _ = local_out
    with pytest.raises(RecaptionError, match=r"already has caption variant\(s\) \['attributes'\].*overwrite"):
        run_recaption(make_cfg(src, tmp_path / "a", [ATTRIBUTES]))
    parts = {"name": "attributes", "variant": "attributes", "attributes": {"parts": ["orientation"]}}
    m = run_recaption(make_cfg(src, tmp_path / "b", [parts], overwrite=True))
    assert m["recaption"]["variants"]["attributes"]["written"] == m["totals"]["written"]
    for key, r in records(tmp_path / "b").items():
        assert r["captions"]["attributes"] == r["captions"]["alt"] + ", square format"
        assert r["captions"]["vlm_short" if "vlm_short" in r["captions"] else "alt"]  # earlier variants kept


def test_a_damaged_source_shard_fails_alone_and_is_named(emoji_ds, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(emoji_ds, src)
    tar = src / "shards" / "00002.tar"
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(RecaptionError, match=r"(?s)1 of 3 shard\(s\) failed.*shards/00002.tar.*SourceMismatch"):
        run_recaption(make_cfg(src, tmp_path / "out", [ATTRIBUTES]))
    out = tmp_path / "out"
    assert (out / "shards" / "00001.stats.json").exists()
    assert not (out / "shards" / "00002.tar").exists() and not (out / "manifest.json").exists()


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.ray
def test_ray_actor_pools_give_the_local_bytes(emoji_ds, local_out, tiny_qwen, tiny_blip, ray_session, tmp_path):
    ref, m_ref = local_out
    caps = captioners(tiny_qwen, tiny_blip)
    # Two actors, batches decoded and preprocessed by Ray CPU tasks (the GPU layout) ...
    m = run_recaption(make_cfg(emoji_ds, tmp_path / "two", caps, executor="ray", actors=2, prepare_on="tasks"))
    assert shard_bytes(tmp_path / "two") == shard_bytes(ref) and m["shards"] == m_ref["shards"]
    assert set(m["recaption"]["throughput"]["per_actor"]) <= {"actor-0", "actor-1"}
    # ... and one actor preparing batches in its own thread (the CPU-only default).
    m = run_recaption(make_cfg(emoji_ds, tmp_path / "one", caps, executor="ray", actors=1))
    assert shard_bytes(tmp_path / "one") == shard_bytes(ref) and set(m["recaption"]["throughput"]["per_actor"]) == \
        {"actor-0"}


_KILLED_RUN = """
import json, pathlib, sys, time
from tessera.config import from_dict
from tessera.recaption.config import RecaptionConfig
from tessera.recaption.run import run_recaption
from tessera.recaption.worker import ShardCaptioner

cfg_file, ready = sys.argv[1:]
cfg = from_dict(RecaptionConfig, json.loads(pathlib.Path(cfg_file).read_text()), cfg_file)
real_window = ShardCaptioner._window

def window_then_hang(self, window, counts):  # the second shard hangs mid-write until the kill -9
    out = real_window(self, window, counts)
    if pathlib.Path(cfg.output, "shards", "00000.stats.json").exists():
        pathlib.Path(ready).touch()
        time.sleep(600)
    return out

ShardCaptioner._window = window_then_hang
run_recaption(cfg)
"""


@pytest.mark.slow
def test_kill_9_of_the_driver_then_rerun_gives_the_same_bytes(emoji_ds, local_out, tiny_qwen, tiny_blip, tmp_path):
    import os
    import subprocess
    import sys
    import time

    from tessera.config import to_dict

    ref, m_ref = local_out
    out, ready, script, cfg_file = tmp_path / "ds", tmp_path / "ready", tmp_path / "run.py", tmp_path / "cfg.json"
    cfg = make_cfg(emoji_ds, out, captioners(tiny_qwen, tiny_blip))
    cfg_file.write_text(json.dumps(to_dict(cfg)))
    script.write_text(_KILLED_RUN)
    root = Path(__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, str(script), str(cfg_file), str(ready)], cwd=root, env=env)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.exists(), f"the run never reached the second shard (exit code {proc.poll()})"
    finally:
        proc.kill()  # SIGKILL: no cleanup; the second shard's temp file is left behind
        proc.wait()
    assert (out / "shards" / "00000.stats.json").exists() and not (out / "shards" / "00001.tar").exists()
    assert not (out / "manifest.json").exists()
    m = run_recaption(cfg)
    assert shard_bytes(out) == shard_bytes(ref) and m["shards"] == m_ref["shards"]
    assert m["retries"] == 1 and not list((out / "shards").glob(".*tessera-tmp"))
    assert verify_dataset(str(out))[0] == []
