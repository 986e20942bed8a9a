"""Distillation fixtures: two tiny teachers trained once per session on coloured shapes (16 px): a flow
x-prediction DiT (lcm, reflow, the bench's short form) and a DDPM eps DiT (progressive, lcm's LCMScheduler export,
and the objective check), trained side by side, one thread each."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.distill import helpers as D
from tests.finetune.conftest import solo_env
from tests.trainer import helpers as H

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def teachers(tmp_path_factory):
    """{"tmp", "flow", "eps"}: the world directory and the two teachers' run directories."""
    tmp = tmp_path_factory.mktemp("distill")
    D.make_world(tmp)
    specs = {"flow": ("flow", "sample", 400), "eps": ("ddpm", "eps", 64)}
    procs = {k: subprocess.Popen(H.train_cmd(D.teacher_overrides(tmp, f"teacher-{k}", obj, pred, samples=n)),
                                 env=solo_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)
             for k, (obj, pred, n) in specs.items()}
    for p in procs.values():
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    return {"tmp": tmp, "flow": tmp / "runs" / "teacher-flow", "eps": tmp / "runs" / "teacher-eps"}
