"""Benchmark: how long a checkpoint blocks the training loop, Tessera's background writer vs ``torch.save``.

One DeepSpeed engine (ZeRO-2, fp32, one process over gloo) holds a DiT with real Adam moments after one step.
Each side saves the same state to local disk, alternating through ``bench/harness.py``:

* peer: ``torch.save`` of the full weights, both Adam moments and an EMA copy (the loop waits for the write);
* ours: ``Checkpointer.save`` (gather the fp32 slices to rank 0 and copy them to host memory, then hand the
  files, fsyncs, ``COMPLETE`` and ``latest`` to a background thread). Only the blocked time counts; the
  write is waited for outside the timing, before the next run.

    OMP_NUM_THREADS=2 .venv/bin/python bench/checkpoint.py [--preset S] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Comparison, Report  # noqa: E402


def build(preset: str):
    """(engine, fragments, EMA, a stand-in loader) after one real optimizer step."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29531"))
    import torch

    from tessera.config import from_dict
    from tessera.trainer import zero_state as Z
    from tessera.trainer.config import TrainJobConfig
    from tessera.trainer.distributed import detect_env, init_distributed
    from tessera.trainer.ema import ShardedEMA
    from tessera.trainer.engine import build_engine

    init_distributed(detect_env())
    cfg = from_dict(TrainJobConfig, {"model": {"name": "dit", "dit": {"preset": preset, "in_channels": 4}},
                                     "data": {"path": "unused", "batch_size": 2}, "deepspeed": {"stage": 2}})
    engine, _ = build_engine(cfg.model.build(), cfg, 1, torch.device("cpu"))
    text_dim = cfg.model.section().text_dim
    x = torch.randn(2, 4, 16, 16)
    loss = engine(x, torch.rand(2), torch.randn(2, 8, text_dim), torch.ones(2, 8, dtype=torch.bool), None).square().mean()
    engine.backward(loss)
    engine.step()
    frags = Z.fragments(engine)

    class Loader:
        def state_dict(self):
            return {"pos": 1}

    return engine, frags, ShardedEMA(cfg.ema, frags), Loader()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="S", help="DiT size preset (S: ~33 M parameters, B: ~130 M)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    from tessera.trainer import train_state as TS
    from tessera.trainer import zero_state as Z
    from tessera.trainer.checkpoint import AsyncWriter, CheckpointManager

    engine, frags, ema, loader = build(args.preset)
    n = sum(f.full_numel for f in frags)
    tmp = Path(tempfile.mkdtemp(prefix="tessera-ckpt-bench-"))
    (tmp / "config.yaml").write_text("bench: true\n")
    ckpt = TS.Checkpointer(CheckpointManager(str(tmp / "ours"), keep_last=1), AsyncWriter(), str(tmp / "config.yaml"),
                           "bench")
    st = TS.TrainState()

    def run_peer() -> float:
        t0 = time.perf_counter()
        state = {"model": {k: v.detach().clone() for k, v in engine.module.state_dict().items()},
                 "optimizer": {f"{k}/{f.name}": f.view(k).clone() for k in Z.MOMENTS for f in frags},
                 "ema": {k: v.clone() for k, v in ema.shadow.items()}}
        torch.save(state, tmp / "peer.pt")
        os.sync()  # the peer's file is durable when its call returns, as ours is when committed
        return time.perf_counter() - t0

    def run_ours() -> float:
        st.step += 1
        t0 = time.perf_counter()
        ckpt.save(engine, frags, ema, loader, st)
        blocked = time.perf_counter() - t0
        ckpt.writer.wait()  # outside the timing: the loop would be training meanwhile
        return blocked

    report = Report("checkpoint", params={**vars(args), "parameters": n},
                    libraries=["torch", "deepspeed", "safetensors"])
    report.compare(Comparison(name=f"DiT-{args.preset} ({n / 1e6:.0f} M params) blocked per save", metric="s",
                              higher_is_better=False, peer="torch.save", ours="tessera async"),
                   run_peer, run_ours, repeats=args.repeats)
    report.write()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
