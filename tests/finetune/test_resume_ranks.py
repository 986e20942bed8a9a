"""Exact resume and rank agreement, on real processes: SIGKILL mid-run then resume gives the uninterrupted run's
per-update losses and adapters bit for bit (DDPO's per-prompt buffers and the RNG restored); 2 ranks over gloo end
with identical LoRA weights on both ranks, equal (up to float summation order) to one rank drawing the same global
batch, which only holds if every rank's gradients were all-reduced. (DDPO, DPO and DRaFT run on 2 ranks in
test_methods.py.)"""

from __future__ import annotations

import os
import random
import re
import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.finetune.conftest import ft_cmd, ft_overrides, rows, run_ft, solo_env
from tests.trainer import helpers as H

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RESUME = {"method.name": "ddpo", "train.updates": 8, "train.ckpt_every": 2, "eval.every": 0, "eval.seeds": 1}


def _losses(run_dir):
    return [(r["step"], r["loss"], r["reward_mean"]) for r in rows(run_dir) if "loss" in r]


def test_sigkill_then_resume_is_bitwise_exact(bases):
    root = bases["tmp"] / "ftruns"
    H.check(run_ft(ft_overrides(bases, "resume-ref", **RESUME)))
    proc = H.start(ft_cmd(ft_overrides(bases, "resume-kill", **RESUME)), **{k: v for k, v in solo_env().items()
                                                                          if k in ("RANK", "WORLD_SIZE", "MASTER_PORT")})
    kill_after = random.SystemRandom().randint(3, 6)  # metric lines: the update-0 held-out row, then updates
    H.wait_for(proc, lambda: H.metric_lines(root / "resume-kill") >= kill_after + 1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert not H.ckpt_dir(root / "resume-kill", 8).exists()
    H.check(run_ft(ft_overrides(bases, "resume-kill", **RESUME)))
    found = re.findall(r"resumed from \S+ at update (\d+)", (root / "resume-kill" / "logs" / "rank0.log").read_text())
    assert found and 2 <= int(found[-1]) < 8, "no resume logged"
    assert _losses(root / "resume-kill") == _losses(root / "resume-ref")
    ref, got = (load_file(H.ckpt_dir(root / r, 8) / "adapter.safetensors") for r in ("resume-ref", "resume-kill"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def _rank_weights(run_dir, rank):
    return load_file(run_dir / "rank_weights" / f"rank{rank}.safetensors")


def test_two_ranks_hold_identical_adapters_equal_to_one_rank(bases):
    root = bases["tmp"] / "ftruns"
    common = {"method.name": "grpo", "method.grpo.kl_beta": 0.04, "train.updates": 3, "eval.every": 0,
              "eval.seeds": 1, "train.dump_rank_weights": "true"}
    H.check(run_ft(ft_overrides(bases, "ranks2", **common, **{"rollout.batches_per_update": 1}), nproc=2))
    H.check(run_ft(ft_overrides(bases, "ranks1", **common, **{"rollout.batches_per_update": 2})))
    r0, r1, one = _rank_weights(root / "ranks2", 0), _rank_weights(root / "ranks2", 1), _rank_weights(root / "ranks1", 0)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(k.endswith("lora_B.default.weight") and r0[k].abs().sum() > 0 for k in r0)  # it did train
    for k in r0:
        torch.testing.assert_close(r0[k], one[k], rtol=1e-4, atol=1e-6)
    two, solo = _losses(root / "ranks2"), _losses(root / "ranks1")
    assert [r[2] for r in two] == pytest.approx([r[2] for r in solo], abs=1e-6)  # the same samples, gathered
