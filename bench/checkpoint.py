"""Benchmark: what a checkpoint costs the training loop, sharded per rank vs the old gather to rank 0.

Every side saves the same state: a DiT under DeepSpeed ZeRO (fp32, gloo ranks on this machine) after one real
optimizer step, its weights, both Adam moments and the EMA, to local disk. Two comparisons, through
``bench/harness.py`` (alternating runs, medians, ratio):

1. **Stall per save at 4 ranks** (the time the loop is blocked, the slowest rank's, since every rank then
   meets the others at the next step's all-reduce):
   * peer: the gather to rank 0 that Tessera used until tessera-ckpt/3, copied below (``legacy_save``): one
     ``reduce`` per 64 MB bucket of each of the four state kinds to rank 0, a host copy there, then a background
     thread writes ``model/optimizer/ema.safetensors``;
   * ours: ``Checkpointer.save``: each rank copies its own slices into its host buffer; the writes follow in
     the background. Waiting for the writes is outside the timing on both sides.
2. **Wall time per save as ranks go 1 -> 2 -> 4** on the same total state (``Checkpointer.save`` and
   ``finish``: staging, every rank's write, rank 0's commit). Each world size is its own process group, launched
   alternately.

    OMP_NUM_THREADS=1 .venv/bin/python bench/checkpoint.py [--preset S] [--stage 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Comparison, Report  # noqa: E402


def build(preset: str, stage: int):
    """(engine, fragments, EMA, a stand-in loader) after one real optimizer step, on this process's rank."""
    import torch

    from tessera.config import from_dict
    from tessera.trainer import zero_state as Z
    from tessera.trainer.config import TrainJobConfig
    from tessera.trainer.distributed import detect_env, init_distributed, world_size
    from tessera.trainer.ema import ShardedEMA
    from tessera.trainer.engine import build_engine

    init_distributed(detect_env())
    cfg = from_dict(TrainJobConfig, {"model": {"name": "dit", "dit": {"preset": preset, "in_channels": 4}},
                                     "data": {"path": "unused", "batch_size": 2}, "deepspeed": {"stage": stage}})
    torch.manual_seed(0)
    engine, _ = build_engine(cfg.model.build(), cfg, world_size(), torch.device("cpu"))
    text_dim = cfg.model.section().text_dim
    x = torch.randn(2, 4, 16, 16)
    mask = torch.ones(2, 8, dtype=torch.bool)
    loss = engine(x, torch.rand(2), torch.randn(2, 8, text_dim), mask, None).square().mean()
    engine.backward(loss)
    engine.step()
    frags = Z.fragments(engine)

    class Loader:
        def state_dict(self):
            return {"pos": 1}

    return engine, frags, ShardedEMA(cfg.ema, frags), Loader()


def legacy_save(engine, frags, ema, loader, root: str, step: int, writer) -> None:
    """The peer: Tessera's save before sharded checkpoints (tessera-ckpt/2), kept here as the benchmark's
    reference. Every rank joins the bucketed reduces of weights, moments and EMA to rank 0; rank 0 hands the host
    copies to a background thread that writes three safetensors files, the JSON and ``COMPLETE``."""
    from tessera import storage
    from tessera.trainer import checkpoint as C
    from tessera.trainer import zero_state as Z
    from tessera.trainer.distributed import gather_to_rank0, rank

    weights = Z.gather_to_rank0(frags, lambda f: f.view())
    moments = {f"{k}/{n}": t for k in Z.MOMENTS for n, t in Z.gather_to_rank0(frags, lambda f, k=k: f.view(k)).items()}
    ema_full = ema.gather()
    small = gather_to_rank0({"loader": loader.state_dict(), "rng": C.rng_state()})
    if rank() != 0:
        return
    mgr = C.CheckpointManager(root, keep_last=1)

    def job() -> None:
        url = mgr.prepare(step)
        C.write_tensors(storage.join(url, "model.safetensors"), weights)
        C.write_tensors(storage.join(url, "optimizer.safetensors"), moments)
        C.write_tensors(storage.join(url, "ema.safetensors"), ema_full)
        for r, s in enumerate(small):
            C.write_json(storage.join(url, "loader", f"rank{r}.json"), s["loader"])
            C.write_json(storage.join(url, "rng", f"rank{r}.json"), s["rng"])
        mgr.commit(step)

    writer.submit(step, job)


