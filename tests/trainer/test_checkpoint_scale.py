"""Sharded checkpoints on real ranks, measured from outside the code under test: one run on 4 ZeRO-3 ranks that a
checkpoint write failure stops, resumed on 2 ranks (ZeRO-2, checkpointing to the loopback S3 server), then on 3
(ZeRO-1, reading that S3 checkpoint).

* Each of the 4 ranks writes a quarter of the state (its files on disk, within 15%), and rank 0's peak resident
  memory (VmHWM, sampled from /proc) grows by its own shard during a save, not by the whole state.
* A write failure injected on rank 2 stops all four ranks within one step, each naming rank 2; no ``COMPLETE``
  appears for that save although the other three ranks wrote their shards.
* Each rerun logs the checkpoint it resumed from and restores it bit for bit on its new world size and ZeRO
  stage: its first step is made non-finite (skipped on every rank), so its first checkpoint must hold exactly
  the state it resumed from. The 3 ranks fetch every byte of the S3 checkpoint once, with ranged GETs (bytes
  served, as the server counted them), not three whole copies, and each old rank's loader state once.

What a chain does not give is an uninterrupted run's exact weights: the loader assigns batches to ranks by world
size (each sample still once per epoch), so another world size trains on other batches, and 2, 3 or 4 ranks add
gradients in other orders. Same-world resumes are bitwise (test_resume.py).
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from tessera.trainer import checkpoint as C
from tests.fixtures.s3_recorder import recorded_bucket, s3_recorder  # noqa: F401 (fixtures)
from tests.trainer import helpers as H

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BIG = {"model.dit.hidden_size": 256, "model.dit.depth": 4, "model.dit.num_heads": 4}  # 4.8 M parameters


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    enc = H.tiny_text_encoder(tmp / "enc")
    # One bucket in tar order: a global batch is the same samples however ranks and accumulation split it, and
    # every step has the same shapes, so rank 0's memory is steady between saves.
    H.tiny_dataset(tmp / "ds1", buckets={"16x16": 1.0})
    return tmp, enc, str(tmp / "ds1")


def _ovs(work, run_id, **kw):
    tmp, enc, ds = work
    return H.overrides(tmp, run_id, ds, enc, **{"data.batch_size": 2, "train.ckpt_every_samples": 10**6, **kw})


def _hwm_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM): no transient peak escapes it, however short."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def _rank0_pid(launcher: int) -> int:
    deadline = time.time() + 120
    while time.time() < deadline:
        for child in psutil.Process(launcher).children():
            try:
                if child.environ().get("RANK") == "0":
                    return child.pid
            except psutil.Error:
                pass
        time.sleep(0.05)
    raise AssertionError("rank 0 never started")


def _watch_rank0(proc, rdir: Path, step: int):
    """Sample rank 0's peak RSS from /proc every 5 ms with (metric lines, checkpoint ``step`` committed), memory
    first; drain stderr meanwhile (a full pipe would block the ranks). Returns (exit code, stderr, samples)."""
    err: list[str] = []
    drain = threading.Thread(target=lambda: err.append(proc.stderr.read()))
    drain.start()
    pid = _rank0_pid(proc.pid)
    samples, done = [], threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                rss = _hwm_mb(pid)
            except (OSError, RuntimeError):
                return
            samples.append((rss, H.metric_lines(rdir), (H.ckpt_dir(rdir, step) / "COMPLETE").exists()))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        code = proc.wait(900)
    finally:
        done.set()
        sampler.join()
        drain.join(60)
    return code, err[0], samples


def test_4_ranks_fail_together_then_resume_on_2_and_3_ranks_local_and_s3(work, recorded_bucket):
    bucket, rec = recorded_bucket
    tmp = work[0]
    common = {**BIG, "data.shuffle_buffer": 0}

    # 4 ZeRO-3 ranks save every 4 steps (rank 0's memory has settled by then); the save of step 8 fails on rank 2.
    # glibc's mmap threshold is pinned so that freed blocks go back to the OS: with its dynamic threshold, ZeRO-3's
    # gather buffers (one model copy each) land at new addresses and the peak RSS creeps by a model copy per step.
    rdir = tmp / "runs" / "zero3"
    proc = H.start(H.train_cmd(_ovs(work, "zero3", **common, **{
        "deepspeed.stage": 3, "train.total_samples": 80, "train.ckpt_every_samples": 32,
        "debug.ckpt_fail_steps": "[8]", "debug.ckpt_fail_rank": 2}), nproc=4), MALLOC_MMAP_THRESHOLD_="65536")
    code, err, samples = _watch_rank0(proc, rdir, 4)
    assert code != 0
    for r in range(4):  # every rank raised at the same step, naming rank 2; none was left to the launcher
        assert re.search(rf"\[rank{r}\]:.*checkpoint step 8: writing failed on rank 2: OSError: injected", err), \
            f"rank {r} did not report rank 2's failure:\n{err[-3000:]}"
    assert "terminating the other ranks" not in err
    steps = [m["step"] for m in H.metrics(rdir)]
    assert steps[-1] in (8, 9), f"the failed save of step 8 must stop the run within one step, ran to {steps[-1]}"
    staged = rdir / "checkpoints" / "step_000000008.partial"
    assert all((staged / "shards" / f"rank{r:05d}.safetensors").exists() for r in (0, 1, 3))
    assert not (staged / "COMPLETE").exists() and not H.ckpt_dir(rdir, 8).exists()
    ck = H.ckpt_dir(rdir, 4)  # the good save: each rank wrote its own quarter of the bytes
    own = {r: sum(p.stat().st_size for p in (ck / "shards" / f"rank{r:05d}.safetensors",
                                             ck / "loader" / f"rank{r}.json", ck / "rng" / f"rank{r}.json"))
           for r in range(4)}
    own[0] += sum((ck / n).stat().st_size for n in ("config.yaml", "index.json", "trainer_state.json", "COMPLETE"))
    total = sum(p.stat().st_size for p in ck.rglob("*") if p.is_file())
    assert sum(own.values()) == total and total > 70e6
    assert all(abs(b - total / 4) <= 0.15 * total / 4 for b in own.values()), own
    # Rank 0's memory: the save raises its peak RSS by about its own shard (its host buffer), not the whole state.
    shard_mb = (ck / "shards" / "rank00000.safetensors").stat().st_size / 2**20
    steady = [hwm for hwm, lines, _ in samples if lines < 4][-1]  # read before step 4's save began
    saving = next(hwm for hwm, _, committed in samples if committed)  # once the save was committed
    print(f"rank 0 peak RSS: {steady:.1f} MB before the save, {saving:.1f} MB after it (+{saving - steady:.1f}); "
          f"own shard {shard_mb:.1f} MB of {total / 2**20:.1f} MB; bytes per rank {own}")
    assert saving - steady <= 1.5 * shard_mb + 8, (steady, saving, shard_mb, total / 2**20)
    assert saving - steady >= 0.5 * shard_mb, "the save's host buffer did not show: the measurement is blind"

    # 2 ZeRO-2 ranks resume from the last complete checkpoint and checkpoint to S3; the first step is skipped.
    s3_root = f"{bucket}/chain"
    H.check(H.run_train(_ovs(work, "zero2", **common, **{
        "deepspeed.stage": 2, "train.total_samples": 36, "train.resume": str(ck),
        "train.ckpt_root": s3_root, "debug.nan_loss_at_steps": "[4]"}), nproc=2))
    assert re.search(rf"resumed from {re.escape(str(ck))} at step 4", _log(tmp, "zero2"))
    s3_src = f"{s3_root}/step_000000005"
    H.same_files(ck, s3_src)  # ZeRO-3 on 4 ranks -> ZeRO-2 on 2 ranks: restored bit for bit
    # 3 ZeRO-1 ranks resume from S3, each fetching only its slices; the first step is skipped again.
    before = len(rec.log)
    H.check(H.run_train(_ovs(work, "zero1", **common, **{
        "deepspeed.stage": 1, "train.total_samples": 48, "train.ckpt_every_samples": 6,
        "train.resume": s3_src, "debug.nan_loss_at_steps": "[5]"}), nproc=3))
    assert re.search(rf"resumed from {re.escape(s3_src)} at step 5", _log(tmp, "zero1"))
    b = bucket[len("s3://"):]
    # The 2 old ranks' loader states, merged for 3 new ranks: each fetched once (the ranks share them), not 3 times.
    loader_gets = sorted(r.key.rsplit("/", 1)[-1] for r in rec.log[before:]
                         if r.bucket == b and "/step_000000005/loader/" in r.key and r.method == "GET")
    assert loader_gets == ["rank0.json", "rank1.json"], loader_gets
    gets = [r for r in rec.log[before:] if r.bucket == b and "/shards/" in r.key and r.method == "GET"]
    index = C.read_json(f"{s3_src}/index.json")
    data = sum(sh["bytes"] - sh["data_start"] for sh in index["shards"])
    assert gets and all(r.range for r in gets) and sum(r.bytes_out for r in gets) == data, \
        (sum(r.bytes_out for r in gets), data)
    end = tmp / "runs" / "zero1"
    H.same_files(s3_src, H.ckpt_dir(end, 6))  # ZeRO-2 on 2 ranks (S3) -> ZeRO-1 on 3 ranks: bit for bit
    assert [m["skipped_steps"] for m in H.metrics(end)] == [2, 2]  # one skipped step per rerun
    x, y = H.ckpt_tensors(H.ckpt_dir(end, 6)), H.ckpt_tensors(H.ckpt_dir(end, 7))
    assert not all(torch.equal(x[k], y[k]) for k in x), "training did not go on after the resume"


def _log(tmp: Path, run: str) -> str:
    return (tmp / "runs" / run / "logs" / "rank0.log").read_text()
