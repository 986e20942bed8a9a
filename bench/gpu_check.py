"""The GPU check's measurements, printed as one JSON (run by ``bench/gpu_check.sh``, which installs Tessera, DeepSpeed
and diffusers from the offline wheelhouse first; see there).

On one GPU: DiT-XL/2 at 256 px (32x32x4 latents, precomputed 77x768 text embeddings) trains in bf16 under ZeRO-2
for ``--steps`` steps with a checkpoint half-way: images/s and MFU (the trainer's own meter, median of the log
windows after warm-up), the SDPA kernels the model's attention dispatches to, peak memory against
``tessera train --estimate-memory``, the checkpoint's stall (and background write); then a second run resumes from
the half-way checkpoint and its losses are compared with the first's; ``bench/resume_offload_check.py`` restores a
checkpoint under ZeRO-3 with optimizer and parameter offload and compares the restored state bit for bit. With 2
or more GPUs: an NCCL all-reduce (result and bus bandwidth) and the same train-and-resume under ZeRO-3 on every GPU.

``--cpu-dry-run`` runs the same steps with a tiny DiT on the CPU (no NCCL): what ``tests/test_wheelhouse.py``
checks on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

# (model preset, text (L, D), latent (C, h, w), image px, batch per GPU, steps); the CPU dry run is tiny.
SIZES = {"gpu": ("XL", (77, 768), (4, 32, 32), 256, 64, 200), "cpu": ("tiny", (8, 32), (4, 8, 8), 64, 4, 8)}
RESUME_TOLERANCE = 0.02  # bf16 GPU kernels are not bitwise reproducible: relative loss difference allowed
_SDPA = {"flash": "flash", "efficient": "mem_efficient", "cudnn": "cudnn", "math": "math"}


def run(cmd: list[str], log: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``cmd`` (in the work dir) with its output in ``log``; raise with the log's tail when it fails."""
    with open(log, "w") as f:
        out = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {out.returncode}:\n{log.read_text()[-2000:]}")
    return out


def tessera(*args: str) -> list[str]:
    """The ``tessera`` command of the installed package."""
    return [sys.executable, "-m", "tessera.cli", *args]


def write_inputs(work: Path, mode: str) -> Path:
    """A synthetic dataset with precomputed latents and text embeddings, and the training config; returns it."""
    from tests.trainer.data.dataset_factory import write_dataset  # the repository's, on sys.path

    preset, emb, latent, px, batch, _ = SIZES[mode]
    per_shard = 256 if mode == "gpu" else 16
    write_dataset(str(work / "data"), shards=4, per_shard=per_shard, buckets={f"{px}x{px}": 1.0},
                  variants={"alt": 1.0}, emb={"synthetic-te": emb}, latent={"synthetic-ae": latent}, smooth=True)
    cfg = {
        "run": {"root": str(work / "runs")},
        "tracking": {"mode": "disabled"},  # no W&B on the machine; the trainer's metrics.jsonl is read
        "model": {"name": "dit", "dit": {"preset": preset, "in_channels": latent[0], "text_dim": emb[1]}},
        "text_encoder": {"name": "hf_encoder"},
        "autoencoder": {"name": "identity"},
        "objective": {"name": "flow"},
        "cfg_dropout": {"p": 0.0},
        "data": {"path": str(work / "data"), "batch_size": batch, "num_workers": 8 if mode == "gpu" else 0,
                 "text_encoder_id": "synthetic-te", "autoencoder_id": "synthetic-ae"},
        "optim": {"lr": 1.0e-4, "warmup_samples": 10 * batch},
        # torch's AdamW: DeepSpeed's FusedAdam would need nvcc, which a runtime-only image does not have.
        "deepspeed": {"stage": 2, "precision": "auto", "fused_adam": "off"},
        "train": {"log_every_samples": batch * (10 if mode == "gpu" else 1), "keep_last": 10},
        "samples": {"enabled": False},
    }
    path = work / "train.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def sdpa_probe(config: str) -> dict:
    """Which attention kernels one forward of the configured model dispatches to (run in a subprocess)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from tessera.config import load_config
    from tessera.trainer.config import TrainJobConfig

    cfg = load_config(TrainJobConfig, config)
    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    model = cfg.model.build().to(device, dtype)
    _, (L, D), (C, h, w), _, batch, _ = SIZES["gpu" if cuda else "cpu"]
    ops: dict[str, int] = {}

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if "scaled_dot_product" in name:
                ops[name] = ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    x = torch.randn(batch, C, h, w, device=device, dtype=dtype)
    text, mask = torch.randn(batch, L, D, device=device, dtype=dtype), torch.ones(batch, L, dtype=torch.bool,
                                                                                   device=device)
    mask[:, L // 2:] = False  # padded captions, as the loader gives them
    with torch.no_grad(), Seen():
        model(x, torch.rand(batch, device=device), text, mask)
    kinds = sorted({k for op in ops for part, k in _SDPA.items() if part in op})
    return {"backends": kinds or ["explicit (no SDPA call)"], "ops": ops, "dtype": str(dtype).split(".")[-1]}


def sdpa_in_subprocess(config: str, log: Path) -> dict:
    """``sdpa_probe`` in a process of its own, so that this one never holds a CUDA context."""
    run([sys.executable, __file__, "--probe-sdpa", config], log)
    return json.loads(log.read_text().strip().splitlines()[-1])


def estimate_gib(config: str, log: Path) -> float:
    """``tessera train --estimate-memory``'s per-rank model-state total (weights, gradients, Adam, EMA)."""
    run(tessera("train", "--config", config, "--estimate-memory"), log)
    m = re.search(r"device total\s+([\d.]+) GiB", log.read_text())
    if not m:
        raise RuntimeError(f"no 'device total' line in {log}")
    return float(m.group(1))


