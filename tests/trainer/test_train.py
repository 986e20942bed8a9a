"""The training loop end to end on CPU: gradient accumulation and world size give the same training, one run
directory without a run id, the non-finite guard, rollback, monitoring metrics, DeepSpeed options that must take
effect, and the memory estimate."""

from __future__ import annotations

import socket
import subprocess

import pytest
import torch

from tests.trainer import helpers as H

pytestmark = [pytest.mark.distributed]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    enc = H.tiny_text_encoder(tmp / "enc")
    H.tiny_dataset(tmp / "ds")
    # One bucket, kept in tar order: a global batch of 16 is the same 16 samples however it is split.
    H.tiny_dataset(tmp / "ds1", buckets={"16x16": 1.0})
    return tmp, enc, str(tmp / "ds")


def _ovs(work, run_id, **kw):
    tmp, enc, ds = work
    return H.overrides(tmp, run_id, ds, enc, **kw)


def _run(work, run_id):
    return work[0] / "runs" / run_id


@pytest.mark.slow
def test_accumulation_and_world_size_train_like_one_big_batch(work):
    """1 rank x micro-batch 16 and 1 rank x 4 accumulated micro-batches of 4: the same losses and weights (fp32
    tolerance), one lr and EMA step per optimizer step. 2 ranks x 2 x 4 trains like 1 rank x 4 x 4 with 2 loader
    workers: the loader deals shards to its readers (ranks x workers), so a step's samples depend on the number of
    readers, not on how they are split into ranks. The 2-rank run, started without a run id, writes one run dir."""
    tmp = work[0]
    common = {"data.path": str(tmp / "ds1"), "data.shuffle_buffer": 0, "train.total_samples": 96,
              "optim.schedule": "cosine", "optim.warmup_samples": 32, "train.ckpt_every_samples": 10**6}
    runs = {"big": (1, {"data.batch_size": 16}), "accum4": (1, {"data.batch_size": 4, "optim.grad_accum": 4}),
            "accum4w2": (1, {"data.batch_size": 4, "optim.grad_accum": 4, "data.num_workers": 2})}
    for name, (nproc, ov) in runs.items():
        H.check(H.run_train(_ovs(work, name, **common, **ov), nproc=nproc))
    root = tmp / "runs-noid"
    ovs = [o for o in _ovs(work, "x", **common, **{"data.batch_size": 4, "optim.grad_accum": 2})
           if not o.startswith("run.")] + [f"run.root={root}", "run.id=null"]
    H.check(H.run_train(ovs, nproc=2))
    dirs = [p for p in root.iterdir() if p.is_dir()]
    assert len(dirs) == 1, f"ranks wrote several run directories: {dirs}"
    assert {p.name for p in (dirs[0] / "logs").iterdir()} == {"rank0.log", "rank1.log"}
    rows = {"big": H.metrics(_run(work, "big")), "accum4": H.metrics(_run(work, "accum4")),
            "accum4w2": H.metrics(_run(work, "accum4w2")), "2x2x4": H.metrics(dirs[0])}
    same_as = {"big": "big", "accum4": "big", "accum4w2": "accum4w2", "2x2x4": "accum4w2"}
    for name, r in rows.items():
        assert [x["step"] for x in r] == list(range(1, 7)), name  # 96 samples / 16 per optimizer step
        assert [x["samples"] for x in r] == [16 * s for s in range(1, 7)], name
        assert [x["lr"] for x in r] == pytest.approx([5e-4, 1e-3, 8.535534e-4, 5e-4, 1.464466e-4, 0.0], abs=1e-9)
        decays = [x["ema_decay"] for x in r]
        assert decays == pytest.approx([1 - (1 + s) ** (-2 / 3) for s in range(1, 7)]), name  # per optimizer step
        assert [x["loss"] for x in r] == pytest.approx([x["loss"] for x in rows[same_as[name]]], rel=1e-5), name
    final = {"big": _run(work, "big"), "accum4": _run(work, "accum4"), "accum4w2": _run(work, "accum4w2"),
             "2x2x4": dirs[0]}
    for name in ("accum4", "2x2x4"):
        ref = H.ckpt_tensors(H.ckpt_dir(final[same_as[name]], 6))
        got = H.ckpt_tensors(H.ckpt_dir(final[name], 6))
        assert all(torch.allclose(got[k], ref[k], rtol=1e-5, atol=1e-6) for k in ref), name


