"""Where this process sits in the job (torchrun / srun / deepspeed / Ray Train / one process), the process
group, and the few collectives the loop itself makes.

The group has a backend per device type (``cpu:gloo,cuda:nccl`` on GPUs), so a CPU tensor and a CUDA tensor
can both take part in a collective; ``collective_device`` still puts the loop's per-step flags on the compute
device, so that reading them costs one host sync after one small all-reduce.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

log = logging.getLogger("tessera.distributed")


@dataclass
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    # A one-process run still opens a process group, on a free port: two such runs on one machine would
    # otherwise both take 29500 and the second would fail to start.
    master_port: int = field(default_factory=lambda: _port_of_one_process())
    launcher: str = "single"


def _port_of_one_process() -> int:
    """A free port: no peer has to find a one-process group, and a fixed one (29500, or the 20000 + job id a
    Slurm batch script exports) may be held by another process on a shared node."""
    from tessera.trainer.launch import free_port

    return free_port()


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
        world = int(env["WORLD_SIZE"])
        port = int(env.get("MASTER_PORT", 29500)) if world > 1 else _port_of_one_process()
        return DistEnv(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)), env.get("MASTER_ADDR", "127.0.0.1"),
                       port, "env")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job = int(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR") or _slurm_master(), int(env.get("MASTER_PORT", 20000 + job % 20000)),
                       "slurm")
    return DistEnv()


def init_distributed(denv: DistEnv) -> None:
    """Start the process group (gloo for CPU tensors, plus NCCL for CUDA ones on GPUs), with DeepSpeed's
    accelerator chosen by detection; a group started by the launcher (Ray Train) is reused."""
    from tessera.device import configure_deepspeed_accelerator, dist_backend

    configure_deepspeed_accelerator()
    os.environ.update({"RANK": str(denv.rank), "WORLD_SIZE": str(denv.world_size),
                       "LOCAL_RANK": str(denv.local_rank), "MASTER_ADDR": denv.master_addr,
                       "MASTER_PORT": str(denv.master_port)})
    import deepspeed
    import torch

    if torch.cuda.is_available():  # before any encoder is built on "the current device"
        torch.cuda.set_device(denv.local_rank % torch.cuda.device_count())
    timeout = dist_timeout()
    if denv.local_rank == 0:  # DeepSpeed's CPU shared-memory collective compiles on first use
        from tessera.trainer.ds_config import announce_op_builds

        announce_op_builds(["ShareMemCommBuilder"])
    deepspeed.init_distributed(dist_backend=dist_backend(), auto_mpi_discovery=False, verbose=False,
                               **({"timeout": timeout} if timeout else {}))


def dist_timeout() -> datetime.timedelta | None:
    """The process group's timeout, for the rendezvous and every collective, from ``TESSERA_DIST_TIMEOUT_S``
    (``tessera submit`` sets it from ``cluster.distributed.timeout_s``); None: DeepSpeed's default (10 minutes)."""
    raw = os.environ.get("TESSERA_DIST_TIMEOUT_S", "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ValueError(f"TESSERA_DIST_TIMEOUT_S must be a positive number of seconds, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def barrier() -> None:
    """A barrier when running distributed."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def collective_device(backend: str, compute: torch.device) -> torch.device:
    """Where the loop's collective tensors live: the compute device when the group has a backend for it, else
    the device the group does support (a pure NCCL group, as Ray Train starts on GPUs, only takes CUDA tensors)."""
    b = backend.lower()
    if compute.type == "cuda" and "nccl" in b:
        return compute
    if "gloo" in b or "mpi" in b:
        return torch.device("cpu")
    if "nccl" in b:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return compute


def all_reduce_sum(values: torch.Tensor) -> list[float]:
    """Sum a small 1-D tensor over ranks in one all-reduce (in fp64, on its device); reading the result is the
    one host sync."""
    return reduce_on_device(values).tolist()


def reduce_on_device(values: torch.Tensor) -> torch.Tensor:
    """``all_reduce_sum`` without the read: the fp64 sum stays on the device until someone needs it."""
    t = values.to(torch.float64)
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """Host numbers as a float64 tensor on ``device`` without making the host wait: staged in pinned memory and
    copied asynchronously on CUDA (a pageable copy would synchronise the stream)."""
    t = torch.tensor(values, dtype=torch.float64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's small picklable ``obj`` (plain JSON-like data) on rank 0, in rank order; None elsewhere."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def dealt(n: int) -> range:
    """The indices of ``n`` work items this rank takes when they are dealt round-robin (``r, r + world, ...``)."""
    return range(rank(), n, world_size())


def gather_dealt(local: torch.Tensor, total: int, compute: torch.device | None = None) -> torch.Tensor | None:
    """Rows dealt round-robin (this rank holds rows ``dealt(total)`` of ``local``), reassembled in order on rank 0
    (CPU); None on other ranks. Collective.

    Tensors only, nothing pickled: each rank pads its rows to ``ceil(total / world)`` and one ``gather`` brings them
    to rank 0, on the device the group takes for ``compute``'s type (``collective_device``: a pure NCCL group takes
    only CUDA tensors). Every rank must pass the same row shape and dtype, also a rank with no rows.
    """
    world, r = world_size(), rank()
    if local.shape[0] != len(dealt(total)):
        raise ValueError(f"rank {r} holds {local.shape[0]} rows, but {len(dealt(total))} of {total} are dealt to it")
    if world == 1:
        return local.cpu()
    per = -(-total // world)
    dev = collective_device(str(dist.get_backend()), compute or local.device)
    buf = torch.zeros((per, *local.shape[1:]), dtype=local.dtype, device=dev)
    buf[: local.shape[0]].copy_(local)
    parts = [torch.empty_like(buf) for _ in range(world)] if r == 0 else None
    dist.gather(buf, parts, dst=0)
    if parts is None:
        return None
    # parts[q][j] is row q + j * world: interleave (per, world, ...) back into item order.
    return torch.stack(parts, 1).reshape(per * world, *local.shape[1:])[:total].cpu()


def all_gather_dealt_json(n: int, read: Callable[[int], Any], compute: torch.device | None = None) -> list[Any]:
    """Items ``0..n-1`` on every rank, in order, each ``read`` by one rank only (dealt round-robin). Collective.

    For many small files that every rank needs (the old ranks' loader states at an elastic resume): each rank reads
    ``ceil(n / world)`` of them instead of all ``n``, and two ``all_gather`` calls share them. JSON through uint8
    tensors, nothing pickled (``all_gather_object`` would unpickle other ranks' bytes).
    """
    world = world_size()
    if world == 1:
        return [read(i) for i in range(n)]
    # json.dumps escapes every newline inside a value, so one separates the items.
    blob = b"\n".join(json.dumps(read(i), separators=(",", ":")).encode() for i in dealt(n))
    dev = collective_device(str(dist.get_backend()), compute or torch.device("cpu"))
    size = torch.tensor([len(blob)], dtype=torch.int64, device=dev)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    lengths = [int(s) for s in sizes]
    buf = torch.zeros(max(lengths), dtype=torch.uint8)
    if blob:
        buf[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    buf = buf.to(dev)
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    items: list[Any] = [None] * n
    for q, (part, length) in enumerate(zip(parts, lengths)):
        if length:
            for j, raw in enumerate(part[:length].cpu().numpy().tobytes().split(b"\n")):
                items[q + j * world] = json.loads(raw)
    return items


def shared_run_id(configured: str | None, make_new: Callable[[], str]) -> str:
    """One run id for every rank: the configured one; else the launcher's job id (``TESSERA_RUN_ID``,
    torchrun's ``TORCHELASTIC_RUN_ID``, ``SLURM_JOB_ID``), so a requeued job continues its run; else rank 0's
    new id, broadcast (each rank making its own would split the run over several directories)."""
    if configured:
        return configured
    env = os.environ
    for key in ("TESSERA_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        if env.get(key) and env[key] != "none":
            return f"slurm-{env[key]}" if key == "SLURM_JOB_ID" else env[key]
    box = [make_new() if rank() == 0 else None]
    if world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]
