"""Exact resume, proven on real processes: SIGKILL at a random step (ZeRO-2 and ZeRO-3 on 2 ranks with loader
workers, and each lr schedule), SIGKILL during a checkpoint write, SIGTERM/SIGUSR1 preemption, and a resume onto
another world size. Every resumed run must log the resume, run only the remaining steps, and end with the
uninterrupted run's losses, weights, EMA and Adam moments, bit for bit.

All randomness of a step is per sample and per step, so a run restarted from scratch would also reproduce the
losses: that is why each test checks that the resume really happened and what it skipped.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time

import pytest

from tests.trainer import helpers as H

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 12  # 2 ranks x batch 4 -> 8 samples per step
TOTAL = STEPS * 8
WARMUP = {"optim.warmup_samples": 32}
CASES = {  # name -> (ranks, overrides): each schedule, warmed up, and both ZeRO stages that partition state
    "zero2-cosine": (2, {"deepspeed.stage": 2, "optim.schedule": "cosine", **WARMUP}),
    "zero3-wsd": (2, {"deepspeed.stage": 3, "optim.schedule": "wsd", "optim.decay_start_samples": 48,
                      "optim.decay_samples": 32, "optim.min_lr_ratio": 0.1, **WARMUP}),
    "zero2-constant-1rank": (1, {"deepspeed.stage": 2, "data.batch_size": 8, **WARMUP}),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    enc = H.tiny_text_encoder(tmp / "enc")
    # One bucket: 96 samples fill the 12 steps of 2 ranks x batch 4 exactly, so the epoch has no leftover and the
    # world-size test below can compare sample sets.
    H.tiny_dataset(tmp / "ds", buckets={"16x16": 1.0})
    return tmp, enc, str(tmp / "ds")


def _ovs(work, run_id, **kw):
    tmp, enc, ds = work
    base = {"train.total_samples": TOTAL, "train.ckpt_every_samples": 16, "debug.record_keys": "true",
            "data.num_workers": 1}
    base.update(kw)
    return H.overrides(tmp, run_id, ds, enc, **base)


def _run(work, run_id):
    return work[0] / "runs" / run_id


class _Refs:
    """The uninterrupted run of each case, trained on first use (a `make test` run needs only some of them)."""

    def __init__(self, work) -> None:
        self.work, self.done = work, set()

    def __call__(self, case: str):
        if case not in self.done:
            ranks, ovs = CASES[case]
            H.check(H.run_train(_ovs(self.work, f"ref-{case}", **ovs), nproc=ranks))
            self.done.add(case)
        return self.work


@pytest.fixture(scope="module")
def refs(work):
    return _Refs(work)


def _assert_same_as_ref(work, run_id, ref_id):
    assert H.losses(_run(work, run_id)) == H.losses(_run(work, ref_id))
    H.same_files(H.ckpt_dir(_run(work, ref_id), STEPS), H.ckpt_dir(_run(work, run_id), STEPS))


@pytest.mark.parametrize("case", [c if c == "zero2-cosine" else pytest.param(c, marks=pytest.mark.long) for c in CASES])
def test_sigkill_at_a_random_step_then_resume_is_bitwise_exact(refs, case):
    work, (ranks, ovs) = refs(case), CASES[case]
    run = f"kill-{case}"
    kill_step = random.SystemRandom().randint(3, STEPS - 2)  # a new point each run
    proc = H.start(H.train_cmd(_ovs(work, run, **ovs), nproc=ranks))
    # (a checkpoint commits at the first step's all-reduce after every rank has written it: wait for one)
    H.wait_for(proc, lambda: H.metric_lines(_run(work, run)) >= kill_step and
               (_run(work, run) / "checkpoints" / "latest").exists())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    before = H.metric_lines(_run(work, run))
    assert not H.ckpt_dir(_run(work, run), STEPS).exists()
    H.check(H.run_train(_ovs(work, run, **ovs), nproc=ranks))
    resumed = H.resumed_step(_run(work, run))
    assert resumed is not None and 1 <= resumed < STEPS, f"killed at step {kill_step}: no resume logged"
    assert H.metric_lines(_run(work, run)) - before == STEPS - resumed, "the rerun must run only the remaining steps"
    _assert_same_as_ref(work, run, f"ref-{case}")
    for r in range(ranks):  # the same samples, step by step, on each rank
        assert _keys_by_step(work, run, r) == _keys_by_step(work, f"ref-{case}", r)


def _keys_by_step(work, run_id, rank):
    import json

    out = {}
    for line in (_run(work, run_id) / "keys" / f"rank{rank}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["keys"]  # a replayed step (after a resume) overwrites the killed run's record
    return out


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(refs):
    work, (ranks, ovs) = refs("zero2-cosine"), CASES["zero2-cosine"]
    run = "kill-in-write"
    slow = {**ovs, "debug.ckpt_write_delay_s": 0.4}
    proc = H.start(H.train_cmd(_ovs(work, run, **slow), nproc=ranks))
    ckpts = _run(work, run) / "checkpoints"
    H.wait_for(proc, lambda: ckpts.exists() and any(p.name.endswith(".partial") and p.name >= "step_000000004"
                                                     for p in ckpts.iterdir()))
    time.sleep(random.SystemRandom().uniform(0.0, 0.9))  # somewhere inside the ~1.2 s write
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    partial = sorted(p.name for p in ckpts.iterdir() if p.name.endswith(".partial"))
    assert partial, "the kill did not land during a write"
    H.check(H.run_train(_ovs(work, run, **ovs), nproc=ranks))
    resumed = H.resumed_step(_run(work, run))
    assert resumed is not None and f"step_{resumed:09d}.partial" < partial[-1]
    _assert_same_as_ref(work, run, "ref-zero2-cosine")


@pytest.mark.parametrize("sig,ranks", [pytest.param(signal.SIGTERM, 2, marks=pytest.mark.long), (signal.SIGUSR1, 1)])
def test_preemption_signal_checkpoints_exits_75_and_resumes(refs, sig, ranks):
    case = "zero2-cosine" if ranks == 2 else "zero2-constant-1rank"
    work = refs(case)
    ovs = CASES[case][1]
    run = f"preempt-{sig.name}"
    proc = H.start(H.train_cmd(_ovs(work, run, **ovs), nproc=ranks))
    H.wait_for(proc, lambda: H.metric_lines(_run(work, run)) >= 3)
    os.killpg(proc.pid, sig)  # every rank gets it, as from a scheduler; the launcher forwards it too
    assert proc.wait(120) == 75, proc.stderr.read()[-3000:]
    last = H.metrics(_run(work, run))[-1]["step"]
    assert (_run(work, run) / "checkpoints" / "latest").read_text().strip() == f"step_{last:09d}"
    assert (H.ckpt_dir(_run(work, run), last) / "COMPLETE").exists() and last < STEPS
    H.check(H.run_train(_ovs(work, run, **ovs), nproc=ranks))
    assert H.resumed_step(_run(work, run)) == last
    _assert_same_as_ref(work, run, f"ref-{case}")


def test_resume_on_another_world_size_restores_state_and_consumes_each_sample_once(refs, tmp_path):
    """A 2-rank ZeRO-2 checkpoint resumed on 1 rank: the restored state is the checkpoint's, bit for bit, and the
    rest of the epoch is exactly the samples the 2-rank run consumed after it."""
    work, ovs = refs("zero2-cosine"), CASES["zero2-cosine"][1]
    src = H.ckpt_dir(_run(work, "ref-zero2-cosine"), 6)
    # Resume into another checkpoint root with nothing left to train: the run saves what it restored.
    H.check(H.run_train(_ovs(work, "ws1-restore", **ovs, **{"train.resume": str(src), "train.total_samples": 48,
                                                           "train.ckpt_root": str(tmp_path / "restored")}), nproc=1))
    H.same_files(src, tmp_path / "restored" / "step_000000006")
    H.check(H.run_train(_ovs(work, "ws1", **ovs, **{"train.resume": str(src)}), nproc=1))
    rows = H.metrics(_run(work, "ws1"))
    assert rows[0]["step"] == 7 and rows[-1]["samples"] == TOTAL  # counters continue from the checkpoint
    # The rest of the epoch is re-dealt to the new rank: the same samples, in new batches (docs/data.md). Records
    # are keyed by the step count after the step.
    ref_rest = sorted(k for r in (0, 1) for s, ks in _keys_by_step(work, "ref-zero2-cosine", r).items() if s > 6
                      for k in ks)
    got = sorted(k for ks in _keys_by_step(work, "ws1", 0).values() for k in ks)
    assert got == ref_rest and len(got) == 48


@pytest.mark.parametrize("case", [c if c != "zero3-wsd" else pytest.param(c, marks=pytest.mark.long) for c in CASES])
def test_logged_lr_follows_each_schedule(refs, case):
    """The lr of every step is the configured schedule's value at the samples seen after that step."""
    lr = [round(r["lr"], 10) for r in H.metrics(_run(refs(case), f"ref-{case}"))]
    # warmup over 32 samples at 8 per step, then: constant / cosine to 0 at 96 samples / wsd (decay 48 -> 80 to 10%)
    cos = [1e-3 * 0.5 * (1 + math.cos(math.pi * (8 * s - 32) / 64)) for s in range(5, 13)]
    want = {"zero2-constant-1rank": [2.5e-4, 5e-4, 7.5e-4] + [1e-3] * 9,
            "zero2-cosine": [2.5e-4, 5e-4, 7.5e-4, 1e-3] + [round(v, 10) for v in cos],
            "zero3-wsd": [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 7.75e-4, 5.5e-4, 3.25e-4, 1e-4, 1e-4, 1e-4]}
    assert lr == want[case]