@pytest.mark.slow
def test_nonfinite_loss_or_grad_on_one_rank_skips_the_step_everywhere(work):
    run = "nan"
    ovs = _ovs(work, run, **{"train.total_samples": 64, "train.ckpt_every_samples": 8, "train.keep_last": 50,
                             "debug.nan_loss_at_steps": "[2]", "debug.nan_grad_at_steps": "[5]", "debug.nan_rank": 1})
    H.check(H.run_train(ovs, nproc=2))
    rows = H.metrics(_run(work, run))
    assert rows[-1]["skipped_steps"] == 2
    for skipped in (3, 6):  # the step that made N skipped leaves weights, EMA and Adam moments unchanged
        H.same_files(H.ckpt_dir(_run(work, run), skipped - 1), H.ckpt_dir(_run(work, run), skipped))
    a, b = (H.ckpt_tensors(H.ckpt_dir(_run(work, run), s)) for s in (6, 7))
    assert not all(torch.equal(a[k], b[k]) for k in a), "training did not continue after the skips"


@pytest.mark.slow
def test_consecutive_nonfinite_steps_roll_back_or_stop(work):
    """K non-finite steps in a row: roll back to the last checkpoint and go on, or stop with a clear error."""
    common = {"train.total_samples": 40, "train.ckpt_every_samples": 8, "debug.nan_loss_at_steps": "[3, 4, 5]",
              "debug.nan_rank": -1, "train.max_consecutive_skips": 3}
    H.check(H.run_train(_ovs(work, "rollback", **common), nproc=1))
    rows = H.metrics(_run(work, "rollback"))
    assert rows[-1]["rollbacks"] == 1 and rows[-1]["skipped_steps"] == 3 and rows[-1]["samples"] == 40
    log = (_run(work, "rollback") / "logs" / "rank0.log").read_text()
    assert "rolled back weights and optimizer to" in log and "step_000000002" in log
    out = H.run_train(_ovs(work, "stop", **common, **{"train.on_nonfinite": "stop"}), nproc=1)
    assert out.returncode != 0 and "3 consecutive non-finite steps" in out.stderr


@pytest.mark.slow
def test_a_run_that_fails_with_loader_workers_alive_exits_instead_of_hanging(work):
    """The first step raises (text embeddings wider than the model takes) while 2 loader workers, which ignore
    SIGTERM, hold batches: the process must report the error and exit, not hang in multiprocessing's exit join."""
    import subprocess

    out = H.run_train(_ovs(work, "fails", **{"data.num_workers": 2, "model.dit.text_dim": 48,
                                             "train.total_samples": 16}), timeout=240)
    assert out.returncode != 0 and "mat1 and mat2 shapes cannot be multiplied" in out.stderr
    leftover = subprocess.run(["pgrep", "-f", "run.id=fails"], capture_output=True, text=True).stdout.split()
    assert not leftover, f"loader workers outlived the run: {leftover}"


