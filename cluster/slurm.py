"""Slurm: an sbatch script from ``templates/sbatch.sh.j2``; state from ``scontrol`` and the job's own events.

Slurm accounting (``sacct``) is often absent, so attempts (start, end, exit code, what was decided) are
appended by the batch script to ``<job dir>/events.jsonl``; ``scontrol`` adds the live state while Slurm still
knows the job (``MinJobAge``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from typing import TextIO

from tessera.cluster.backend import Backend, BackendError
from tessera.cluster.records import Attempt, JobRecord, JobStore
from tessera.cluster.secrets import submit_environment
from tessera.cluster.spec import JobSpec
from tessera.cluster.render import render_template
from tessera.config import ConfigError

SCRIPT = "job.sbatch"
_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING", "SUSPENDED"}
_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
_FAILED = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
_FINAL_ACTIONS = {"done": "COMPLETED", "fail": "FAILED", "cancelled": "CANCELLED"}
_POLL_S = 1.0
# Always set in the job: logs flush line by line, and no progress bars in log files.
_JOB_ENV = {"PYTHONUNBUFFERED": "1", "TESSERA_NO_PROGRESS": "1"}


def sbatch_options(spec: JobSpec) -> list[str]:
    """The ``#SBATCH`` lines of ``spec``."""
    c, r, s = spec.cluster, spec.cluster.resources, spec.cluster.slurm
    if r.nodes > 1 and not spec.distributed:
        raise ConfigError(f"only training stages span nodes; 'tessera {spec.stage_str}' runs on one node "
                          "(a data stage fans out over partitions with --array N)")
    tasks = r.ranks_per_node if spec.distributed else 1
    log = f"{spec.log_dir}/batch-%A_%a.out" if spec.array else f"{spec.log_dir}/batch-%j.out"
    opts = [f"--job-name={spec.name}", f"--nodes={r.nodes}", f"--ntasks-per-node={tasks}"]
    opts += [f"--gpus-per-node={r.gpus_per_node}"] if r.gpus_per_node else []
    opts += [f"--cpus-per-task={r.cpus_per_task}"] if r.cpus_per_task else []
    opts += [f"--mem={r.mem_gb}G"] if r.mem_gb else []
    opts += [f"--time={r.time}"] if r.time else []
    opts += [f"--{k}={v}" for k, v in (("partition", s.partition), ("account", s.account), ("qos", s.qos)) if v]
    opts += [f"--chdir={c.workdir or spec.submit_cwd}", f"--output={log}", "--open-mode=append", "--requeue",
             f"--signal=B:USR1@{s.signal_grace_s}"]
    if spec.after:
        opts += [f"--dependency=afterok:{spec.after}", "--kill-on-invalid-dep=yes"]
    if spec.array:
        opts += [f"--array=0-{spec.array - 1}"]
    return opts + list(s.extra_sbatch)


def launch_line(spec: JobSpec) -> str:
    """The srun command: one task per rank for training (the ranks of every node), one task otherwise."""
    c, r, s = spec.cluster, spec.cluster.resources, spec.cluster.slurm
    python = c.python or sys.executable
    tasks = f"--ntasks-per-node={r.ranks_per_node}" if spec.distributed else "--ntasks=1"
    srun = ["srun", "--kill-on-bad-exit=1", tasks]
    # Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task: without this every rank (and its loader
    # workers) would be bound to one CPU.
    srun += [f"--cpus-per-task={r.cpus_per_task}"] if r.cpus_per_task else []
    srun += [f"--cpu-bind={s.cpu_bind}"] if s.cpu_bind else []
    srun += [f"--gpu-bind={s.gpu_bind}"] if s.gpu_bind and r.gpus_per_node else []
    array = [_array_arg(a) for a in c.slurm.array_overrides] if spec.array else []
    cmd = [*srun, *s.srun_args, *spec.command(python, str(spec.config_path))]
    return " ".join([shlex.quote(a) for a in cmd] + array)


