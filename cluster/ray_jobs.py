"""Ray: the Ray Jobs API of a running cluster (``JobSubmissionClient``).

The job's ``runtime_env`` uploads a directory holding only the staged config; data and eval stages use the
cluster they run in (``ray.address=auto``), training runs through Ray Train (``tessera.cluster.ray_train``).
Ray does not requeue: when an attempt's driver exits 75 (preempted, checkpointed), ``tessera jobs`` submits
the next attempt (``<job>-a<N>``; a submission id cannot be reused) within the preemption budget. Secrets stay
out of ``runtime_env`` (anyone can read it at ``/api/jobs/``): the driver inherits them from the cluster.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import time
import zlib
from pathlib import Path
from typing import TextIO

from tessera.cluster.backend import Backend, BackendError
from tessera.cluster.config import ClusterConfig
from tessera.cluster.records import Attempt, JobRecord, JobStore
from tessera.cluster.spec import CONFIG_NAME, JobSpec
from tessera.config import ConfigError

REQUEST = "ray_job.json"
UPLOAD = "upload"  # <job dir>/upload: the runtime_env working_dir (the staged config only)
_STATES = {"PENDING": "PENDING", "RUNNING": "RUNNING", "SUCCEEDED": "COMPLETED", "STOPPED": "CANCELLED",
           "FAILED": "FAILED"}
_EXIT_PREEMPTED = 75
_POLL_S = 1.0


def entrypoint(spec: JobSpec) -> str:
    """The shell command Ray runs on the head node."""
    c = spec.cluster
    python = c.python or "python"
    config = '"$TESSERA_CONFIG"' if c.workdir else CONFIG_NAME
    if spec.distributed and c.ray.train_launcher == "process":
        if c.resources.nodes > 1:
            raise ConfigError("cluster.ray.train_launcher=process runs on one node; use ray_train for several")
        cmd = spec.command(python, "CONFIG") + ["--nproc", str(c.resources.ranks_per_node)]
    elif spec.distributed:
        cmd = [python, "-m", "tessera.cluster.ray_train", *ray_train_args(c), "--", *spec.stage, "--config", "CONFIG",
               *spec.stage_args]
    else:
        cmd = spec.command(python, "CONFIG")
    line = " ".join(config if a == "CONFIG" else shlex.quote(a) for a in cmd)
    if c.workdir:
        # The uploaded directory is Ray's cwd for the job: note the config's path there, then move.
        line = f'TESSERA_CONFIG="$PWD/{CONFIG_NAME}" && cd {shlex.quote(c.workdir)} && {line}'
    return line


def ray_train_args(c: ClusterConfig) -> list[str]:
    """How the driver sizes its Ray Train workers, decided here from the cluster config: the driver runs on a head
    node that usually has no GPU, so its own ``torch.cuda.is_available()`` says nothing about the workers."""
    r, ray = c.resources, c.ray
    workers = ray.train_workers or r.nodes * r.ranks_per_node
    use_gpu = {"on": "on", "off": "off"}.get(ray.train_use_gpu, "on" if r.gpus_per_node else "auto")
    args = ["--workers", str(workers), "--use-gpu", use_gpu, "--placement-strategy", ray.train_placement_strategy]
    if r.cpus_per_task:
        args += ["--cpus-per-worker", str(r.cpus_per_task)]
    for name, amount in sorted(ray.train_resources_per_worker.items()):
        args += ["--resource", f"{name}={amount:g}"]
    return args


def job_request(spec: JobSpec, attempt: int = 0) -> dict:
    """The Ray Jobs API request (``JobSubmissionClient.submit_job`` keyword arguments)."""
    c = spec.cluster
    env = {"PYTHONUNBUFFERED": "1", "TESSERA_NO_PROGRESS": "1", "TESSERA_JOB_ID": spec.id}
    if spec.distributed:
        env.update(c.distributed.environment())
    if spec.distributed and c.ray.train_launcher == "process" and c.resources.ranks_per_node == 1:
        # One rank in the driver: name the layout and a port of its own (not the single-process default 29500,
        # which two such jobs on one node would both take).
        port = 20000 + zlib.crc32(spec.id.encode()) % 20000
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    req = {
        "entrypoint": entrypoint(spec),
        "submission_id": submission_id(spec.id, attempt),
        "runtime_env": {"working_dir": str(spec.job_dir / UPLOAD), "env_vars": {**env, **c.env}},
        "metadata": {"tessera_job": spec.id, "stage": spec.stage_str, "run_id": spec.run_id or ""},
    }
    if c.ray.entrypoint_num_cpus is not None:
        req["entrypoint_num_cpus"] = c.ray.entrypoint_num_cpus
    if c.ray.entrypoint_num_gpus is not None:
        req["entrypoint_num_gpus"] = c.ray.entrypoint_num_gpus
    return req


def submission_id(job_id: str, attempt: int) -> str:
    """``<job>-a<attempt>``."""
    return f"{job_id}-a{attempt}"


def client(address: str):
    """A Jobs API client that sends this machine's Ray token (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN``...)."""
    from ray._raylet import AuthenticationTokenLoader
    from ray.job_submission import JobSubmissionClient

    # Ray's own token loader (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); the header is passed
    # explicitly, so it is sent whatever RAY_AUTH_MODE this process was started with.
    loader = AuthenticationTokenLoader.instance()
    headers = {}
    if loader.has_token(ignore_auth_mode=True):
        headers["Authorization"] = f"Bearer {loader.get_raw_token(ignore_auth_mode=True)}"
    return JobSubmissionClient(address, headers=headers)