@pytest.mark.slow
def test_monitoring_metrics_are_present_and_plausible(work):
    from tessera.config import load_config
    from tessera.trainer.config import TrainJobConfig
    from tessera.trainer.models import model_flops

    run = "monitor"
    H.check(H.run_train(_ovs(work, run, **{"train.total_samples": 48, "train.cpu_peak_tflops": 0.5}), nproc=2))
    rows = H.metrics(_run(work, run))
    cfg = load_config(TrainJobConfig, H.TINY_CONFIG, ["data.path=x", "text_encoder.t5.path=x"])
    model = cfg.model.build()
    shapes = {3 * model_flops(model, h, w, 16) for h, w in ((16, 16), (16, 32), (32, 16))}  # the buckets
    for r in rows:
        assert 0.5 < r["loss"] < 3 and all(0 < r[k] < 5 for k in r if k.startswith("loss_q"))
        assert any(k.startswith("loss_q") for k in r) and r["grad_norm"] > 0 and r["samples_per_s"] > 0
        assert 0 <= r["data_wait_s"] and 0 <= r["data_wait_frac"] < 1 and 0.05 < r["memory_gb"] < 32
        assert r["flops_per_sample"] in shapes  # one step per log line here, so one bucket
        assert r["mfu"] == pytest.approx(r["tflops_per_s"] / (0.5 * 2), rel=1e-9)  # per-core peak x 2 ranks
        assert r["tflops_per_s"] == pytest.approx(r["flops_per_sample"] * r["samples_per_s"] / 1e12, rel=1e-6)


@pytest.mark.slow
def test_deepspeed_options_take_effect(work, tmp_path):
    """Gradient clipping really clips (Adam's first step shrinks when the clipped gradient is far below eps);
    optimizer offload and bf16 really switch DeepSpeed's engine on this CPU."""
    moved = {}
    for name, clip in (("noclip", 0), ("clip", 1e-12)):
        H.check(H.run_train(_ovs(work, name, **{"train.total_samples": 4, "optim.grad_clip": clip}), nproc=1))
        w = H.ckpt_tensors(H.ckpt_dir(_run(work, name), 1))
        init = _initial_weights(work)
        moved[name] = max(float((w[k] - init[k]).abs().max()) for k in init)
    assert moved["noclip"] > 1e-4 and moved["clip"] < 1e-6, moved
    run = "offload-bf16"
    H.check(H.run_train(_ovs(work, run, **{"train.total_samples": 8, "deepspeed.offload_optimizer": "true",
                                           "deepspeed.precision": "bf16"}), nproc=1))
    log = (_run(work, run) / "logs" / "rank0.log").read_text()
    assert "engine: ZeRO-2, bf16, optimizer offloaded to cpu" in log
    assert all(r["loss"] == r["loss"] for r in H.metrics(_run(work, run)))


def _initial_weights(work) -> dict:
    """The tiny model's initial weights (the trainer builds them from seed 0 like this)."""
    from tessera.config import load_config
    from tessera.trainer.config import TrainJobConfig
    from tessera.trainer.engine import seed_everything

    seed_everything(0, 0, False)
    cfg = load_config(TrainJobConfig, H.TINY_CONFIG, ["data.path=x", "text_encoder.t5.path=x"])
    return {k: v.detach() for k, v in cfg.model.build().state_dict().items()}


def test_estimate_memory_prints_zero_formulas(work):
    out = subprocess.run(H.train_cmd(_ovs(work, "mem", **{"deepspeed.stage": 3}), nproc=1)
                         + ["--estimate-memory", "--world-size", "8"],
                         env=H.env(), cwd=H.ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ZeRO stage 3, world size 8" in out.stdout and "device_optimizer" in out.stdout
    assert "Estimated memory needed for params, optim states and gradients" in out.stdout
    assert "ema (fp32, 1/world per rank)" in out.stdout


def test_launch_environment_detection(monkeypatch):
    """torchrun/deepspeed (RANK...) and srun (SLURM_*) layouts are read from the environment."""
    from tessera.trainer.distributed import detect_env

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    one, other = detect_env(), detect_env()
    assert one.world_size == 1 and one.launcher == "single"
    # A one-process run takes a free port (no peer needs to find it), so two of them can share a machine, even
    # when the environment names a port another process may hold (a Slurm script's 20000 + job id).
    assert one.master_port != 29500 and other.master_port != 29500
    with socket.socket() as s:
        s.bind(("127.0.0.1", one.master_port))  # it was free
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(held.getsockname()[1]))
        assert detect_env().master_port != held.getsockname()[1]
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "1")
        assert detect_env().master_port != held.getsockname()[1]
    for k in ("MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k)
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