def _slowest(seconds: float) -> float:
    """The largest of every rank's ``seconds`` (the loop waits for the slowest rank at its next collective)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64)
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def worker(args) -> None:
    """One rank: ``stall`` runs comparison 1 (rank 0 reports); ``wall`` prints the median wall time per save."""
    import torch.distributed as dist

    from tessera.trainer import checkpoint as C
    from tessera.trainer import train_state as TS
    from tessera.trainer.distributed import barrier, rank

    engine, frags, ema, loader = build(args.preset, args.stage)
    tmp = Path(args.work)
    ckpt = TS.Checkpointer(C.CheckpointManager(str(tmp / f"ours{dist.get_world_size()}"), keep_last=1),
                           str(tmp / "config.yaml"), "bench")
    st, legacy_writer = TS.TrainState(), C.AsyncWriter()

    def run_ours() -> float:
        st.step += 1
        t0 = time.perf_counter()
        ckpt.save(engine, frags, ema, loader, st)
        stall = _slowest(time.perf_counter() - t0)
        ckpt.finish()  # outside the timing: the loop would be training meanwhile
        return stall

    def run_peer() -> float:
        st.step += 1
        t0 = time.perf_counter()
        legacy_save(engine, frags, ema, loader, str(tmp / "peer"), st.step, legacy_writer)
        stall = _slowest(time.perf_counter() - t0)
        legacy_writer.wait()  # outside the timing, as ours
        barrier()
        return stall

    def wall() -> float:
        st.step += 1
        t0 = time.perf_counter()
        ckpt.save(engine, frags, ema, loader, st)
        ckpt.finish()
        return time.perf_counter() - t0

    n = sum(f.full_numel for f in frags)
    if args.mode == "wall":
        wall()  # warm-up: the host buffer is allocated once
        values = [wall() for _ in range(args.saves)]
        if rank() == 0:
            print("RESULT " + json.dumps({"world": dist.get_world_size(), "median_s": statistics.median(values),
                                          "values": values, "parameters": n}), flush=True)
        return
    run_ours(), run_peer()  # warm-up: buffers allocated, pages touched
    if rank() == 0:
        report = Report("checkpoint", params={**vars(args), "parameters": n, "state_mb": n * 16 / 1e6},
                        libraries=["torch", "deepspeed", "safetensors"])
        report.compare(Comparison(name=f"DiT-{args.preset} ({n / 1e6:.0f} M params, {n * 16 / 1e6:.0f} MB of state) "
                                       f"stall per save, {dist.get_world_size()} ranks ZeRO-{args.stage}",
                                  metric="s", higher_is_better=False, peer="gather to rank 0", ours="sharded"),
                       run_peer, run_ours, repeats=args.repeats)
        report.write()
    else:
        for _ in range(args.repeats):
            run_peer(), run_ours()


def launch(args, world: int, mode: str) -> str:
    """Run ``world`` ranks of this script in ``mode``; returns rank 0's output."""
    from tessera.trainer.launch import free_port

    port, procs = free_port(), []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--work", args.work, "--preset", args.preset,
               "--stage", str(args.stage), "--repeats", str(args.repeats), "--saves", str(args.saves)]
        out = subprocess.PIPE if r == 0 else subprocess.DEVNULL
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, text=True))
    out = procs[0].communicate()[0]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"bench ranks failed: exit codes {codes}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="S", help="DiT size preset (S: ~33 M parameters, B: ~130 M)")
    ap.add_argument("--stage", type=int, default=2, help="ZeRO stage")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--saves", type=int, default=2, help="saves per launched group in the 1 -> 2 -> 4 comparison")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="stall", help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    args.work = tempfile.mkdtemp(prefix="tessera-ckpt-bench-")
    (Path(args.work) / "config.yaml").write_text("bench: true\n")
    try:
        print(launch(args, args.ranks, "stall"), end="", flush=True)  # comparison 1, reported by rank 0
        report = Report("checkpoint_scaling", params=vars(args), libraries=["torch", "deepspeed", "safetensors"])

        def group(world: int):
            def run() -> tuple[float, dict]:
                line = next(x for x in launch(args, world, "wall").splitlines() if x.startswith("RESULT "))
                res = json.loads(line[len("RESULT "):])
                return res["median_s"], {"values": res["values"]}
            return run

        for world in (2, 4):
            report.compare(Comparison(name=f"DiT-{args.preset} wall time per save (stage, write, commit), 1 rank vs "
                                           f"{world} ranks, same total state", metric="s", higher_is_better=False,
                                      peer="1 rank", ours=f"{world} ranks"), group(1), group(world),
                           repeats=args.repeats)
        report.write()
    finally:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
