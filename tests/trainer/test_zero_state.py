"""Each rank's ZeRO slices, on 2 gloo ranks and ZeRO-1/2/3 after real optimizer steps: gathered to rank 0 they
are DeepSpeed's own full master weights and Adam moments; the sharded EMA is bitwise the EMA of the full
parameters; restoring full tensors into an engine of another stage gives the same state back."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tessera.trainer.launch import free_port
from tests.trainer.helpers import env

WORKER = r"""
import os, torch, deepspeed
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from tessera.trainer import zero_state as Z
from tessera.trainer.ds_config import DeepSpeedConfig, OptimConfig, build_ds_config
from tessera.trainer.ema import EMAConfig, ShardedEMA, ema_decay

deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()


def engine_for(stage, seed=0):
    torch.manual_seed(seed)
    # 7x5 and 13 elements: slices of odd sizes, and ZeRO-3 pads the last rank's partition
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.GELU(), torch.nn.Linear(5, 13))
    cfg = build_ds_config(DeepSpeedConfig(stage=stage, precision="fp32"), OptimConfig(lr=1e-2), micro_batch=4,
                          world_size=2, cuda=False)
    eng, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    return eng


def full_master(eng):
    return {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in eng.module.named_parameters()}


for stage in (1, 2, 3):
    eng = engine_for(stage)
    frags = Z.fragments(eng)
    assert sum(f.numel for f in frags) < sum(f.full_numel for f in frags), "each rank must own only a part"
    ema = ShardedEMA(EMAConfig(decay=0.9), frags)
    ref = full_master(eng)  # the EMA of the full parameters, kept the plain way
    g = torch.Generator().manual_seed(rank)
    for step in range(1, 6):
        loss = eng(torch.randn(4, 7, generator=g)).square().mean()
        eng.backward(loss)
        eng.step()
        d = ema.update(step)
        for n, w in full_master(eng).items():
            ref[n].lerp_(w, 1.0 - ema_decay(EMAConfig(decay=0.9), step))
    master = Z.gather_to_rank0(frags, lambda f: f.view())
    moments = {k: Z.gather_to_rank0(frags, lambda f, k=k: f.view(k)) for k in Z.MOMENTS}
    ema_full = ema.gather()
    full = full_master(eng)
    ds_moments = {k: {n: safe_get_full_optimizer_state(p, k).detach().cpu() for n, p in eng.module.named_parameters()}
                  for k in Z.MOMENTS}
    if rank == 0:
        assert master.keys() == full.keys()
        for n in full:
            assert torch.equal(master[n], full[n]), (stage, n)
            assert torch.equal(ema_full[n], ref[n]), (stage, "ema", n)
            assert not torch.equal(ema_full[n], full[n]), (stage, "ema equals the raw weights", n)
            for k in Z.MOMENTS:
                assert torch.equal(moments[k][n], ds_moments[k][n]), (stage, k, n)
    else:
        assert master == {} and ema_full == {}
    # Restore what rank 0 gathered into a fresh engine of the next stage: its gathered state is the same.
    box = [(master, moments, ema_full, Z.adam_step(eng))]
    dist.broadcast_object_list(box, src=0)
    master0, moments0, ema0, steps0 = box[0]
    other = engine_for(stage % 3 + 1, seed=1)
    ofrags = Z.fragments(other)
    Z.restore(other, master0.__getitem__, lambda name: moments0[name.split("/")[0]][name.split("/", 1)[1]], steps0)
    oema = ShardedEMA(EMAConfig(decay=0.9), ofrags)
    oema.load_full(ema0.__getitem__)
    back = Z.gather_to_rank0(ofrags, lambda f: f.view())
    back_m = Z.gather_to_rank0(ofrags, lambda f: f.view("exp_avg_sq"))
    back_e = oema.gather()
    if rank == 0:
        assert all(torch.equal(back[n], master0[n]) for n in master0), stage
        assert all(torch.equal(back_m[n], moments0["exp_avg_sq"][n]) for n in master0), stage
        assert all(torch.equal(back_e[n], ema0[n]) for n in ema0), stage
        assert Z.adam_step(other) == steps0 == 5
    # The module computes with the restored weights from its first forward (ZeRO-3 gathers them in forward).
    ref_model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.GELU(), torch.nn.Linear(5, 13))
    ref_model.load_state_dict(master0)
    assert torch.equal(other(torch.ones(3, 7)), ref_model(torch.ones(3, 7))), stage
    print(f"OK stage {stage}", flush=True)
"""


@pytest.mark.distributed
def test_zero_slices_gather_ema_and_restore_across_stages():
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu"))
             for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r}:\n{out[-4000:]}"
        assert all(f"OK stage {s}" in out for s in (1, 2, 3)), out[-2000:]