class RayJobsBackend(Backend):
    """Jobs on a running Ray cluster, addressed by its dashboard URL (``cluster.ray.address``)."""

    name = "ray"

    def render(self, spec: JobSpec) -> dict[str, str]:
        """``{"ray_job.json": request}`` (the first attempt's)."""
        if spec.array:
            raise BackendError("--array is for Slurm; on Ray a data stage spreads its shards over the cluster")
        return {REQUEST: json.dumps(job_request(spec), indent=2) + "\n"}

    def submit(self, spec: JobSpec, record: JobRecord, store: JobStore) -> None:
        """Stage the upload directory and submit attempt 0."""
        upload = spec.job_dir / UPLOAD
        upload.mkdir(mode=0o700, exist_ok=True)
        shutil.copyfile(spec.config_path, upload / CONFIG_NAME)
        record.endpoint = spec.cluster.ray.address
        self._submit(record, json.loads((spec.job_dir / REQUEST).read_text()), 0)

    def _submit(self, record: JobRecord, request: dict, n: int) -> None:
        request = dict(request, submission_id=submission_id(record.id, n))
        try:
            sid = client(record.endpoint).submit_job(**request)
        except Exception as e:  # the SDK raises RuntimeError/ConnectionError with the server's message
            raise BackendError(f"Ray job submission to {record.endpoint} failed: {e}") from None
        record.backend_id = record.backend_id or sid
        record.attempts.append(Attempt(n=n, backend_id=sid, start=time.time()))
        record.state = "PENDING"

    def refresh(self, record: JobRecord, store: JobStore) -> None:
        """Update the latest attempt; resubmit after a preemption (exit 75) within the budget."""
        a = record.attempts[-1]
        try:
            info = client(record.endpoint).get_job_info(a.backend_id)
        except Exception as e:  # the SDK raises ConnectionError/RuntimeError with the server's message
            raise BackendError(f"the Ray Jobs API at {record.endpoint} did not answer for {a.backend_id}: {e}") \
                from None
        status = str(getattr(info.status, "value", info.status))
        record.state, record.reason = _STATES.get(status, status), info.message
        a.start = (info.start_time or 0) / 1000 or a.start
        a.end = (info.end_time or 0) / 1000 or None
        a.exit_code = getattr(info, "driver_exit_code", None)
        if record.state in ("COMPLETED", "CANCELLED", "FAILED"):
            a.action = {"COMPLETED": "done", "CANCELLED": "cancelled"}.get(record.state, "fail")
        if record.state == "FAILED" and a.exit_code == _EXIT_PREEMPTED and not record.cancelled:
            used = sum(1 for x in record.attempts if x.action == "requeue-preempted")
            if used < record.retry.get("preemptions", 0):
                a.action = "requeue-preempted"
                self._submit(record, json.loads((Path(record.job_dir) / REQUEST).read_text()), a.n + 1)
        store.save(record)

    def logs(self, record: JobRecord, store: JobStore, attempt: int | None, follow: bool, out: TextIO) -> None:
        """Print an attempt's driver log; ``follow`` tails it and each resubmitted attempt until the job ends."""
        c = client(record.endpoint)
        if not follow:
            a = record.attempts[-1] if attempt is None else record.attempts[attempt]
            out.write(c.get_job_logs(a.backend_id))
            return
        n = len(record.attempts) - 1 if attempt is None else attempt
        while True:
            sid = record.attempts[n].backend_id
            out.write(f"==> attempt {n}: {sid} <==\n")
            asyncio.run(_tail(c, sid, out))
            self.refresh(record, store)
            if n + 1 < len(record.attempts):
                n += 1
            elif record.final:
                return
            else:
                time.sleep(_POLL_S)

    def cancel(self, record: JobRecord, store: JobStore) -> None:
        """Mark the job cancelled (no resubmission) and stop the running attempt (SIGTERM to its driver)."""
        record.cancelled = True
        store.save(record)
        try:
            client(record.endpoint).stop_job(record.attempts[-1].backend_id)
        except Exception as e:
            raise BackendError(f"stopping Ray job {record.attempts[-1].backend_id} failed: {e}") from None


async def _tail(c, sid: str, out: TextIO) -> None:
    async for chunk in c.tail_job_logs(sid):
        out.write(chunk)
        out.flush()
