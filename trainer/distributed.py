"""Where this process sits in the job (torchrun / srun / deepspeed / Ray Train / one process) and the
process group.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass

import torch.distributed as dist

log = logging.getLogger("tessera.distributed")


@dataclass
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"


def _slurm_master() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30)
        return out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else nodes.split(",")[0]
    except (OSError, subprocess.TimeoutExpired):
        return nodes.split(",")[0]


def detect_env() -> DistEnv:
    """Rank layout from torch.distributed (Ray Train), torchrun/deepspeed (RANK...), or srun (SLURM_*)."""
    env = os.environ
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "initialized")
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "env")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR") or _slurm_master(), int(env.get("MASTER_PORT", 20000 + job % 20000)),
                       "slurm")
    return DistEnv()


def init_distributed(denv: DistEnv) -> None:
    """Start the process group: NCCL on CUDA, gloo on CPU, with DeepSpeed's accelerator chosen by detection."""
    from tessera.device import configure_deepspeed_accelerator, dist_backend

    configure_deepspeed_accelerator()
    os.environ.update({"RANK": str(denv.rank), "WORLD_SIZE": str(denv.world_size),
                       "LOCAL_RANK": str(denv.local_rank), "MASTER_ADDR": denv.master_addr,
                       "MASTER_PORT": str(denv.master_port)})
    import deepspeed
    import torch

    if torch.cuda.is_available():  # before any encoder is built on "the current device"
        torch.cuda.set_device(denv.local_rank % torch.cuda.device_count())
    deepspeed.init_distributed(dist_backend=dist_backend(), auto_mpi_discovery=False, verbose=False)


def barrier() -> None:
    """A barrier when running distributed."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
