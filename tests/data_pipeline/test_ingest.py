"""End-to-end ingest with the local executor: manifest, accounting, dedup, rerun and kill -9 resume."""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tessera.data_pipeline.executors import LocalExecutor
from tessera.data_pipeline.ingest import IngestConfig, run_ingest
from tessera.data_pipeline.shards import read_rejects
from tessera.config import ConfigError, from_dict

REPO = Path(__file__).resolve().parents[2]
CLIPART = "/usr/share/openclipart/png"
N_REAL, PER_SHARD = 40, 16


def _pick_distinct_clipart(n: int) -> list[Path]:
    """n small real clip-art PNGs whose pHashes are far apart (so only planted duplicates collide)."""
    from tessera.data_pipeline.phash import hamming, phash

    files = sorted(p for p in Path(CLIPART).rglob("*.png") if 6000 < p.stat().st_size < 30000)
    chosen, hashes = [], []
    for p in files[::37]:
        with Image.open(p) as im:
            if min(im.size) < 96 or max(im.size) / min(im.size) > 3:
                continue
            rgb = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA")).convert("RGB")
        h = phash(rgb)
        if all(hamming(h, o) > 12 for o in hashes):
            chosen.append(p)
            hashes.append(h)
        if len(chosen) == n:
            return chosen
    raise AssertionError("not enough distinct clip art")


def _jpeg_of(png: Path, quality: int = 80) -> bytes:
    with Image.open(png) as im:
        rgb = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA")).convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_folder(root: Path) -> dict[str, str | None]:
    """A folder dataset: 40 real images, then 16 planted rejects that fill the last shard entirely.

    Returns the expected outcome per source id: None (written) or the reject reason.
    """
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    real = _pick_distinct_clipart(N_REAL)

    def put(name: str, data: bytes, caption: bytes | None, outcome: str | None) -> None:
        (root / name).write_bytes(data)
        if caption is not None:
            (root / name).with_suffix(".txt").write_bytes(caption)
        expected[f"folder:{name}"] = outcome

    for i, p in enumerate(real):
        put(f"a{i:02d}.png", p.read_bytes(), f"a clip art of {p.stem.replace('_', ' ')}".encode(), None)
    for j, i in enumerate([0, 3, 7, 12, 19, 25, 33, 39]):  # exact copies, spread over every shard
        put(f"z{j:02d}_dup.png", real[i].read_bytes(), b"a copy", "duplicate")
    put("z08_near.jpg", _jpeg_of(real[10]), b"a re-encoded copy", "near_duplicate")
    put("z09_near.jpg", _jpeg_of(real[21], 70), b"another re-encoded copy", "near_duplicate")
    put("z10_bad.jpg", b"this is not an image" * 10, b"garbage", "not_an_image")
    put("z11_bad.png", os.urandom(500), b"noise", "not_an_image")
    tiny = io.BytesIO()
    Image.new("RGB", (10, 12), "red").save(tiny, "PNG")
    put("z12_tiny.png", tiny.getvalue(), b"a tiny red square", "too_small")
    put("z13_trunc.png", real[15].read_bytes()[:2000], b"a truncated file", "*")  # any reject reason
    put("z14_empty.png", real[5].read_bytes(), b"   \n", "caption_empty")
    put("z15_nocap.png", real[6].read_bytes(), None, "caption_missing")
    return expected


def make_config(src: Path | str, out: Path | str, **kw) -> IngestConfig:
    """A small local-executor ingest config for the folder dataset."""
    data = {
        "sources": [{"name": "folder", "path": str(src)}],
        "output": str(out),
        "samples_per_shard": PER_SHARD,
        "executor": "local",
        "max_task_retries": 0,
        "process": {"min_side": 32, "buckets": {"base_resolution": 64, "multiple": 16}, "quality": 85},
        **kw,
    }
    return from_dict(IngestConfig, data, "test")


