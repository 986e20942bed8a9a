"""Fixtures for the cluster tests: a real single-node Slurm and a real Ray head, each started once for the whole
session and stopped by PID; the tiny training inputs; helpers to submit and wait."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.cluster.ray_head import RayHead
from tests.cluster.slurm_cluster import SlurmCluster, slurm_available
from tests.trainer import helpers as H

ROOT = Path(__file__).resolve().parents[2]
# Two planted secrets: no artefact, record, log or scheduler state may ever contain these values.
CANARIES = {"WANDB_API_KEY": "canary-wandb-7f3e9a1c55d2", "AWS_SECRET_ACCESS_KEY": "canary-aws-b81d4e6f0a93"}
# What every test job needs besides the stage config: offline hubs, the venv's prebuilt DeepSpeed ops, 1 thread.
JOB_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions"), "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """munged + slurmctld + slurmd from a temp config; ``SLURM_CONF`` points every client at it."""
    missing = slurm_available()
    if missing:
        pytest.fail(f"Slurm is not installed ({missing}): apt-get install slurm-wlm munge (make test does)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    old = os.environ.get("SLURM_CONF")
    cluster.start()
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    _stop_jobs(cluster)
    cluster.stop()
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def _stop_jobs(cluster: SlurmCluster) -> None:
    """Cancel what is left in this Slurm, then end its job processes (found by this cluster's SLURM_CONF)."""
    subprocess.run(["scancel", "--full", "--user", str(os.getuid())], capture_output=True, timeout=30)
    time.sleep(2)
    mine = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("SLURM_CONF") == str(cluster.conf) and p.pid != os.getpid():
                mine.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    for p in mine:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="session")
def ray_head():
    """``ray start --head`` on 127.0.0.1 with token authentication; stopped by its PID, never ``ray stop``."""
    head = RayHead(num_cpus=2)
    try:
        head.start()
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The trainer tests' tiny T5 encoder and dataset."""
    root = tmp_path_factory.mktemp("tiny")
    enc = H.tiny_text_encoder(root / "enc")
    H.tiny_dataset(root / "ds")
    return {"root": root, "enc": enc, "ds": str(root / "ds")}


def train_overrides(tiny, runs: Path, **extra) -> list[str]:
    """Overrides of tests/trainer/tiny_train.yaml for a run under ``runs`` (run.id left to the submitter)."""
    ov = {"run.root": str(runs), "run.id": "null", "data.path": tiny["ds"], "text_encoder.t5.path": tiny["enc"]}
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def cluster_overrides(state_dir: Path, **extra) -> list[str]:
    """``cluster.*`` overrides: a private state dir, the test job environment, this interpreter, and a job this
    2-CPU machine can run (the packaged defaults ask for a GPU node: 8 GPUs, 8 CPUs per rank)."""
    env = "{" + ", ".join(f"{k}: '{v}'" for k, v in JOB_ENV.items()) + "}"
    ov = {"state_dir": str(state_dir), "env": env, "python": sys.executable, "resources.gpus_per_node": 0,
          "resources.cpus_per_task": 1}
    ov.update(extra)
    return [f"cluster.{k}={v}" for k, v in ov.items()]


def tessera(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the ``tessera`` CLI in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "tessera.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env or dict(os.environ), timeout=timeout)


def submit(*args: str, env: dict | None = None) -> str:
    """``tessera submit ...``; returns the job id it printed."""
    out = tessera("submit", *args, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    first = out.stdout.splitlines()[0]
    assert first.startswith("submitted "), out.stdout
    return first.split(" as job ")[1].split()[0]


def record(state_dir: Path, job_id: str) -> dict:
    """The job record after a refresh (``tessera jobs status``)."""
    out = tessera("jobs", "status", "--state-dir", str(state_dir), job_id)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads((state_dir / job_id / "record.json").read_text())


def wait_for(state_dir: Path, job_id: str, done, timeout: float, what: str) -> dict:
    """Refresh the record until ``done(record)``; fail with the record and logs after ``timeout`` s."""
    from tessera.cluster.jobs import refresh
    from tessera.cluster.records import JobStore

    store = JobStore(state_dir)
    deadline = time.time() + timeout
    while True:
        rec = refresh(store.load(job_id), store)
        data = json.loads(rec.to_json())
        if done(data):
            return data
        if time.time() > deadline:
            logs = io.StringIO()
            for p in sorted((state_dir / job_id / "logs").glob("*")):
                logs.write(f"== {p.name}\n{p.read_text()[-3000:]}\n")
            raise AssertionError(f"timed out waiting for {what}: {rec.to_json()}\n{logs.getvalue()}")
        time.sleep(1)
