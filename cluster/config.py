"""``ClusterConfig``: where and how a stage runs on a cluster, loaded strictly from ``--cluster FILE`` (default: the
packaged ``configs/cluster/<backend>.yaml``) plus ``cluster.key=value`` overrides, then the ``tessera submit`` flags
(``--nodes``, ``--time``, ...)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tessera.cluster.secrets import is_secret_name
from tessera.config import load_config, shipped_configs

_TIME_RE = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")  # Slurm's [D-]HH[:MM[:SS]] and MM forms
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DEFAULT_STATE_DIR = "~/.tessera/jobs"
BACKEND_NAMES = ("slurm", "ray", "k8s")

# What a training job's process group gets unless ``distributed.env`` changes it (a null value drops one):
# a hung or failed collective ends the job (the scheduler then retries it) instead of idling every GPU until the
# time limit, and leaves a record of the collectives in flight to diagnose it.
DIST_ENV = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a timed-out NCCL collective aborts the process (tear down)
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # the flight recorder: the last 2000 collectives per rank...
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",  # ...dumped on a timeout (TORCH_NCCL_DEBUG_INFO_TEMP_FILE, /tmp by default)
    "NCCL_DEBUG": "WARN",  # NCCL's warnings reach the job log; INFO adds the topology and the chosen transports
}


@dataclass(kw_only=True)
class ResourcesConfig:
    """What one job asks for."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU job; training runs one rank per GPU (one rank per node on CPU)
    cpus_per_task: int | None = None  # per rank (training) or per job (other stages); also each rank's OMP threads
    mem_gb: int | None = None  # per node
    time: str | None = None  # [D-]HH:MM:SS wall time; None: the partition's default

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise ValueError(f"nodes must be >= 1 and gpus_per_node >= 0, got {self.nodes}, {self.gpus_per_node}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"cpus_per_task must be >= 1, got {self.cpus_per_task}")
        if self.time is not None and not _TIME_RE.match(self.time):
            raise ValueError(f"time must look like 04:00:00 or 1-12:00:00, got {self.time!r}")

    @property
    def ranks_per_node(self) -> int:
        """Training ranks on each node: one per GPU, or one on a CPU node."""
        return max(1, self.gpus_per_node)

    @property
    def seconds(self) -> int | None:
        """``time`` in seconds (Slurm's forms: a lone number is minutes), or None."""
        if not self.time:
            return None
        days, _, hms = self.time.rpartition("-")
        parts = [int(p) for p in hms.split(":")]
        parts = parts + [0] * (3 - len(parts)) if len(parts) > 1 else [0, parts[0], 0]
        return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


@dataclass(kw_only=True)
class RetryConfig:
    """Separate budgets: a preemption (exit 75) is always worth a requeue, a crash only when it made progress."""

    preemptions: int = 10  # requeues after exit 75 (or after a forwarded preemption signal)
    crashes: int = 2  # requeues after any other failure (not 1/2) whose attempt made progress

    def __post_init__(self) -> None:
        if self.preemptions < 0 or self.crashes < 0:
            raise ValueError("retry budgets must be >= 0")


@dataclass(kw_only=True)
class DistributedConfig:
    """The process group of a training job: its timeout and NCCL / torch.distributed environment."""

    # TESSERA_DIST_TIMEOUT_S: the rendezvous and every collective. A rank that stops answering (a dead node, a
    # hang) fails the job after this long, so it is retried, instead of holding every GPU until the time limit.
    # It must exceed the longest stretch where ranks wait on one another (a checkpoint commit, rank-0-only work).
    timeout_s: int = 1800
    env: dict[str, str | None] = field(default_factory=dict)  # over DIST_ENV; a null value drops a default

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")

    def environment(self) -> dict[str, str]:
        """What a training job exports: ``DIST_ENV`` changed by ``env``, and the timeout."""
        merged = {**DIST_ENV, **self.env}
        out = {k: v for k, v in merged.items() if v is not None}
        out["TESSERA_DIST_TIMEOUT_S"] = str(self.timeout_s)
        return out


def _srun_style(opts: list[str], what: str) -> None:
    for opt in opts:
        if not opt.startswith("--") or "\n" in opt:
            raise ValueError(f"{what} entries are long options like '--constraint=a100', got {opt!r}")


@dataclass(kw_only=True)
class SlurmConfig:
    """sbatch options and the batch script's behaviour.

    Training runs one srun task per rank, the only multi-GPU launcher on Slurm: srun gives each rank its own CPUs
    (``--cpus-per-task``, ``cpu_bind``) and delivers the time-limit and preemption signals to every rank itself.
    A launcher process between srun and the ranks (torchrun's agent) dies on SIGUSR1 and kills the ranks 30 s
    after a SIGTERM, mid-checkpoint; srun also reports the ranks' own exit code (75) to the batch script."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    signal_grace_s: int = 120  # Slurm sends USR1 to the batch shell this long before the time limit
    launcher: str = "srun"  # kept to name what replaced torchrun in old configs (see __post_init__)
    cpu_bind: str | None = "cores"  # srun --cpu-bind: each rank on its own cores (null: the site's default)
    gpu_bind: str | None = None  # srun --gpu-bind (null: every rank sees the node's GPUs and takes LOCAL_RANK,
    # so NCCL keeps peer access between them); e.g. "closest" with srun_args ["--distribution=block:block"]
    srun_args: list[str] = field(default_factory=list)  # more srun options for the stage's step
    secrets_file: str | None = "~/.tessera/secrets.env"  # KEY=VALUE, mode 0600, read by the job at start
    array_overrides: list[str] = field(default_factory=list)  # per array task: "{index}" and "{count}" filled in
    extra_sbatch: list[str] = field(default_factory=list)  # more sbatch options, e.g. ["--constraint=a100"]

    def __post_init__(self) -> None:
        if self.signal_grace_s < 0:
            raise ValueError(f"signal_grace_s must be >= 0, got {self.signal_grace_s}")
        if self.launcher != "srun":
            raise ValueError(f"launcher={self.launcher!r} is not supported: training on Slurm runs one srun task per "
                             "rank (srun binds each rank's CPUs and signals the ranks directly; torchrun's agent "
                             "dies on the time-limit SIGUSR1). Remove slurm.launcher from the cluster config.")
        _srun_style(self.extra_sbatch, "extra_sbatch")
        _srun_style(self.srun_args, "srun_args")


@dataclass(kw_only=True)
class RayJobsConfig:
    """The Ray Jobs API of a running cluster (its dashboard address), and how training uses the cluster."""

    address: str = "http://127.0.0.1:8265"
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    train_workers: int | None = None  # Ray Train workers for train/finetune; None: nodes x ranks per node
    # ray_train: Ray Train workers across the cluster; process: `tessera train --nproc N` in the job's driver on
    # one node, which keeps the preemption contract (SIGTERM -> checkpoint -> exit 75 -> resubmitted)
    train_launcher: Literal["ray_train", "process"] = "ray_train"
    # Ray Train workers' GPUs: on when resources.gpus_per_node > 0; auto: from the GPUs the cluster has (never
    # from the driver's own, which runs on a head node that usually has none)
    train_use_gpu: Literal["auto", "on", "off"] = "auto"
    train_resources_per_worker: dict[str, float] = field(default_factory=dict)  # over {CPU: cpus_per_task, GPU: 1}
    # PACK keeps a node's ranks together (NVLink, fewer hops); SPREAD/STRICT_SPREAD one worker per node first
    train_placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


@dataclass(kw_only=True)
class K8sConfig:
    """Manifests for a KubeRay RayJob (data and eval stages) or a Kubeflow PyTorchJob (training)."""

    namespace: str = "default"
    # An image with tessera installed: build it from the repository's Dockerfile,
    #   docker build -t <registry>/tessera:<version> . && docker push <registry>/tessera:<version>
    image: str | None = None
    secret_name: str = "tessera-secrets"  # a k8s Secret whose keys are the names in cluster.secrets
    apply: Literal["auto", "never", "always"] = "auto"  # auto: kubectl apply when kubectl is on PATH
    service_account: str | None = None
    volume_claim: str | None = None  # a PersistentVolumeClaim mounted at the job's workdir (runs, data)
    cpus_per_node: int = 8  # a pod's CPUs when resources.cpus_per_task is unset (else cpus_per_task x ranks)
    memory_gb_per_node: int = 32  # a pod's memory when resources.mem_gb is unset
    # terminationGracePeriodSeconds: SIGTERM -> SIGKILL. It must cover finishing a step and a checkpoint save.
    grace_period_s: int = 300
    shm_gb: int = 16  # a memory-backed /dev/shm (the container default, 64 MB, kills DataLoader workers)
    # RDMA / EFA devices per pod, e.g. {"rdma/ib": 1} or {"vpc.amazonaws.com/efa": 32}; adds IPC_LOCK
    rdma_resources: dict[str, int] = field(default_factory=dict)
    ray_version: str | None = None  # None: the Ray version installed here

    def __post_init__(self) -> None:
        if self.grace_period_s < 0 or self.shm_gb < 0:
            raise ValueError("grace_period_s and shm_gb must be >= 0")
        bad = [k for k, v in self.rdma_resources.items() if v < 1]
        if bad:
            raise ValueError(f"rdma_resources counts must be >= 1: {', '.join(bad)}")


@dataclass(kw_only=True)
class ClusterConfig:
    """Everything ``tessera submit`` needs besides the stage's own config."""

    backend: Literal["slurm", "ray", "k8s"] = "slurm"
    state_dir: str | None = None  # job records, staged configs, artefacts, Slurm logs (a shared filesystem);
    # None: $TESSERA_STATE_DIR, else ~/.tessera/jobs
    workdir: str | None = None  # the job's cwd; None: the submit cwd (Slurm), the uploaded dir (Ray), /workspace
    python: str | None = None  # the interpreter on the cluster; None: this one (Slurm), "python" (Ray, k8s)
    env: dict[str, str] = field(default_factory=dict)  # plain variables for the job; secrets are refused
    secrets: list[str] = field(default_factory=lambda: ["WANDB_API_KEY", "AWS_ACCESS_KEY_ID",
                                                        "AWS_SECRET_ACCESS_KEY"])  # names, never values
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    ray: RayJobsConfig = field(default_factory=RayJobsConfig)
    k8s: K8sConfig = field(default_factory=K8sConfig)

    def __post_init__(self) -> None:
        names = [*self.env, *self.secrets, *self.distributed.env]
        for name in names:
            if not _NAME_RE.match(name):
                raise ValueError(f"{name!r} is not an environment variable name")
        leaked = [k for k in [*self.env, *self.distributed.env] if is_secret_name(k)]
        if leaked:
            raise ValueError(f"env must not carry secrets ({', '.join(leaked)}): list their names in 'secrets' and "
                             "provide them on the cluster (secrets file, cluster environment or k8s Secret)")

    @property
    def state_path(self) -> Path:
        """The state directory, absolute."""
        return state_path(self.state_dir)

    @property
    def grace_s(self) -> int | None:
        """Seconds between the stop signal and the kill on this backend (Slurm's ``--signal`` lead time, the
        pod's termination grace period); None on Ray, whose job stop does not wait for a checkpoint."""
        return {"slurm": self.slurm.signal_grace_s, "k8s": self.k8s.grace_period_s}.get(self.backend)


def state_path(state_dir: str | None) -> Path:
    """``state_dir``, else ``$TESSERA_STATE_DIR``, else ``~/.tessera/jobs``; ``~`` expanded, absolute."""
    return Path(state_dir or os.environ.get("TESSERA_STATE_DIR") or DEFAULT_STATE_DIR).expanduser().resolve()


def packaged_config(backend: str) -> Path:
    """The cluster config shipped for ``backend`` (``configs/cluster/<backend>.yaml``): the defaults of a
    ``tessera submit`` without ``--cluster``."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_NAMES)}, got {backend!r}")
    return shipped_configs() / "cluster" / f"{backend}.yaml"


def load_cluster_config(path: str | None, overrides: list[str]) -> ClusterConfig:
    """The cluster config from ``path`` (or the class defaults) plus overrides given without the ``cluster.``
    prefix."""
    return load_config(ClusterConfig, path, overrides)
