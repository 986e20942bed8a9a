"""Fine-tuning fixtures: two tiny bases trained in the session on coloured shapes (a flow x-prediction DiT and a
DDPM x0-prediction DiT, 16 px), prompt files, and a helper that runs ``tessera finetune`` in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.finetune.shapes import captions, write_shapes
from tests.trainer import helpers as H

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SHAPES, HELDOUT_SHAPES = ["square", "circle", "triangle", "ring"], ["bar", "dot", "diamond", "cross"]


def solo_env() -> dict:
    """A one-rank process with its own rendezvous port (two single runs side by side would both take 29500)."""
    from tessera.trainer.launch import free_port

    return H.env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def base_overrides(tmp: Path, name: str, objective: str, prediction: str) -> list[str]:
    """tests/trainer/tiny_train.yaml trained on the shapes: 300 steps of 8 images, EMA 0.95."""
    extra = {"train.total_samples": 2400, "data.batch_size": 8, "optim.lr": 0.003, "ema.decay": 0.95,
             "objective.name": objective, "train.deterministic": "false"}
    if objective == "ddpm":
        extra.update({"objective.ddpm.prediction": prediction, "samples.sampler.name": "ddim"})
    else:
        extra["objective.flow.prediction"] = prediction
    return H.overrides(tmp, name, str(tmp / "shapes"), str(tmp / "enc"), **extra)


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    """{"flow": run dir, "ddpm": run dir}: both bases trained side by side (one thread each)."""
    tmp = tmp_path_factory.mktemp("ft")
    H.tiny_text_encoder(tmp / "enc")
    write_shapes(tmp / "shapes", n=512, size=16)
    specs = {"flow": ("flow", "sample"), "ddpm": ("ddpm", "x0")}
    procs = {k: subprocess.Popen(H.train_cmd(base_overrides(tmp, f"base-{k}", *v)), env=solo_env(), cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for k, v in specs.items()}
    for k, p in procs.items():
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    (tmp / "train.txt").write_text("\n".join(captions(["red"], TRAIN_SHAPES)) + "\n")
    (tmp / "heldout.txt").write_text("\n".join(captions(["red"], HELDOUT_SHAPES)) + "\n")
    return {"tmp": tmp, "flow": tmp / "runs" / "base-flow", "ddpm": tmp / "runs" / "base-ddpm"}


CONFIG = ROOT / "tests" / "finetune" / "tiny_finetune.yaml"


def ft_overrides(bases: dict, run_id: str, base: str = "flow", **extra) -> list[str]:
    """Overrides of tests/finetune/tiny_finetune.yaml for a run of ``run_id`` on one of the bases."""
    tmp = bases["tmp"]
    ov = {"checkpoint": str(bases[base]), "run.root": str(tmp / "ftruns"), "run.id": run_id,
          "prompts.path": str(tmp / "train.txt"), "eval.prompts.path": str(tmp / "heldout.txt")}
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def ft_cmd(ovs: list[str], nproc: int = 1) -> list[str]:
    """The command line of a tiny fine-tuning run."""
    return [sys.executable, "-m", "tessera.cli", "finetune", "--config", str(CONFIG), "--nproc", str(nproc), *ovs]


def run_ft(ovs: list[str], nproc: int = 1, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a fine-tuning to completion."""
    env = solo_env() if nproc == 1 else H.env()
    return subprocess.run(ft_cmd(ovs, nproc), env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def rows(run_dir: Path) -> list[dict]:
    """One dict per step from metrics.jsonl: the training and held-out rows of a step merged, a replayed
    update's later values winning."""
    merged: dict[int, dict] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        merged.setdefault(r["step"], {}).update(r)
    return [merged[k] for k in sorted(merged)]


def heldout(run_dir: Path) -> list[dict]:
    """The held-out metrics rows (step, heldout/...)."""
    return [r for r in rows(run_dir) if "heldout/reward" in r]


def heldout_record(run_dir: Path, step: int) -> dict:
    """heldout/step_<N>.json of a run."""
    return json.loads((Path(run_dir) / "heldout" / f"step_{step:09d}.json").read_text())
