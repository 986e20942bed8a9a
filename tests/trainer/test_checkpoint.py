"""Checkpoint files and directories: half-written ones ignored, a process SIGKILLed while writing leaves the
previous checkpoint the newest (locally and on S3, 10 of 10 times at random points), background writes
serialised with errors re-raised; the loop's collective device, run id and file readers."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from tessera import storage
from tessera.trainer import checkpoint as C
from tessera.trainer import train_state as TS
from tessera.trainer.distributed import collective_device, shared_run_id


def test_half_written_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "ck"
    mgr = C.CheckpointManager(str(root), keep_last=2)
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
    mgr.prepare(10)
    mgr.commit(10)
    assert mgr.complete_steps() == [4, 10]


def _job(step: int) -> TS.CheckpointFiles:
    g = torch.Generator().manual_seed(step)
    w = {f"w{i}": torch.randn(256, 256, generator=g) for i in range(8)}  # 2 MB per file
    m = {f"{k}/w{i}": torch.randn(256, 256, generator=g) for k in ("exp_avg", "exp_avg_sq") for i in range(8)}
    return TS.CheckpointFiles(step, {"model.safetensors": w}, m, {k: v * 0.5 for k, v in w.items()},
                              [{"loader": {"pos": step}, "rng": {"r": step}}] * 2, {"trainer": {"step": step}})


def _write_slowly(root: str, config_url: str, step: int, env: dict) -> None:
    os.environ.update(env)  # the fork server started before the S3 fixture set the endpoint and credentials
    TS.write_checkpoint(C.CheckpointManager(root), _job(step), config_url, pause=lambda: time.sleep(0.25))


def _same(url: str, step: int) -> bool:
    ref = _job(step)
    got = C.read_tensors(storage.join(url, "model.safetensors"))
    ema = C.read_tensors(storage.join(url, "ema.safetensors"))
    w = ref.weights["model.safetensors"]
    return all(torch.equal(got[k], w[k]) and torch.equal(ema[k], ref.ema[k]) for k in w) and \
        C.read_json(storage.join(url, "loader", "rank1.json")) == {"pos": step}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_sigkill_while_writing_keeps_the_previous_checkpoint(where, tmp_path, request):
    """A real child process writing a checkpoint is SIGKILLed at a random point, 10 times; each time the newest
    complete checkpoint is the previous one, intact, and the next write (the rerun's) commits normally."""
    root = str(tmp_path / "ck") if where == "local" else request.getfixturevalue("s3_bucket") + "/ck"
    config = str(tmp_path / "config.yaml")
    Path(config).write_text("a: 1\n")
    mgr = C.CheckpointManager(root, keep_last=3)
    TS.write_checkpoint(mgr, _job(1), config)
    # forkserver: children fork from a clean single-threaded server (forking pytest itself, whose S3 server and
    # logging threads may hold locks, can deadlock the child); the server preloads torch and the writer once.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    rnd, killed_at, delays = random.Random(), [], []  # killed_at: files in the staging dir at each kill
    for step in range(2, 12):
        env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
        proc = ctx.Process(target=_write_slowly, args=(root, config, step, env))
        proc.start()
        delay = rnd.uniform(0.05, 1.0)  # the write takes > 1.25 s: 5 pauses of 0.25 s plus the files
        delays.append(delay)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL, f"the writer finished before the kill at {delay:.3f} s"
        staging = mgr.staging_url(step)
        killed_at.append(len(storage.list_prefix(staging + "/")) if storage.is_s3(root)
                         else sum(len(f) for _, _, f in os.walk(staging)))
        newest = mgr.resolve("auto")
        assert newest == storage.join(root, C.step_dirname(step - 1)), (killed_at, newest)
        assert _same(newest, step - 1)
        TS.write_checkpoint(mgr, _job(step), config)  # the rerun writes the step again, completely
        assert mgr.resolve("auto") == storage.join(root, C.step_dirname(step)) and _same(mgr.resolve("auto"), step)
    assert mgr.complete_steps() == [9, 10, 11]
    assert max(delays) - min(delays) > 0.3, delays
    if where == "local":  # (S3 shows a multipart upload only once it completes)
        assert len(set(killed_at)) >= 3, f"kills landed at too few points of the write (files present: {killed_at})"


def test_async_writer_serialises_and_reraises():
    w, order = C.AsyncWriter(), []
    w.submit(1, lambda: (time.sleep(0.2), order.append(1)))
    w.submit(2, lambda: order.append(2))  # waits for write 1 first
    w.wait()
    assert order == [1, 2]
    w.submit(3, lambda: 1 / 0)
    with pytest.raises(RuntimeError, match="writing checkpoint step 3 failed"):
        w.wait()
    w.wait()  # the error is reported once


def test_tensor_file_reads_one_tensor_at_a_time(tmp_path, s3_bucket):
    t = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4)}
    for url in (str(tmp_path / "t.safetensors"), f"{s3_bucket}/t.safetensors"):
        C.write_tensors(url, t, {"format": "x"})
        f = C.TensorFile(url)
        assert f.names == {"a", "b"} and torch.equal(f.get("a"), t["a"]) and f.maybe("c") is None
        with pytest.raises(KeyError, match="has no tensor 'c'"):
            f.get("c")
        f.close()


def test_collective_device_follows_the_group_backend():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert collective_device("nccl", cpu) == torch.device("cuda", 0)  # a pure NCCL group takes only CUDA tensors
    assert collective_device("cpu:gloo,cuda:nccl", cuda) == cuda  # on-device flags, one host sync
    assert collective_device("cpu:gloo,cuda:nccl", cpu) == cpu
    assert collective_device("gloo", cpu) == cpu


def test_run_id_comes_from_config_then_launcher(monkeypatch):
    for k in ("TESSERA_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    assert shared_run_id("mine", lambda: "new") == "mine"
    assert shared_run_id(None, lambda: "new") == "new"  # one process: its own new id
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default: not an id
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert shared_run_id(None, lambda: "new") == "slurm-4242"  # a requeued job continues its run
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    assert shared_run_id(None, lambda: "new") == "job7"
