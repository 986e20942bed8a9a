"""``tessera quickstart`` shortened for CI: every stage for real (Ray ingest of real emoji + clip art, MiniLM
precompute, 2-rank DeepSpeed ZeRO-2 training, Inception FID, report, W&B offline) on a 300-image subset with
a 0.6-minute training budget; then a rerun, which must resume (skip every finished stage) instead of starting over."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quickstart(out: Path, configs: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TESSERA_NO_PROGRESS": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    env.pop("WANDB_API_KEY", None)
    cmd = [sys.executable, "-m", "tessera.cli", "quickstart", "--minutes", "0.6", "--subset", "300", "--nproc", "2",
           "--out", str(out), "--configs", str(configs)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def _train_keys(dataset: Path) -> set[str]:
    keys = set()
    for shard in sorted((dataset / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys |= {m.name.split(".", 1)[0] for m in tar.getmembers()}
    return keys


@pytest.mark.slow
def test_quickstart_short_run_learns_reports_and_resumes(tmp_path):
    # The shipped configs, with two training segments instead of three: one process launch less (~20 s).
    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs" / "quickstart", configs)
    (configs / "eval.yaml").write_text((configs / "eval.yaml").read_text().replace("segments: 3", "segments: 2"))
    for name in ("data.yaml", "recaption.yaml", "precompute.yaml", "train.yaml"):  # their `base:` paths are relative
        text = (configs / name).read_text().replace("base: ../", f"base: {ROOT / 'configs'}/")
        (configs / name).write_text(text)
    # A log line every 3 steps instead of 20: enough of them for the loss check in a 0.6-minute run, also on a
    # loaded machine (40 steps in a fresh clone's suite beside a 4-rank run gave 4 lines at every 10).
    train_yaml = (configs / "train.yaml").read_text()
    assert "log_every_samples: 640" in train_yaml
    (configs / "train.yaml").write_text(train_yaml.replace("log_every_samples: 640", "log_every_samples: 96"))
    out = tmp_path / "qs"
    proc = _quickstart(out, configs)

    state = json.loads((out / "quickstart.json").read_text())
    assert list(state["stages"]) == ["ingest", "split", "recaption", "precompute", "step0", "train", "final"]
    assert state["stages"]["ingest"]["totals"]["input"] == 300
    assert len(state["stages"]["ingest"]["buckets"]) >= 3, state["stages"]["ingest"]["buckets"]

    # Held-out images are real files and were never trained on.
    held = [json.loads(line) for line in (out / "data" / "holdout" / "index.jsonl").read_text().splitlines()]
    assert held and all(Path(h["file"]).is_file() for h in held)
    train_keys = _train_keys(out / "data" / "train_minilm")
    assert train_keys and not {h["key"] for h in held} & train_keys

    # The recaption stage captioned every training sample; precompute embedded both variants; training drew both.
    rec = state["stages"]["recaption"]
    att = rec["variants"]["attributes"]  # every sample accounted for: captioned, or dropped by a filter (counted)
    assert att["written"] > 0.9 * state["stages"]["split"]["train"]
    assert att["written"] + att["dropped"] == state["stages"]["split"]["train"] == rec["samples"]
    manifest = json.loads((out / "data" / "train_minilm" / "manifest.json").read_text())
    assert set(manifest["caption_variants"]) >= {"alt", "attributes"}
    assert "caption_variants:\n    alt: 0.3\n    attributes: 0.7" in (out / "configs" / "train.yaml").read_text()

    # Training ran in two segments, the second resuming the first; a grid at step 0 and after each.
    steps = [s["step"] for s in state["segments"]]
    assert len(steps) == 2 and 0 < steps[0] < steps[1]
    samples_dir = out / "runs" / "train" / "samples"
    for step in [0, *steps]:
        assert (samples_dir / f"step_{step:09d}.png").stat().st_size > 1000

    # The loss went down: mean of the last quarter of the logged windows vs the first quarter.
    rows = [json.loads(line) for line in (out / "runs" / "train" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]  # the quickstart adds one row of its own (FIDs, timings)
    losses = [r["loss"] for r in train_rows]
    k = max(2, len(losses) // 4)
    assert len(losses) >= 6, losses
    assert sum(losses[-k:]) / k < 0.8 * sum(losses[:k]) / k, losses
    assert all(r["samples_per_s"] > 0 for r in train_rows)
    # The caption probe runs at every log line: its gain is logged with the loss.
    assert all(math.isfinite(r["probe/caption_gain"]) and r["probe/loss_own"] > 0 for r in train_rows)
    assert any("quickstart/fid_final" in r for r in rows)

    fid = state["fid"]
    assert fid["step0"]["step"] == 0 and fid["final"]["step"] == steps[-1]
    assert all(math.isfinite(fid[k]["fid"]) and fid[k]["fid"] > 0 for k in ("step0", "final"))

    # Colour adherence of the held-out captions that name a colour, for the step-0 and the final images.
    for k in ("step0", "final"):
        assert fid[k]["colour_scored"] > 0 and 0 <= fid[k]["colour_adherence"] <= 1
    assert 0.5 <= fid["final"]["colour_adherence_real"] <= 1  # the real images mostly show their named colour

    report = (out / "report.html").read_text()
    assert "Colour adherence" in report and "Caption information gain" in report
    ex = state["caption_examples"]  # the grid prompts' alt text and the attributes caption of the same images
    assert ex and all(e["attributes"].startswith(e["alt"]) and len(e["attributes"]) > len(e["alt"]) for e in ex)
    assert "Captions before and after re-captioning" in report and ex[0]["attributes"] in report
    assert report.count("polyline") >= 2  # the loss and the caption-gain curves
    assert report.count("data:image/png;base64,") >= 4 and "<svg" in report and "polyline" in report
    assert "FID" in report and "MFU" in report and "samples/s" in report
    assert "CFG 4.0 at noise levels 0.3-1," in report  # the recipe's guidance interval, as the grids were sampled
    assert list((out / "runs" / "train" / "wandb").glob("offline-run-*"))
    assert "wandb sync" in proc.stdout and str(out / "report.html") in proc.stdout

    # A rerun resumes: every stage is skipped, nothing is trained twice.
    again = _quickstart(out, configs)
    assert again.stdout.count("already done") == 7, again.stdout
    assert json.loads((out / "quickstart.json").read_text())["segments"] == state["segments"]


def test_training_budget_fills_the_wall_clock_budget_once(tmp_path):
    """Without --minutes, training gets what the budget leaves after the stages so far, the launches, a final
    FID as long as step 0's and the report; the choice is recorded, so a rerun trains to the same end."""
    from tessera.quickstart.run import LAUNCH_S, REPORT_S, QuickstartEvalConfig, QuickstartOptions, State, train_minutes

    ev = QuickstartEvalConfig(segments=3)
    state = State(tmp_path / "quickstart.json")
    state.data["fid"]["step0"] = {"fid": 390.0, "n": 539, "sample_s": 20.0, "inception_s": 40.0}
    left_s = 18.5 * 60 - 180.0 - (20.0 + 40.0 + 10.0) - 3 * LAUNCH_S - REPORT_S
    got = train_minutes(QuickstartOptions(budget=18.5), state, ev, elapsed_s=180.0)
    assert got == pytest.approx(math.floor(left_s / 6) / 10) and 0 < left_s / 60 - got < 0.1
    assert State(tmp_path / "quickstart.json").data["train_minutes"] == got  # recorded on disk
    # A rerun (later, so less budget seemingly left) keeps the recorded budget; --minutes overrides and is kept.
    assert train_minutes(QuickstartOptions(), state, ev, elapsed_s=900.0) == got
    assert train_minutes(QuickstartOptions(minutes=30.0), state, ev, elapsed_s=0.0) == 30.0
    assert train_minutes(QuickstartOptions(), state, ev, elapsed_s=0.0) == 30.0
    # A machine so slow that nothing is left still trains the minimum.
    slow = State(tmp_path / "slow.json")
    slow.data["fid"]["step0"] = state.data["fid"]["step0"]
    assert train_minutes(QuickstartOptions(budget=5.0), slow, ev, elapsed_s=600.0) == 2.0
