"""``ClusterConfig``: where and how a stage runs on a cluster, loaded strictly from ``--cluster FILE`` plus
``cluster.key=value`` overrides, then the ``tessera submit`` flags (``--nodes``, ``--time``, ...)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tessera.cluster.secrets import is_secret_name
from tessera.config import load_config

_TIME_RE = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")  # Slurm's [D-]HH[:MM[:SS]] and MM forms
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DEFAULT_STATE_DIR = "~/.tessera/jobs"


@dataclass(kw_only=True)
class ResourcesConfig:
    """What one job asks for."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU job; training runs one rank per GPU (one rank per node on CPU)
    cpus_per_task: int | None = None
    mem_gb: int | None = None  # per node
    time: str | None = None  # [D-]HH:MM:SS wall time; None: the partition's default

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise ValueError(f"nodes must be >= 1 and gpus_per_node >= 0, got {self.nodes}, {self.gpus_per_node}")
        if self.time is not None and not _TIME_RE.match(self.time):
            raise ValueError(f"time must look like 04:00:00 or 1-12:00:00, got {self.time!r}")

    @property
    def ranks_per_node(self) -> int:
        """Training ranks on each node: one per GPU, or one on a CPU node."""
        return max(1, self.gpus_per_node)


@dataclass(kw_only=True)
class RetryConfig:
    """Separate budgets: a preemption (exit 75) is always worth a requeue, a crash only when it made progress."""

    preemptions: int = 10  # requeues after exit 75 (or after a forwarded preemption signal)
    crashes: int = 2  # requeues after any other failure (not 1/2) whose attempt made progress

    def __post_init__(self) -> None:
        if self.preemptions < 0 or self.crashes < 0:
            raise ValueError("retry budgets must be >= 0")


@dataclass(kw_only=True)
class SlurmConfig:
    """sbatch options and the batch script's behaviour."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    signal_grace_s: int = 120  # Slurm sends USR1 to the batch shell this long before the time limit
    launcher: Literal["srun", "torchrun"] = "srun"  # training: one srun task per GPU, or torchrun per node
    secrets_file: str | None = "~/.tessera/secrets.env"  # KEY=VALUE, mode 0600, read by the job at start
    array_overrides: list[str] = field(default_factory=list)  # per array task: "{index}" and "{count}" filled in
    extra_sbatch: list[str] = field(default_factory=list)  # more sbatch options, e.g. ["--constraint=a100"]

    def __post_init__(self) -> None:
        if self.signal_grace_s < 0:
            raise ValueError(f"signal_grace_s must be >= 0, got {self.signal_grace_s}")
        for opt in self.extra_sbatch:
            if not opt.startswith("--") or "\n" in opt:
                raise ValueError(f"extra_sbatch entries are long options like '--constraint=a100', got {opt!r}")


@dataclass(kw_only=True)
class RayJobsConfig:
    """The Ray Jobs API of a running cluster (its dashboard address)."""

    address: str = "http://127.0.0.1:8265"
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    train_workers: int | None = None  # Ray Train workers for train/finetune; None: nodes x ranks per node
    # ray_train: Ray Train workers across the cluster; process: `tessera train --nproc N` in the job's driver on
    # one node, which keeps the preemption contract (SIGTERM -> checkpoint -> exit 75 -> resubmitted)
    train_launcher: Literal["ray_train", "process"] = "ray_train"


@dataclass(kw_only=True)
class K8sConfig:
    """Manifests for a KubeRay RayJob (data and eval stages) or a Kubeflow PyTorchJob (training)."""

    namespace: str = "default"
    image: str | None = None  # required: an image with tessera installed
    secret_name: str = "tessera-secrets"  # a k8s Secret whose keys are the names in cluster.secrets
    apply: Literal["auto", "never", "always"] = "auto"  # auto: kubectl apply when kubectl is on PATH
    service_account: str | None = None
    volume_claim: str | None = None  # a PersistentVolumeClaim mounted at the job's workdir (runs, data)
    cpus_per_node: int = 8
    memory_gb_per_node: int = 32
    ray_version: str | None = None  # None: the Ray version installed here


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
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    ray: RayJobsConfig = field(default_factory=RayJobsConfig)
    k8s: K8sConfig = field(default_factory=K8sConfig)

    def __post_init__(self) -> None:
        for name in [*self.env, *self.secrets]:
            if not _NAME_RE.match(name):
                raise ValueError(f"{name!r} is not an environment variable name")
        leaked = [k for k in self.env if is_secret_name(k)]
        if leaked:
            raise ValueError(f"env must not carry secrets ({', '.join(leaked)}): list their names in 'secrets' and "
                             "provide them on the cluster (secrets file, cluster environment or k8s Secret)")

    @property
    def state_path(self) -> Path:
        """The state directory, absolute."""
        return state_path(self.state_dir)


def state_path(state_dir: str | None) -> Path:
    """``state_dir``, else ``$TESSERA_STATE_DIR``, else ``~/.tessera/jobs``; ``~`` expanded, absolute."""
    return Path(state_dir or os.environ.get("TESSERA_STATE_DIR") or DEFAULT_STATE_DIR).expanduser().resolve()


def load_cluster_config(path: str | None, overrides: list[str]) -> ClusterConfig:
    """The cluster config from ``path`` (or the defaults) plus overrides given without the ``cluster.`` prefix."""
    return load_config(ClusterConfig, path, overrides)