def metrics(run_dir: Path) -> list[dict]:
    """The trainer's logged rows (``metrics.jsonl``)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    return sorted(p.parent for p in (run_dir / "checkpoints").glob("*/COMPLETE"))


def train_and_resume(ctx: dict, name: str, nproc: int, overrides: list[str]) -> dict:
    """Train ``steps`` steps with a checkpoint half-way, then resume a second run from that checkpoint; returns
    throughput, memory, the checkpoint's save timings and how far the resumed losses are from the first run's."""
    steps, batch = ctx["steps"], ctx["batch"]
    total, half = steps * batch * nproc, steps // 2 * batch * nproc
    common = ["--config", ctx["config"], "--nproc", str(nproc), *overrides, f"train.total_samples={total}"]
    t0 = time.perf_counter()
    run(tessera("train", *common, f"run.id={name}", f"train.ckpt_every_samples={half}"), ctx["logs"] / f"{name}.log")
    wall = time.perf_counter() - t0
    full = ctx["runs"] / name
    ckpt = next(c for c in checkpoints(full) if json.loads((c / "trainer_state.json").read_text())
                ["trainer"]["step"] == steps // 2)
    run(tessera("train", *common, f"run.id={name}-resumed", f"train.resume={ckpt}", "train.ckpt_every_samples=0"),
        ctx["logs"] / f"{name}-resumed.log")
    first = {r["step"]: r for r in metrics(full) if "loss" in r}
    again = {r["step"]: r for r in metrics(ctx["runs"] / f"{name}-resumed") if "loss" in r}
    shared = sorted(s for s in set(first) & set(again) if s > steps // 2)
    gap = max((abs(first[s]["loss"] - again[s]["loss"]) / max(abs(first[s]["loss"]), 1e-12) for s in shared),
              default=float("inf"))
    windows = [r for r in first.values() if "samples_per_s" in r][2:] or list(first.values())
    steady = [r for r in windows if "ckpt/stall_s" not in r] or windows
    save = json.loads((ckpt / "trainer_state.json").read_text()).get("save", {})
    for done in (full, ctx["runs"] / f"{name}-resumed"):  # DiT-XL/2: 11 GB per checkpoint, on a 64 GB disk
        shutil.rmtree(done / "checkpoints", ignore_errors=True)
    return {"ranks": nproc, "steps": steps, "batch_per_rank": batch, "wall_s": round(wall, 1),
            "img_per_s": round(statistics.median(r["samples_per_s"] for r in steady), 2),
            "mfu": round(statistics.median(r.get("mfu", 0.0) for r in steady), 4),
            "tflops_per_s": round(statistics.median(r.get("tflops_per_s", 0.0) for r in steady), 2),
            "peak_memory_gib": round(max(r.get("memory_gb", 0.0) for r in first.values()) * 1e9 / 2**30, 2),
            "checkpoint": {k: save.get(k) for k in ("stall_s", "write_s", "seconds", "shard_bytes")},
            "resume": {"from_step": steps // 2, "steps_compared": len(shared), "max_rel_loss_diff": gap,
                       "ok": bool(shared) and gap <= RESUME_TOLERANCE}}


def resume_zero3_offload(ctx: dict) -> dict:
    """A resume under ZeRO-3 with optimizer and parameter offload (issue #28): ``bench/resume_offload_check.py``
    trains, saves a sharded checkpoint, loads it into a fresh engine and checks DeepSpeed's full fp32 weights and
    Adam moments against it bit for bit (on a GPU, a restore into the offload getter's copies would fail it)."""
    import torch

    log = ctx["logs"] / "resume_zero3_offload.log"
    preset = "S" if torch.cuda.is_available() else "tiny"
    run([sys.executable, str(Path(__file__).resolve().parent / "resume_offload_check.py"), "--preset", preset,
         "--offload-param"], log)
    return json.loads([line for line in log.read_text().splitlines() if line.startswith("{")][-1])


NCCL_WORKER = """
import json, os, time, torch, torch.distributed as dist
dist.init_process_group("nccl")
rank, world = dist.get_rank(), dist.get_world_size()
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
x = torch.full((64 * 2**20,), float(rank + 1), device="cuda", dtype=torch.bfloat16)  # 128 MiB
for _ in range(3):
    dist.all_reduce(x.clone())
torch.cuda.synchronize(); t0 = time.perf_counter(); n = 10
for _ in range(n):
    y = x.clone(); dist.all_reduce(y)
torch.cuda.synchronize(); dt = (time.perf_counter() - t0) / n
ok = bool((y == world * (world + 1) / 2).all())
if rank == 0:
    busbw = x.numel() * 2 * 2 * (world - 1) / world / dt / 1e9
    print(json.dumps({"ranks": world, "bytes": x.numel() * 2, "ok": ok, "busbw_gb_per_s": round(busbw, 1)}))
dist.destroy_process_group()
"""


def nccl_check(ctx: dict, n: int) -> dict:
    """An all-reduce over every GPU: the right sum, and its bus bandwidth (nccl-tests' busbw)."""
    script = ctx["work"] / "nccl_worker.py"
    script.write_text(NCCL_WORKER)
    log = ctx["logs"] / "nccl.log"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", str(script)], log)
    return json.loads([line for line in log.read_text().splitlines() if line.startswith("{")][-1])


def environment() -> dict:
    """The machine and the versions under test."""
    import importlib.metadata as md

    import torch

    cuda = torch.cuda.is_available()
    return {"date": datetime.date.today().isoformat(), "python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpus": torch.cuda.device_count() if cuda else 0,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            **{name: md.version(name) for name in ("tessera", "deepspeed", "diffusers")}}


def step(result: dict, key: str, fn, *args) -> None:
    """``result[key] = fn(*args)``; a failure is recorded there (and fails the check), not raised."""
    try:
        result[key] = fn(*args)
    except Exception as e:  # every check runs and reports, whatever another one did
        result[key] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
        result["ok"] = False


def checks(ctx: dict, result: dict) -> None:
    """Every measurement, in order, into ``result``."""
    config, logs = ctx["config"], ctx["logs"]
    step(result, "memory_estimate_gib", estimate_gib, config, logs / "estimate.log")
    step(result, "sdpa", sdpa_in_subprocess, config, logs / "sdpa.log")
    step(result, "train", train_and_resume, ctx, "zero2", 1, [])
    train = result["train"]
    if "peak_memory_gib" in train and isinstance(result["memory_estimate_gib"], float):
        train["peak_over_estimate"] = round(train["peak_memory_gib"] / result["memory_estimate_gib"], 2)
    result["ok"] &= train.get("resume", {}).get("ok", False)
    step(result, "resume_zero3_offload", resume_zero3_offload, ctx)
    result["ok"] &= result["resume_zero3_offload"].get("ok", False)
    gpus = result["environment"]["gpus"]
    if gpus >= 2:
        step(result, "nccl", nccl_check, ctx, gpus)
        step(result, "zero3", train_and_resume, ctx, "zero3", gpus, ["deepspeed.stage=3"])
        result["ok"] &= result["nccl"].get("ok", False) and result["zero3"].get("resume", {}).get("ok", False)
    else:
        result["nccl"] = result["zero3"] = {"ran": False, "why": f"{gpus} GPU(s): needs 2 or more"}


def main(argv: list[str] | None = None) -> int:
    """Run the check; print its JSON; exit 1 when any part failed."""
    p = argparse.ArgumentParser(prog="bench/gpu_check.py")
    p.add_argument("--work", type=Path, help="a scratch directory (datasets, runs, logs)")
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    p.add_argument("--cpu-dry-run", action="store_true", help="a tiny model on the CPU: no GPU needed")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--install", type=Path, default=None, help="the install step's JSON (gpu_check.sh)")
    p.add_argument("--probe-sdpa", metavar="CONFIG", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe_sdpa:
        print(json.dumps(sdpa_probe(args.probe_sdpa)))
        return 0
    t0 = time.perf_counter()
    out, sys.stdout = sys.stdout, sys.stderr  # stdout carries the JSON alone (DeepSpeed logs to stdout)
    import torch

    mode = "cpu" if args.cpu_dry_run else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu-dry-run on a machine without a GPU)", file=sys.stderr)
        return 2
    sys.path.append(str(args.repo))  # after site-packages: `tessera` stays the installed one, `tests` is the repo's
    work = args.work.resolve()
    for old in ("data", "runs", "logs"):  # a rerun in the same work dir starts afresh (never resumes old runs)
        shutil.rmtree(work / old, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    result = {"check": "tessera gpu_check", "mode": "cpu-dry-run" if mode == "cpu" else "gpu",
              "environment": environment(), "ok": True,
              "install": json.loads(args.install.read_text()) if args.install else None}
    _, _, _, px, batch, steps = SIZES[mode]
    ctx = {"work": work, "logs": work / "logs", "runs": work / "runs", "steps": args.steps or steps, "batch": batch,
           "config": str(write_inputs(work, mode))}
    result["model"] = {"name": f"DiT-{SIZES[mode][0]}/2", "resolution_px": px, "batch_per_gpu": batch,
                       "steps": ctx["steps"]}
    checks(ctx, result)
    result["seconds"] = round(time.perf_counter() - t0 + (result["install"] or {}).get("seconds", 0), 1)
    print(json.dumps(result, indent=1), file=out)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
