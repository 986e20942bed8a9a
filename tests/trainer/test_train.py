"""The training loop end to end on CPU: DeepSpeed ZeRO-2/3 over gloo, exact kill-and-resume, world-size
change, non-finite guard, preemption, checkpoints, export and sampling."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer import helpers as H

pytestmark = [pytest.mark.distributed]

STEPS = 12  # 2 ranks x batch 4 -> 8 samples per step
TOTAL = STEPS * 8


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    enc = H.tiny_text_encoder(tmp / "enc")
    H.tiny_dataset(tmp / "ds")
    return tmp, enc, str(tmp / "ds")


def _ovs(work, run_id, **kw):
    tmp, enc, ds = work
    base = {"train.total_samples": TOTAL, "train.ckpt_every_samples": 16, "debug.record_keys": "true"}
    base.update(kw)
    return H.overrides(tmp, run_id, ds, enc, **base)


def _run_dir(work, run_id) -> Path:
    return work[0] / "runs" / run_id


def _ckpt(work, run_id, step) -> Path:
    return _run_dir(work, run_id) / "checkpoints" / f"step_{step:09d}"


def _check(out):
    # Both ends of stderr: the first rank to fail logs the cause first; the tail shows the other ranks.
    assert out.returncode == 0, out.stderr[:6000] + "\n...\n" + out.stderr[-3000:]


def _losses(work, run_id) -> list[float]:
    return [m["loss"] for m in H.metrics(_run_dir(work, run_id))]


def _kill_at_step(cmd, env, metrics_path: Path, step: int, timeout: float = 600) -> None:
    """Start a run in its own process group and SIGKILL the whole group once ``step`` is logged."""
    proc = subprocess.Popen(cmd, env=env, cwd=H.ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            rows = [json.loads(l) for l in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
            if rows and rows[-1]["step"] >= step:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
                return
            if proc.poll() is not None:
                raise AssertionError(f"run ended before step {step}: {proc.stderr.read()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError("timed out waiting for the kill step")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def uninterrupted(work):
    """Reference runs without interruption, 2 ranks, ZeRO-2 and ZeRO-3."""
    for stage in (2, 3):
        _check(H.run_train(_ovs(work, f"ref{stage}", **{"deepspeed.stage": stage}), nproc=2))
    return work


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_kill_and_resume_is_bitwise_exact(uninterrupted, stage):
    work = uninterrupted
    ref = _losses(work, f"ref{stage}")
    assert len(ref) == STEPS and all(map(lambda v: v == v, ref))
    run = f"kill{stage}"
    kill_step = random.Random(stage).randint(3, STEPS - 3)
    cmd = H.train_cmd(_ovs(work, run, **{"deepspeed.stage": stage}), nproc=2)
    _kill_at_step(cmd, H.env(), _run_dir(work, run) / "metrics.jsonl", kill_step)
    assert not (_run_dir(work, run) / "checkpoints" / f"step_{STEPS:09d}").exists()
    _check(H.run_train(_ovs(work, run, **{"deepspeed.stage": stage}), nproc=2))
    got = _losses(work, run)
    assert got == ref, f"losses differ after a kill at step {kill_step}"
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a, b = load_file(_ckpt(work, f"ref{stage}", STEPS) / name), load_file(_ckpt(work, run, STEPS) / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # Same batches as the uninterrupted run, step by step, on each rank.
    for r in (0, 1):
        ref_keys = _keys_by_step(work, f"ref{stage}", r)
        assert _keys_by_step(work, run, r) == ref_keys
    if stage == 3:
        # The EMA under ZeRO-3 is computed from the gathered fp32 master weights: it matches ZeRO-2's EMA.
        e2, e3 = (load_file(_ckpt(work, f"ref{s}", STEPS) / "ema.safetensors") for s in (2, 3))
        assert all(torch.allclose(e2[k], e3[k], rtol=1e-5, atol=1e-6) for k in e2)
        w3 = load_file(_ckpt(work, "ref3", STEPS) / "model.safetensors")
        assert any(not torch.equal(e3[k], w3[k]) for k in e3), "EMA equals the raw weights"


def _keys_by_step(work, run_id, rank) -> dict[int, list[str]]:
    out = {}
    for line in (_run_dir(work, run_id) / "keys" / f"rank{rank}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["keys"]  # a replayed step (after a resume) overwrites the killed run's record
    return out


@pytest.mark.slow
def test_resume_on_a_different_world_size_consumes_each_sample_once(uninterrupted, tmp_path):
    """A 2-rank ZeRO-2 checkpoint resumed on 1 rank: the rest of the epoch is exactly the samples not yet seen."""
    work = uninterrupted
    src = _ckpt(work, "ref2", 6)
    assert (src / "COMPLETE").exists()
    run = "ws1"
    _check(H.run_train(_ovs(work, run, **{"train.resume": str(src), "train.total_samples": TOTAL}), nproc=1))
    rows = H.metrics(_run_dir(work, run))
    assert rows[0]["step"] == 7 and rows[-1]["samples"] == TOTAL  # counters continue from the checkpoint
    # Batches are fixed by the plan; only their rank changes. The 1-rank run must consume exactly the samples
    # the uninterrupted 2-rank run consumed after step 6: none repeated, none skipped.
    # Records are keyed by the step count after the step (1-based), so steps 7.. follow checkpoint step 6.
    ref_rest = sorted(k for r in (0, 1) for s, ks in _keys_by_step(work, "ref2", r).items() if s > 6 for k in ks)
    got = sorted(k for ks in _keys_by_step(work, run, 0).values() for k in ks)
    assert got == ref_rest
    assert len(got) == 48


@pytest.mark.slow
def test_nonfinite_loss_or_grad_on_one_rank_skips_the_step_everywhere(work):
    run = "nan"
    ovs = _ovs(work, run, **{"train.total_samples": 64, "train.ckpt_every_samples": 8,
                             "debug.nan_loss_at_steps": "[2]", "debug.nan_grad_at_steps": "[5]", "debug.nan_rank": 1})
    _check(H.run_train(ovs, nproc=2))
    rows = H.metrics(_run_dir(work, run))
    assert rows[-1]["skipped_steps"] == 2
    for skipped in (3, 6):  # the iteration that made step N skipped leaves weights and Adam moments unchanged
        before, after = _ckpt(work, run, skipped - 1), _ckpt(work, run, skipped)
        for name in ("model.safetensors", "optimizer.safetensors"):
            a, b = load_file(before / name), load_file(after / name)
            assert all(torch.equal(a[k], b[k]) for k in a), f"{name} changed on skipped step {skipped}"
    a, b = load_file(_ckpt(work, run, 7) / "model.safetensors"), load_file(_ckpt(work, run, 6) / "model.safetensors")
    assert not all(torch.equal(a[k], b[k]) for k in a), "training did not continue after the skips"


@pytest.mark.slow
def test_consecutive_nonfinite_steps_roll_back_or_stop(work):
    """K non-finite steps in a row: roll back to the last checkpoint and go on, or stop with a clear error."""
    common = {"train.total_samples": 40, "train.ckpt_every_samples": 8, "debug.nan_loss_at_steps": "[3, 4, 5]",
              "debug.nan_rank": -1, "train.max_consecutive_skips": 3}
    _check(H.run_train(_ovs(work, "rollback", **common), nproc=1))
    rows = H.metrics(_run_dir(work, "rollback"))
    assert rows[-1]["rollbacks"] == 1 and rows[-1]["skipped_steps"] == 3 and rows[-1]["samples"] == 40
    out = H.run_train(_ovs(work, "stop", **common, **{"train.on_nonfinite": "stop"}), nproc=1)
    assert out.returncode != 0 and "3 consecutive non-finite steps" in out.stderr


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_with_the_preemption_code(work):
    run = "preempt"
    cmd = H.train_cmd(_ovs(work, run, **{"train.total_samples": 100000}), nproc=2)
    proc = subprocess.Popen(cmd, env=H.env(), cwd=H.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    metrics = _run_dir(work, run) / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 75, proc.stderr.read()[-3000:]
    last = H.metrics(_run_dir(work, run))[-1]["step"]
    latest = (_run_dir(work, run) / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{last:09d}" and (_ckpt(work, run, last) / "COMPLETE").exists()


def test_half_written_checkpoints_are_ignored(tmp_path):
    from tessera.trainer.checkpoint import CheckpointManager

    root = tmp_path / "ck"
    mgr = CheckpointManager(str(root), keep_last=2)
    for step in (2, 4):
        url = mgr.prepare(step)
        (Path(url) / "model.safetensors").write_bytes(b"x")
        mgr.commit(step)
    # A crash mid-save leaves a .partial dir; another left a dir without COMPLETE; 'latest' may point at it.
    (root / "step_000000006.partial").mkdir()
    (root / "step_000000008").mkdir()
    (root / "latest").write_text("step_000000008\n")
    assert mgr.complete_steps() == [2, 4]
    assert mgr.resolve("auto") == str(root / "step_000000004")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        mgr.resolve(str(root / "step_000000008"))
    # keep_last prunes older complete checkpoints once a new one commits.
    url = mgr.prepare(10)
    mgr.commit(10)
    assert mgr.complete_steps() == [4, 10]


def test_estimate_memory_prints_zero_formulas(work):
    out = subprocess.run(H.train_cmd(_ovs(work, "mem", **{"deepspeed.stage": 3}), nproc=1)
                         + ["--estimate-memory", "--world-size", "8"],
                         env=H.env(), cwd=H.ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ZeRO stage 3, world size 8" in out.stdout and "device_optimizer" in out.stdout
    assert "Estimated memory needed for params, optim states and gradients" in out.stdout


def test_launch_environment_detection(monkeypatch):
    """torchrun/deepspeed (RANK...) and srun (SLURM_*) layouts are read from the environment."""
    from tessera.trainer.distributed import detect_env

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert detect_env().world_size == 1
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.5")
    e = detect_env()
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == \
        (3, 4, 1, "10.0.0.5", 21234, "slurm")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    e = detect_env()
    assert (e.rank, e.world_size, e.local_rank, e.launcher) == (1, 2, 1, "env")
