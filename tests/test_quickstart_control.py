"""``tessera quickstart --control``: the control stage (quickstart/control.py) for real, at the smallest size.

The stages before it (ingest, recaption, step-0 FID, segmented training, final FID: tests/test_quickstart.py runs
them) are stood in for: moving shapes (tests/trainer/control_data.py, 32 px) are split by the quickstart's own
``split_dataset``, precomputed with MiniLM, a tiny quickstart model trains for a few steps from the resolved
quickstart config, and ``quickstart.json`` records those stages as done. Then the real CLI runs with ``--control``:
it must derive Canny conditions, train and checkpoint a DiT control branch on the quickstart's checkpoint, evaluate
control adherence (generated vs floor vs ceiling) and put it, with condition | generated | real thumbnails, in the
report; a rerun skips every control step."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from tests.test_quickstart import ROOT
from tests.trainer import helpers as H

# The quickstart model, shrunk: 32 wide, 3 blocks (the branch copies 2), 8 images a step, 4 sampling steps.
TRAIN_YAML = f"""base: {ROOT}/configs/quickstart/train.yaml
tracking: {{mode: disabled}}
model: {{dit: {{hidden_size: 32, depth: 3, num_heads: 2}}}}
data: {{batch_size: 8, num_workers: 0, shuffle_buffer: 0}}
train: {{log_every_samples: 8}}
samples: {{sampler: {{steps: 4}}}}
"""
EVAL_YAML = f"""base: {ROOT}/configs/quickstart/control_eval.yaml
control: {{n: 6}}
sampling: {{steps: 4}}
report_max_prompts: 3
"""


def _configs(tmp_path):
    """The shipped quickstart configs with the tiny model and evaluation above (their `base:` paths absolute)."""
    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs" / "quickstart", configs)
    for name in ("precompute.yaml", "control_condition.yaml"):
        (configs / name).write_text((configs / name).read_text().replace("base: ../", f"base: {ROOT / 'configs'}/"))
    (configs / "train.yaml").write_text(TRAIN_YAML)
    (configs / "control_eval.yaml").write_text(EVAL_YAML)
    return configs


def _stand_in_for_earlier_stages(configs, out):
    """Split, precompute and a few training steps as the quickstart would, and ``quickstart.json`` saying so."""
    from tessera.config import load_config
    from tessera.data_pipeline.precompute import PrecomputeConfig, run_precompute
    from tessera.quickstart.data import load_holdout, pick_prompts, split_dataset
    from tessera.quickstart.run import Paths, QuickstartOptions, State, checkpoint_state, train_config
    from tests.trainer.control_data import write_moving_shapes

    paths = Paths(str(out))
    write_moving_shapes(paths.ingest, n=96, size=32, shards=2)
    split = split_dataset(str(paths.ingest), str(paths.train_data), str(paths.holdout), 0.1)
    run_precompute(load_config(PrecomputeConfig, configs / "precompute.yaml", [
        f"source={paths.train_data}", f"output={paths.precomputed}", "executor=local"]))
    opts = QuickstartOptions(out=str(out), configs=str(configs), nproc=1, recaption=False)
    train_config(opts, paths, [h.caption for h in pick_prompts(load_holdout(str(paths.holdout)), 12)])
    cmd = [sys.executable, "-m", "tessera.cli", "train", "--config", str(paths.train_config), "--nproc", "1",
           "train.total_samples=32"]
    H.check(subprocess.run(cmd, env=H.env(), capture_output=True, text=True, timeout=300, cwd=ROOT))
    ck = checkpoint_state(paths.run)
    state = State(paths.state)
    fid = {"fid": 300.0, "n": split["held_out"], "sample_s": 1.0, "inception_s": 1.0}
    state.data.update({
        "recaption": False, "train_minutes": 0.1, "stages": {k: {"seconds": 1.0} for k in (
            "ingest", "split", "precompute", "step0", "train", "final")},
        "segments": [{"minutes": 0.1, "trained_minutes": 0.1, "wall_s": 1.0, "step": ck["step"],
                      "samples": ck["samples"], "segment_samples": ck["samples"], "decay": False}],
        "fid": {"step0": {"step": 0, **fid}, "final": {"step": ck["step"], "samples": ck["samples"], **fid}}})
    state.save()
    return split, ck


def _quickstart_env() -> dict:
    """tests/test_quickstart.py's environment: offline, quiet."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TESSERA_NO_PROGRESS": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    env.pop("WANDB_API_KEY", None)
    return env


def _run(out, configs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tessera.cli", "quickstart", "--control", "--control-minutes", "0.15",
           "--no-recaption", "--nproc", "1", "--out", str(out), "--configs", str(configs)]
    proc = subprocess.run(cmd, env=_quickstart_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
@pytest.mark.long
def test_quickstart_control_stage_trains_evaluates_and_reports(tmp_path):
    configs, out = _configs(tmp_path), tmp_path / "qs"
    split, base = _stand_in_for_earlier_stages(configs, out)
    proc = _run(out, configs)
    for i, step in enumerate(("conditions", "train", "evaluate"), 1):
        assert f"[control {i}/3] {step}: done" in proc.stdout, proc.stdout

    state = json.loads((out / "quickstart.json").read_text())
    rec = state["control"]
    assert rec["base_step"] == base["step"] and rec["base"] == base["url"]

    # Conditions: every training sample has its Canny edges next to its MiniLM embeddings; so do the held-out six.
    cond = rec["steps"]["conditions"]
    assert cond["train"]["written"] == cond["train"]["samples"] == split["train"]
    assert cond["held_out"]["written"] == 6
    manifest = json.loads((out / "data" / "train_minilm_canny" / "manifest.json").read_text())
    assert manifest["conditions"]["canny"]["written"] == split["train"] and manifest["caches"]["emb"]
    with tarfile.open(out / "data" / "train_minilm_canny" / manifest["shards"][0]["name"]) as tar:
        names = tar.getnames()
    assert any(n.endswith(".cond.canny.png") for n in names) and any(".emb." in n for n in names)

    # The branch trained on the quickstart's checkpoint and committed a checkpoint holding the branch alone.
    run = out / "runs" / f"control_step{base['step']}"
    tr = rec["steps"]["train"]
    assert tr["step"] > 0 and (run / "checkpoints" / "latest").exists()
    assert f"init_from: {base['url']}" in (out / "configs" / "control_train.yaml").read_text()
    w = H.ckpt_tensors(H.ckpt_dir(run, tr["step"]))
    assert w and all(k.startswith("control.") for k in w)

    # Adherence: Canny edge F1 with control, at scale 0 (the floor) and of the real images (the ceiling: 1).
    a = rec["steps"]["evaluate"]["adherence"]
    assert a["metric"] == "edge_f1" and a["n"] == 6
    assert all(0.0 <= a[k] <= 1.0 and math.isfinite(a[k]) for k in ("value", "floor"))
    assert a["ceiling"] > 0.99

    report = (out / "report.html").read_text()
    assert "Control: a ControlNet on the quickstart model" in report and "Control adherence (canny" in report
    assert f"{a['value']:.3f} with control vs {a['floor']:.3f} without (floor)" in report
    for title in ('title="condition"', "generated\"", 'no control"', 'title="real"'):
        assert report.count(title) == 3, title  # report_max_prompts rows of condition | generated | no control | real
    assert "control_train" in report  # the stage timings
    assert "control adherence (edge_f1)" in proc.stdout

    again = _run(out, configs)  # a rerun skips every control step
    assert again.stdout.count("already done") == 6 + 3, again.stdout
    assert json.loads((out / "quickstart.json").read_text())["control"] == rec
