"""Under ZeRO-1/2 in fp32 the module's parameters are the fp32 master weights bit for bit, so the EMA reads them
without a collective (trainer.checkpoint.full_fp32_params). Checked on 2 gloo ranks against DeepSpeed's own
gathered master weights after real optimizer steps."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.trainer.helpers import env
from tessera.trainer.launch import free_port

WORKER = r"""
import os, sys, torch, deepspeed
from deepspeed.utils import safe_get_full_fp32_param
from tessera.trainer.checkpoint import _module_holds_master, full_fp32_params
from tessera.trainer.ds_config import DeepSpeedConfig, OptimConfig, build_ds_config

stage = int(sys.argv[1])
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
cfg = build_ds_config(DeepSpeedConfig(stage=stage, precision="fp32"), OptimConfig(lr=1e-2), micro_batch=4,
                      world_size=2, total_steps=10, cuda=False)
engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
assert _module_holds_master(engine)
initial = {k: v.detach().clone() for k, v in engine.module.named_parameters()}
g = torch.Generator().manual_seed(int(os.environ["RANK"]))
for _ in range(5):
    loss = engine(torch.randn(4, 8, generator=g)).square().mean()
    engine.backward(loss)
    engine.step()
direct = full_fp32_params(engine)
for name, p in engine.module.named_parameters():
    master = safe_get_full_fp32_param(p)
    assert torch.equal(direct[name], master.cpu()), name
    assert not torch.equal(master.cpu(), initial[name]), name  # the steps really updated the weights
print("OK", stage, len(direct))
"""


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2])
def test_module_parameters_are_the_fp32_master_weights(stage, tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(stage)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu"))
             for r in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r}:\n{out[-3000:]}"
        assert f"OK {stage} 4" in out
