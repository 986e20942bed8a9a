"""The Python handle on cluster jobs, as submitit and torchx offer: ``submit(...) -> Job`` and ``Job.status()``,
``wait()``, ``logs()``, ``cancel()``. The same code paths as ``tessera submit`` and ``tessera jobs``.

    from tessera.cluster import submit

    job = submit("train", config="configs/train/tiny_dit.yaml", overrides=["optim.lr=2e-4"],
                 backend="slurm", partition="gpu", time="04:00:00")
    ev = submit("eval", config="configs/eval/quick.yaml", checkpoints=[f"runs/{job.run_id}"], after=job)
    print(ev.wait(timeout=24 * 3600), ev.logs())
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Sequence

from tessera.cluster.backend import get_backend
from tessera.cluster.config import state_path
from tessera.cluster.records import JobRecord, JobStore


class Job:
    """A submitted job, read from its record (``<state dir>/<id>/record.json``)."""

    def __init__(self, job_id: str, state_dir: str | None = None) -> None:
        self.store = JobStore(state_path(state_dir))
        self.record: JobRecord = self.store.find(job_id)
        self.id = self.record.id

    def __repr__(self) -> str:
        return f"Job({self.id!r}, {self.record.backend} {self.record.backend_id}, {self.record.state})"

    @property
    def backend_id(self) -> str | None:
        """The scheduler's id (a Slurm job id, a Ray submission id, ``pytorchjob/<name>``)."""
        return self.record.backend_id

    @property
    def run_id(self) -> str | None:
        """The run the job trains (``runs/<run id>``), for training and fine-tuning."""
        return self.record.run_id

    def refresh(self) -> JobRecord:
        """The record, brought up to date with the scheduler (and resubmitted on Ray after a preemption)."""
        from tessera.cluster.jobs import refresh

        self.record = refresh(self.store.load(self.id), self.store)
        return self.record

    def status(self) -> str:
        """PENDING, RUNNING, COMPLETED, FAILED, CANCELLED (or WRITTEN: Kubernetes manifests not applied)."""
        return self.refresh().state

    def done(self) -> bool:
        """True once the job will not run again."""
        return self.refresh().final

    def wait(self, timeout: float | None = None, poll_s: float = 5.0) -> str:
        """Block until the job ends, through requeues and retries; returns its final state. Raises
        ``TimeoutError`` after ``timeout`` seconds (the job keeps running)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} is still {self.record.state} after {timeout} s")
            time.sleep(poll_s)
        return self.record.state

    def logs(self, attempt: int | None = None) -> str:
        """The log of ``attempt`` (default: the latest) as it is now."""
        out = io.StringIO()
        get_backend(self.record.backend).logs(self.record, self.store, attempt, False, out)
        return out.getvalue()

    def cancel(self) -> None:
        """Stop the job for good (no requeue, no resubmission); nothing to do once it ended."""
        if not self.done():
            get_backend(self.record.backend).cancel(self.record, self.store)


def submit(stage: str | Sequence[str], config: str, overrides: Sequence[str] = (), *, backend: str | None = None,
           cluster: str | None = None, cluster_overrides: Sequence[str] = (), nodes: int | None = None,
           gpus_per_node: int | None = None, time: str | None = None, partition: str | None = None,
           account: str | None = None, after: "Job | str | None" = None, array: int | None = None,
           checkpoints: Sequence[str] = ()) -> Job:
    """Submit ``tessera STAGE --config CONFIG [overrides]`` as ``tessera submit`` would and return its ``Job``.

    ``cluster`` is a cluster config file (default: the packaged one of ``backend``); ``cluster_overrides`` are
    ``KEY=VALUE`` for it (``resources.cpus_per_task=16``); ``after`` a ``Job``, a Tessera job id or a Slurm job id."""
    from tessera.cluster.submit import SubmitRequest, submit_record

    flags = {"backend": backend, "nodes": nodes, "gpus_per_node": gpus_per_node, "time": time,
             "partition": partition, "account": account}
    req = SubmitRequest(stage=[stage] if isinstance(stage, str) else list(stage), config=config,
                        overrides=[*overrides, *(f"cluster.{o}" for o in cluster_overrides)], cluster_file=cluster,
                        flags=flags, after=after.id if isinstance(after, Job) else after, array=array,
                        checkpoints=list(checkpoints))
    record = submit_record(req, io.StringIO())
    return Job(record.id, str(Path(record.job_dir).parent))