def _array_arg(template: str) -> str:
    """One array override for bash: ``{index}``/``{count}`` become the task's index and the task count."""
    quoted = template.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`").replace("$", "\\$")
    quoted = quoted.replace("{index}", "${SLURM_ARRAY_TASK_ID}").replace("{count}", "${SLURM_ARRAY_TASK_COUNT}")
    return f'"{quoted}"'


def render_script(spec: JobSpec) -> str:
    """The sbatch script of ``spec``."""
    c, r = spec.cluster, spec.cluster.resources
    env = dict(_JOB_ENV)
    if r.cpus_per_task:  # each task's (rank's) threads match its CPUs; torch would otherwise take the whole node's
        env["OMP_NUM_THREADS"] = str(r.cpus_per_task)
    if spec.distributed:
        env.update(c.distributed.environment())
        if r.nodes * r.ranks_per_node == 1:
            # One rank: name the layout, so the trainer rendezvouses on MASTER_PORT (from the job id) instead of
            # its single-process default port, which two one-rank jobs on a node would both take.
            env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.update(c.env)
    secrets_file = os.path.expanduser(c.slurm.secrets_file) if c.slurm.secrets_file else None
    return render_template(
        "sbatch.sh.j2", id=spec.id, stage=spec.stage_str, sbatch=sbatch_options(spec),
        job_dir=shlex.quote(str(spec.job_dir)), log_dir=shlex.quote(str(spec.log_dir)),
        progress=" ".join(shlex.quote(p) for p in spec.progress_paths),
        secrets_file=shlex.quote(secrets_file) if secrets_file else None, secrets=" ".join(c.secrets) or "",
        env=[(k, shlex.quote(v)) for k, v in env.items()],
        launch=launch_line(spec), preemptions=c.retry.preemptions, crashes=c.retry.crashes)


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=submit_environment())
    except FileNotFoundError:
        raise BackendError(f"{argv[0]} not found: is Slurm installed on this machine?") from None


def scontrol_jobs(job_id: str) -> list[dict[str, str]]:
    """``scontrol show job -o``, one mapping per job (or array task); empty once Slurm forgot the job."""
    out = _run(["scontrol", "show", "job", "-o", job_id])
    if out.returncode != 0:
        return []
    jobs = []
    for line in out.stdout.splitlines():
        fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        if fields.get("JobId"):
            jobs.append(fields)
    return jobs


def _state(jobs: list[dict[str, str]]) -> tuple[str, str | None]:
    """One tessera state (and Slurm's reason) for a job or all tasks of an array."""
    states = [j.get("JobState", "UNKNOWN").split("+")[0] for j in jobs]
    reason = next((j.get("Reason") for j in jobs if j.get("Reason") not in (None, "None")), None)
    for group, name in ((_RUNNING, "RUNNING"), (_PENDING, "PENDING")):
        if any(s in group for s in states):
            return name, reason
    if states and all(s == "COMPLETED" for s in states):
        return "COMPLETED", None
    if any(s == "CANCELLED" for s in states):
        return "CANCELLED", reason
    return "FAILED", reason


def attempts_from_events(events: list[dict]) -> list[Attempt]:
    """Fold the batch script's start/end lines into attempts, in order."""
    by_key: dict[tuple[str, int], Attempt] = {}
    for ev in events:
        key = (str(ev.get("task", "0")), int(ev.get("attempt", 0)))
        a = by_key.setdefault(key, Attempt(n=key[1], task=key[0], backend_id=str(ev.get("slurm_job_id", ""))))
        if ev.get("event") == "start":
            a.start, a.log = ev.get("time"), ev.get("log")
        elif ev.get("event") == "end":
            a.end, a.exit_code, a.action = ev.get("time"), ev.get("exit_code"), ev.get("action")
        elif ev.get("event") == "requeue-failed":
            a.action = "fail"
    return sorted(by_key.values(), key=lambda a: (int(a.task or 0), a.n))


class SlurmBackend(Backend):
    """sbatch / scontrol / scancel on the machine that runs ``tessera``."""

    name = "slurm"

    def render(self, spec: JobSpec) -> dict[str, str]:
        """``{"job.sbatch": script}``."""
        if spec.array and not spec.data:
            raise ConfigError(f"--array is for data stages, not 'tessera {spec.stage_str}'")
        return {SCRIPT: render_script(spec)}

    def submit(self, spec: JobSpec, record: JobRecord, store: JobStore) -> None:
        """``sbatch --parsable``, from a clean environment (no secrets, no inherited SLURM_*/SBATCH_*)."""
        out = _run(["sbatch", "--parsable", str(spec.job_dir / SCRIPT)])
        if out.returncode != 0:
            raise BackendError(f"sbatch failed: {out.stderr.strip() or out.stdout.strip()}")
        record.backend_id = out.stdout.strip().split(";")[0]
        record.state = "PENDING"

    def refresh(self, record: JobRecord, store: JobStore) -> None:
        """Attempts from the job's events; state from ``scontrol`` (or from the last event once Slurm forgot)."""
        # scontrol first: the batch script writes an attempt's end before the job ends, so events read after a
        # final state always hold that end (read before, a job ending in between showed FAILED with no end yet).
        jobs = scontrol_jobs(record.backend_id) if record.backend_id else []
        events, _ = store.events(record.id)
        record.attempts = attempts_from_events(events)
        if jobs:
            record.state, record.reason = _state(jobs)
        elif record.attempts and record.attempts[-1].action in _FINAL_ACTIONS:
            record.state, record.reason = _FINAL_ACTIONS[record.attempts[-1].action], None
        if record.cancelled and record.final:
            record.state = "CANCELLED"
        store.save(record)

    def logs(self, record: JobRecord, store: JobStore, attempt: int | None, follow: bool, out: TextIO) -> None:
        """Print one attempt's log; ``follow`` prints as it grows and moves on to later attempts until the end."""
        shown: dict[str, int] = {}
        while True:
            self.refresh(record, store)
            tasks = [a for a in record.attempts if attempt is None or a.n == attempt]
            if attempt is None:  # the latest attempt of each task
                tasks = list({a.task: a for a in tasks}.values())
            for a in tasks:
                if a.log and os.path.exists(a.log):
                    if a.log not in shown and (len(tasks) > 1 or follow):
                        out.write(f"==> task {a.task} attempt {a.n}: {a.log} <==\n")
                    shown[a.log] = _copy_from(a.log, shown.get(a.log, 0), out)
            out.flush()
            if not follow or record.final:
                break
            time.sleep(_POLL_S)
        if not shown:
            out.write(f"no log yet: job {record.id} is {record.state}"
                      f"{f' ({record.reason})' if record.reason else ''}\n")

    def cancel(self, record: JobRecord, store: JobStore) -> None:
        """Mark the job cancelled (so the batch script will not requeue it), then ``scancel``."""
        (store.job_dir(record.id) / "CANCELLED").write_text(f"{time.time()}\n")
        record.cancelled = True
        store.save(record)
        out = _run(["scancel", record.backend_id])
        if out.returncode != 0:
            raise BackendError(f"scancel {record.backend_id} failed: {out.stderr.strip()}")


def _copy_from(path: str, offset: int, out: TextIO) -> int:
    """Write ``path`` from byte ``offset`` to ``out``; returns the new offset."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    out.write(data.decode("utf-8", errors="replace"))
    return offset + len(data)