def tar_samples(path: str) -> dict[str, dict]:
    """key -> parsed KEY.json of every sample in a shard (checking the three members exist)."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            members.setdefault(key, {})[ext] = tar.extractfile(info).read()
    for key, m in members.items():
        assert set(m) == {"jpg", "txt", "json"}, (key, sorted(m))
    return {k: json.loads(m["json"]) for k, m in members.items()}


def outputs(out: Path) -> dict[str, bytes]:
    """Every shard tar and rejects parquet, by relative name (for byte comparisons)."""
    files = sorted(glob.glob(str(out / "shards" / "*.tar")) + glob.glob(str(out / "rejects" / "*.parquet")))
    return {os.path.relpath(f, out): Path(f).read_bytes() for f in files}


def check_dataset(out: Path, expected: dict[str, str | None]) -> dict:
    """Assert the manifest, accounting and per-input outcomes; return the manifest."""
    m = json.loads((out / "manifest.json").read_text())
    n_in = len(expected)
    n_shards = -(-n_in // PER_SHARD)
    assert m["format"] == "tessera-shards/1" and m["tessera_version"]
    assert [s["name"] for s in m["shards"]] == [f"shards/{i:05d}.tar" for i in range(n_shards)]
    assert m["totals"]["input"] == n_in == m["totals"]["written"] + m["totals"]["rejected"]
    assert sum(m["reasons"].values()) == m["totals"]["rejected"]
    assert sum(m["buckets"].values()) == m["totals"]["written"]
    assert not (out / "_staging").exists()
    seen: dict[str, str | None] = {}
    for s in m["shards"]:
        tar = out / s["name"]
        assert s["bytes"] == tar.stat().st_size
        samples = tar_samples(str(tar))
        assert len(samples) == s["samples"]
        stats = json.loads(tar.with_suffix(".stats.json").read_text())
        assert stats["input"] == stats["written"] + stats["rejected"] == s["input"]
        for meta in samples.values():
            assert meta["source_id"] not in seen
            seen[meta["source_id"]] = None
        rej = read_rejects(str(out / "rejects" / (Path(s["name"]).stem + ".parquet")))
        assert len(rej) == stats["rejected"]
        for row in rej:
            assert row["source_id"] not in seen and row["path"].startswith("/")
            seen[row["source_id"]] = row["reason"]
    assert set(seen) == set(expected)  # every input exactly once
    for sid, want in expected.items():
        assert seen[sid] == want or (want == "*" and seen[sid] is not None), (sid, seen[sid], want)
    assert m["shards"][-1]["samples"] == 0  # the all-rejected shard is still recorded
    return m


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict]:
    """The shared input folder and its expected outcomes."""
    root = tmp_path_factory.mktemp("folder_src")
    return root, make_folder(root)


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted local run that other tests compare against."""
    out = tmp_path_factory.mktemp("ref") / "ds"
    manifest = run_ingest(make_config(folder[0], out))
    return out, manifest


def test_end_to_end_manifest_and_accounting(folder, reference):
    out, manifest = reference
    m = check_dataset(out, folder[1])
    assert m["shards"] == manifest["shards"]
    assert m["reasons"]["duplicate"] == 8 and m["reasons"]["near_duplicate"] == 2
    assert m["totals"] == {"input": 56, "written": 40, "rejected": 16}
    assert m["retries"] == 0
    assert m["source_config_hash"] and m["config"]["samples_per_shard"] == PER_SHARD
    one = next(iter(tar_samples(str(out / "shards/00000.tar")).values()))
    assert {"key", "source", "source_id", "path", "orig_size", "bucket", "sha256", "phash", "captions"} <= set(one)


class _CountingExecutor(LocalExecutor):
    """Local executor that records every task it runs and can run them in a chosen order."""

    def __init__(self, reverse: bool = False) -> None:
        super().__init__(0)
        self.reverse, self.ran = reverse, []

    def map(self, fn, tasks):
        tasks = list(reversed(tasks)) if self.reverse else tasks
        self.ran += [(fn.__name__, t["index"]) for t in tasks]
        return super().map(fn, tasks)


