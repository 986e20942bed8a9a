"""Each rank's ZeRO slices, on 2 gloo ranks and ZeRO-1/2/3 (and ZeRO-3 with the optimizer offloaded) after real
optimizer steps: the sharded EMA is bitwise the EMA of the full parameters; a sharded checkpoint, consolidated
offline, is DeepSpeed's own full master weights, Adam moments and the EMA; loading it into a fresh engine of
another stage restores the same state bit for bit, and the module computes with it. Restoring under ZeRO-3 with
offload writes DeepSpeed's real partitions even where its getter hands back a copy (as on a GPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tessera.trainer.launch import free_port
from tests.trainer.helpers import env

WORKER = r"""
import os, sys, torch, deepspeed
import torch.distributed as dist
from types import SimpleNamespace
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from tessera.trainer import checkpoint as C, shards as S, train_state as TS, zero_state as Z
from tessera.trainer.ds_config import DeepSpeedConfig, OptimConfig, build_ds_config
from tessera.trainer.ema import EMAConfig, ShardedEMA, ema_decay

deepspeed.init_distributed(dist_backend="gloo")
rank, root = dist.get_rank(), sys.argv[1]
(open(f"{root}/config.yaml", "w").write("x: 1\n") if rank == 0 else None)


def engine_for(stage, offload, seed=0):
    torch.manual_seed(seed)
    # 7x5 and 13 elements: slices of odd sizes, and ZeRO-3 pads the last rank's partition
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.GELU(), torch.nn.Linear(5, 13))
    cfg = build_ds_config(DeepSpeedConfig(stage=stage, precision="fp32", offload_optimizer=offload),
                          OptimConfig(lr=1e-2), micro_batch=4, world_size=2, cuda=False)
    eng, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    return eng


def full_master(eng):
    return {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in eng.module.named_parameters()}


def full_moments(eng):
    return {k: {n: safe_get_full_optimizer_state(p, k).detach().cpu().clone() for n, p in eng.module.named_parameters()}
            for k in Z.MOMENTS}


def copying_getter(eng):
    # On a GPU with the optimizer offloaded, DeepSpeed's getter returns partition.to(cuda): a copy. On the CPU
    # .to("cpu") is the partition itself, so the copy is made here the same way: a write into it is lost.
    z3 = eng.optimizer
    real = z3.get_local_fp32_param
    z3.get_local_fp32_param = lambda param, optim_state_key=None: real(param, optim_state_key).clone()


CASES = [(1, False), (2, False), (3, False), (3, True)]
for i, (stage, offload) in enumerate(CASES):
    eng = engine_for(stage, offload)
    frags = Z.fragments(eng)
    assert sum(f.numel for f in frags) < sum(f.full_numel for f in frags), "each rank must own only a part"
    ema = ShardedEMA(EMAConfig(decay=0.9), frags)
    ref = full_master(eng)  # the EMA of the full parameters, kept the plain way
    g = torch.Generator().manual_seed(rank)
    for step in range(1, 6):
        loss = eng(torch.randn(4, 7, generator=g)).square().mean()
        eng.backward(loss)
        eng.step()
        ema.update(step)
        for n, w in full_master(eng).items():
            ref[n].lerp_(w, 1.0 - ema_decay(EMAConfig(decay=0.9), step))
    master, moments = full_master(eng), full_moments(eng)
    ckpt = TS.Checkpointer(C.CheckpointManager(f"{root}/ck{i}"), f"{root}/config.yaml", "h")
    ckpt.save(eng, frags, ema, SimpleNamespace(state_dict=dict), TS.TrainState(step=5))
    ckpt.finish()
    url = f"{root}/ck{i}/step_000000005"
    index = S.ShardIndex(url, C.read_json(f"{url}/index.json"))  # offline, on every rank
    for n in master:
        assert torch.equal(index.full("weight")[n], master[n]), (stage, n)
        assert torch.equal(index.full("ema")[n], ref[n]), (stage, "ema", n)
        assert not torch.equal(ref[n], master[n]), (stage, "ema equals the raw weights", n)
        for k in Z.MOMENTS:
            assert torch.equal(index.full(k)[n], moments[k][n]), (stage, k, n)
    # Load it into a fresh engine of the next case: its state is the checkpoint's, bit for bit.
    ostage, ooffload = CASES[(i + 1) % len(CASES)]
    other = engine_for(ostage, ooffload, seed=1)
    if ostage == 3 and ooffload:
        copying_getter(other)
    x = torch.ones(3, 7)
    assert not torch.equal(other(x), eng(x)), "the fresh engine must start from other weights"
    ofrags = Z.fragments(other)
    oema = ShardedEMA(EMAConfig(decay=0.9), ofrags)
    st = TS.TrainState()
    TS.load(url, other, ofrags, oema, None, st, restore_loader=False)
    assert st.step == 5 and Z.adam_step(other) == 5
    back, back_m = full_master(other), full_moments(other)
    assert all(torch.equal(back[n], master[n]) for n in master), (ostage, ooffload)
    assert all(torch.equal(back_m[k][n], moments[k][n]) for k in Z.MOMENTS for n in master), (ostage, ooffload)
    back_e = oema.gather()
    assert rank != 0 or all(torch.equal(back_e[n], ref[n]) for n in ref), (ostage, "ema")
    # The module computes with the restored weights from its first forward (ZeRO-3 gathers them in forward).
    assert torch.equal(other(x), eng(x)), (ostage, ooffload)
    print(f"OK stage {stage}{' offload' if offload else ''} -> {ostage}{' offload' if ooffload else ''}", flush=True)
"""


@pytest.mark.distributed
def test_zero_slices_ema_sharded_save_and_restore_across_stages(tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu"))
             for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r}:\n{out[-4000:]}"
        assert out.count("OK stage") == 4, out[-2000:]
