"""``JobSpec``: one backend-independent description of a job; each backend renders it its own way."""

from __future__ import annotations

import secrets as _secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from tessera.cluster.config import ClusterConfig
from tessera.cluster.stages import is_data, is_distributed

CONFIG_NAME = "config.yaml"


@dataclass(kw_only=True)
class JobSpec:
    """A stage, its staged config and where and how it runs."""

    id: str
    stage: list[str]  # tessera subcommand words: ["train"], ["data", "ingest"]
    stage_args: list[str]  # after --config: run.id=..., ray overrides, --checkpoint DIR
    cluster: ClusterConfig
    job_dir: Path
    submit_cwd: str
    config_text: str = ""  # the resolved config, staged as <job_dir>/config.yaml
    run_id: str | None = None
    wandb: dict | None = None
    progress_paths: list[str] = field(default_factory=list)
    after: str | None = None  # backend id of the job this one waits for (afterok)
    array: int | None = None  # Slurm: this many array tasks

    @property
    def name(self) -> str:
        """The scheduler-visible job name."""
        return f"tessera-{self.id}"

    @property
    def stage_str(self) -> str:
        """``"data ingest"``."""
        return " ".join(self.stage)

    @property
    def distributed(self) -> bool:
        """One rank per GPU in one process group (training)."""
        return is_distributed(self.stage)

    @property
    def data(self) -> bool:
        """A data stage (may run as a job array)."""
        return is_data(self.stage)

    @property
    def log_dir(self) -> Path:
        """Where the Slurm logs of every attempt go."""
        return self.job_dir / "logs"

    @property
    def config_path(self) -> Path:
        """The staged config on the submitting machine (a shared filesystem for Slurm)."""
        return self.job_dir / CONFIG_NAME

    def command(self, python: str, config_path: str) -> list[str]:
        """``python -m tessera.cli STAGE --config CONFIG [args]``."""
        return [python, "-m", "tessera.cli", *self.stage, "--config", config_path, *self.stage_args]


def new_job_id(stage: list[str]) -> str:
    """Sortable, unique, DNS-label-safe: ``train-20261202-173300-3fa2c1`` (also the run id of a new run)."""
    return f"{'-'.join(stage)}-{time.strftime('%Y%m%d-%H%M%S')}-{_secrets.token_hex(3)}"