def test_rerun_skips_finished_shards(folder, reference):
    out, _ = reference
    before = {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    ex = _CountingExecutor()
    m = run_ingest(make_config(folder[0], out), executor=ex)
    assert ex.ran == []  # nothing re-run
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == before
    assert m["shards"] == reference[1]["shards"]


def test_dedup_is_independent_of_task_order(folder, reference, tmp_path):
    ex = _CountingExecutor(reverse=True)
    m = run_ingest(make_config(folder[0], tmp_path / "ds"), executor=ex)
    assert ex.ran[0] == ("stage_partition", 3)  # really processed in reverse
    ref = reference[1]
    assert (m["shards"], m["totals"], m["reasons"], m["buckets"]) == (
        ref["shards"], ref["totals"], ref["reasons"], ref["buckets"])  # fmt: skip
    assert outputs(tmp_path / "ds") == outputs(reference[0])


def test_changed_config_is_refused_on_resume(folder, reference):
    with pytest.raises(ConfigError, match="different config"):
        run_ingest(make_config(folder[0], reference[0], samples_per_shard=8))


_KILLABLE = textwrap.dedent("""
    import sys, time
    import tessera.data_pipeline.ingest as ing
    from tessera.data_pipeline.cli import main
    phase, mark = sys.argv[2], ing._mark_attempt
    def slow_mark(out, n, ph):
        mark(out, n, ph)
        if ph == phase:
            time.sleep(0.5)  # each task pauses mid-way, so the kill lands inside a task
    ing._mark_attempt = slow_mark
    sys.exit(main(["data", "ingest", "--config", sys.argv[1]]))
""")


@pytest.mark.parametrize("phase,marker", [("stage", "_staging/*.hashes.json"), ("finalize", "shards/*.stats.json")])
def test_kill_9_then_rerun_reproduces_shards(folder, reference, tmp_path, phase, marker):
    out = tmp_path / "ds"
    cfg_file = tmp_path / "ingest.yaml"
    cfg_file.write_text(yaml.safe_dump({**_plain(make_config(folder[0], out))}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(cfg_file), phase], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not glob.glob(str(out / marker)):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "ingest subprocess made no progress"
        time.sleep(0.02)
    time.sleep(0.2)  # the next task has started and is paused mid-way
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    done_before = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.stats.json")}
    m = run_ingest(make_config(folder[0], out))
    assert [(s["name"], s["sha256"]) for s in m["shards"]] == [(s["name"], s["sha256"]) for s in reference[1]["shards"]]
    assert outputs(out) == outputs(reference[0])
    for p, mtime in done_before.items():  # finished shards were skipped, not redone
        assert p.stat().st_mtime_ns == mtime
    assert m["retries"] >= 1  # the killed attempt is counted
    check_dataset(out, folder[1])


def _plain(cfg: IngestConfig) -> dict:
    from tessera.config import to_dict

    return to_dict(cfg)


def test_cli_dry_run_and_shipped_configs(capsys):
    from tessera.data_pipeline.cli import main
    from tessera.config import load_config

    for name in ("emoji", "openclipart", "quickstart", "urls_example"):
        cfg = load_config(IngestConfig, REPO / "configs" / "data" / f"{name}.yaml")
        assert cfg.ray.dashboard_host == "127.0.0.1" and not cfg.ray.include_dashboard
    with pytest.raises(SystemExit) as e:
        main(["data", "ingest", "--config", str(REPO / "configs/data/quickstart.yaml"), "--dry-run", "executor=local"])
    assert e.value.code == 0
    assert "executor: local" in capsys.readouterr().out


def test_shipped_quickstart_runs_on_real_sources(tmp_path):
    """The quickstart config (emoji + openclipart) end to end, with small limits."""
    from tessera.config import load_config

    cfg = load_config(IngestConfig, REPO / "configs/data/quickstart.yaml",
                      [f"output={tmp_path / 'qs'}", "executor=local", "samples_per_shard=20"])
    for s in cfg.sources:
        s.limit = 20
    m = run_ingest(cfg)
    assert m["totals"]["input"] == 40 and len(m["shards"]) == 2
    assert m["totals"]["written"] + m["totals"]["rejected"] == 40 and m["totals"]["written"] > 20
    shutil.rmtree(tmp_path / "qs")


def _brute_force(cands, d):
    kept, drops = [], {}
    for c in sorted(cands, key=lambda c: (c.partition, c.position)):
        hit = next((k for k in kept if (k.phash ^ c.phash).bit_count() <= d), None)
        if hit is not None:
            drops[(c.partition, c.position)] = hit.key
        else:
            kept.append(c)
    return drops


@pytest.mark.parametrize("d", [0, 4, 8])
def test_band_index_matches_brute_force_and_ignores_order(d):
    import random

    from tessera.data_pipeline.dedup import Candidate, DedupConfig, decide

    rng = random.Random(d)
    centers = [rng.getrandbits(64) for _ in range(40)]
    cands = []
    for i in range(600):  # clusters of noisy copies: flips of 0..d+2 bits around random centres
        h = rng.choice(centers)
        for b in rng.sample(range(64), rng.randint(0, d + 2)):
            h ^= 1 << b
        cands.append(Candidate(partition=i // 50, position=i % 50, key=f"k{i}", sha256=f"s{i}", phash=h))
    cfg = DedupConfig(exact=True, near=True, phash_max_distance=d)
    got = decide(cands, cfg)
    assert {w: r for w, (r, _) in got.items()} == {w: "near_duplicate" for w in _brute_force(cands, d)}
    rng.shuffle(cands)
    assert decide(cands, cfg) == got


def test_exact_duplicates_and_key_collisions():
    from tessera.data_pipeline.dedup import Candidate, DedupConfig, decide

    c = [Candidate(partition=1, position=0, key="a", sha256="x", phash=0),
         Candidate(partition=0, position=5, key="b", sha256="x", phash=2**64 - 1),
         Candidate(partition=2, position=0, key="b", sha256="y", phash=12345)]
    drops = decide(c, DedupConfig(near=False))
    assert drops == {(1, 0): ("duplicate", "same sha256 as b"), (2, 0): ("duplicate", "same key as an earlier sample: b")}
