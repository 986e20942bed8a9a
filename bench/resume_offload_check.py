"""GPU check: a checkpoint restored under ZeRO-3 with the optimizer (and optionally the parameters) offloaded to the
CPU reaches DeepSpeed's real fp32 partitions (``bench/gpu_check.py`` runs it; on a CPU it is a smoke test).

With offload on a GPU, DeepSpeed's ``safe_get_local_fp32_param`` returns ``partition.to(cuda)``, a copy: a restore
that wrote into it would leave the initial weights in place while the counters carry on. This trains a DiT for a
few steps, saves a sharded checkpoint, loads it into a fresh engine (other initial weights) and checks that the
fresh engine's full fp32 weights and Adam moments are the checkpoint's, bit for bit, and that its forward matches.
The last line printed is a JSON summary; the exit code is 1 when the check fails.

    .venv/bin/python bench/resume_offload_check.py [--preset S] [--steps 3] [--offload-param]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="S")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--offload-param", action="store_true", help="offload the parameters too (ZeRO-Infinity's CPU)")
    args = ap.parse_args()
    from tessera.trainer.launch import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from tessera.config import from_dict
    from tessera.device import pick_device
    from tessera.trainer import checkpoint as C
    from tessera.trainer import train_state as TS
    from tessera.trainer import zero_state as Z
    from tessera.trainer.config import TrainJobConfig
    from tessera.trainer.distributed import detect_env, init_distributed
    from tessera.trainer.engine import build_engine

    init_distributed(detect_env())
    device = pick_device()
    cfg = from_dict(TrainJobConfig, {"model": {"name": "dit", "dit": {"preset": args.preset, "in_channels": 4}},
                                     "data": {"path": "unused", "batch_size": 2},
                                     "deepspeed": {"stage": 3, "offload_optimizer": True,
                                                   "offload_param": args.offload_param}}, "resume_offload_check")
    text_dim = cfg.model.section().text_dim

    def engine(seed: int):
        torch.manual_seed(seed)
        eng, dtype = build_engine(cfg.model.build(), cfg, 1, device)
        return eng, dtype

    def forward(eng, dtype, seed: int):
        g = torch.Generator().manual_seed(seed)
        x, t = torch.randn(2, 4, 16, 16, generator=g), torch.rand(2, generator=g)
        c = torch.randn(2, 8, text_dim, generator=g)
        return eng(x.to(device, dtype), t.to(device), c.to(device, dtype), torch.ones(2, 8, dtype=torch.bool,
                                                                                     device=device), None).float()

    def state(eng, moments: bool = True):
        return {n: (safe_get_full_fp32_param(p).cpu().clone(),
                    [safe_get_full_optimizer_state(p, k).cpu().clone() for k in Z.MOMENTS] if moments else [])
                for n, p in eng.module.named_parameters()}

    eng, dtype = engine(0)
    print(f"engine: ZeRO-{eng.zero_optimization_stage()}, {dtype}, offload={eng.zero_cpu_offload()}, {device}")
    for step in range(args.steps):
        eng.backward(forward(eng, dtype, step).square().mean())
        eng.step()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "config.yaml").write_text("check: true\n")
        ckpt = TS.Checkpointer(C.CheckpointManager(f"{tmp}/ck"), f"{tmp}/config.yaml", "check", device=device)
        ckpt.save(eng, Z.fragments(eng), None, SimpleNamespace(state_dict=dict), TS.TrainState(step=args.steps))
        ckpt.finish()
        saved, out = state(eng), forward(eng, dtype, 99)
        fresh, _ = engine(1)
        before = state(fresh, moments=False)  # Adam's state exists only after a step (or a load)
        TS.load(f"{tmp}/ck/step_{args.steps:09d}", fresh, Z.fragments(fresh), None, None, TS.TrainState(),
                restore_loader=False)
        after = state(fresh)
    moved = sum(not torch.equal(before[n][0], saved[n][0]) for n in saved)
    wrong = [n for n in saved if not torch.equal(after[n][0], saved[n][0])
             or not all(torch.equal(a, b) for a, b in zip(after[n][1], saved[n][1]))]
    same_out = torch.allclose(forward(fresh, dtype, 99), out, rtol=1e-3, atol=1e-3)
    ok = bool(moved) and not wrong and same_out
    print(json.dumps({"ok": ok, "parameters": len(saved), "differed_before_load": moved,
                      "differ_after_load": len(wrong), "forward_matches": same_out,
                      "offload_param": args.offload_param, "device": str(device)}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
