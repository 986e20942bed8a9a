"""The distillation tests' tiny world: a shapes dataset, a held-out set in the quickstart's format (images +
index.jsonl, what ``bench/distill.py`` scores FID and colour adherence on), and a tiny flow teacher."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from tests.finetune.shapes import COLOURS, SHAPES, draw, write_shapes
from tests.trainer import helpers as H

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "distill" / "tiny_distill.yaml"


def write_holdout(directory: Path, n: int = 64, size: int = 16, seed: int = 1) -> Path:
    """``n`` shape images never trained on (another seed), as ``<dir>/images`` + ``<dir>/index.jsonl``."""
    rnd = random.Random(seed)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour, shape = rnd.choice(list(COLOURS)), rnd.choice(SHAPES)
        path = directory / "images" / f"h{i:04d}.png"
        draw(colour, shape, size, rnd).save(path)
        rows.append({"key": f"h{i:04d}", "caption": f"a {colour} {shape}", "bucket": f"{size}x{size}",
                     "source": "shapes", "file": str(path)})
    (directory / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def teacher_overrides(tmp: Path, run_id: str, objective: str = "flow", prediction: str = "sample",
                      samples: int = 2400) -> list[str]:
    """tests/trainer/tiny_train.yaml on the shapes with CFG dropout (the teacher guides): ``samples`` of batch 8."""
    extra = {"train.total_samples": samples, "data.batch_size": 8, "optim.lr": 0.003, "ema.decay": 0.95,
             "objective.name": objective, "train.deterministic": "false", "cfg_dropout.p": 0.1,
             "samples.sampler.steps": 16, "samples.sampler.cfg_scale": 2.0}
    if objective == "ddpm":
        extra.update({"objective.ddpm.prediction": prediction, "samples.sampler.name": "ddim"})
    else:
        extra["objective.flow.prediction"] = prediction
    return H.overrides(tmp, run_id, str(tmp / "shapes"), str(tmp / "enc"), **extra)


def make_world(tmp: Path) -> None:
    """The tiny text encoder, the shapes and the held-out set under ``tmp``."""
    H.tiny_text_encoder(tmp / "enc")
    if not (tmp / "shapes" / "manifest.json").exists():
        write_shapes(tmp / "shapes", n=512, size=16)
    if not (tmp / "holdout" / "index.jsonl").exists():
        write_holdout(tmp / "holdout")


def distill_cmd(ovs: list[str], nproc: int = 1, config: Path = CONFIG) -> list[str]:
    """The command line of a tiny distillation."""
    return [sys.executable, "-m", "tessera.cli", "distill", "--config", str(config), "--nproc", str(nproc), *ovs]


def run_distill(ovs: list[str], nproc: int = 1, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    """Run a tiny distillation to completion."""
    from tessera.trainer.launch import free_port

    e = H.env(**env) if nproc > 1 else H.env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                              MASTER_PORT=str(free_port()), **env)
    return subprocess.run(distill_cmd(ovs, nproc), env=e, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
