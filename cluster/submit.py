"""``tessera submit``: validate and stage the stage's config, render it for a backend, submit, record, report."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from typing import TextIO

from tessera.cluster.backend import BackendError, get_backend
from tessera.cluster.config import ClusterConfig, load_cluster_config, packaged_config
from tessera.cluster.grace import grace_warning
from tessera.cluster.records import JobRecord, JobStore
from tessera.cluster.secrets import check_clean
from tessera.cluster.spec import JobSpec, new_job_id
from tessera.cluster.stages import (
    has_run, is_distributed, progress_paths, ray_address_overrides, resolve_config, stage_words, wandb_info,
)  # fmt: skip
from tessera.config import ConfigError
from tessera.tracking import run_wandb_id

CLUSTER_PREFIX = "cluster."
_SLURM_ID = re.compile(r"^\d+(_\d+)?$")  # a job, or one task of an array


@dataclass(kw_only=True)
class SubmitRequest:
    """What the user asked for on the command line."""

    stage: list[str]
    config: str
    overrides: list[str] = field(default_factory=list)  # stage overrides and cluster.* overrides, mixed
    cluster_file: str | None = None
    flags: dict = field(default_factory=dict)  # --backend, --nodes, ... (None: not given)
    after: str | None = None
    array: int | None = None
    checkpoints: list[str] = field(default_factory=list)
    dry_run: bool = False


def cluster_config(req: SubmitRequest) -> ClusterConfig:
    """The cluster config: the file (default: the packaged ``configs/cluster/<backend>.yaml``, so the shortest
    command asks for the GPUs, time and grace a real job needs), then ``cluster.*`` overrides, then the flags."""
    ovs = [o[len(CLUSTER_PREFIX):] for o in req.overrides if o.startswith(CLUSTER_PREFIX)]
    names = {"backend": "backend", "nodes": "resources.nodes", "gpus_per_node": "resources.gpus_per_node",
             "time": "resources.time", "partition": "slurm.partition", "account": "slurm.account"}
    ovs += [f"{key}={req.flags[flag]}" for flag, key in names.items() if req.flags.get(flag) is not None]
    path = req.cluster_file
    if path is None:
        backend = next((o.split("=", 1)[1] for o in reversed(ovs) if o.startswith("backend=")), "slurm")
        try:
            path = str(packaged_config(backend))
        except ValueError as e:
            raise ConfigError(f"cluster.{e}") from None
    return load_cluster_config(path, ovs)


def scheduler_dependency(ref: str, backend: str, store: JobStore) -> str:
    """The scheduler id that ``--after REF`` waits for: a Tessera job's (by id, backend id or prefix), or, on
    Slurm, a job id submitted some other way (``12345``, an array task ``12345_7``)."""
    try:
        rec = store.find(ref)
    except ConfigError:
        if backend == "slurm" and _SLURM_ID.match(ref):
            return ref  # not ours: sbatch itself refuses an id it does not know
        raise ConfigError(f"--after {ref!r}: no Tessera job of that id in {store.root}"
                          f"{' and not a Slurm job id' if backend == 'slurm' else ''}") from None
    if rec.backend != backend:
        raise ConfigError(f"--after {ref!r}: job {rec.id} runs on {rec.backend}, this one on {backend}")
    if not rec.backend_id:
        raise ConfigError(f"job {ref!r} has no backend id yet")
    return rec.backend_id


def build_spec(req: SubmitRequest, cluster: ClusterConfig, store: JobStore, job_id: str | None = None,
               cwd: str | None = None) -> JobSpec:
    """Resolve the stage's config (its own ``--dry-run``) and describe the job."""
    stage = stage_words(req.stage)
    stage_ovs = [o for o in req.overrides if not o.startswith(CLUSTER_PREFIX)]
    extra = [a for c in req.checkpoints for a in ("--checkpoint", c)]
    text, resolved = resolve_config(stage, req.config, stage_ovs, extra)
    job_id = job_id or new_job_id(stage)
    args: list[str] = []
    run_id = wid = None
    if has_run(resolved):
        # A new run gets the job's id; a config naming its run (run.id) continues that run.
        run_id = resolved["run"].get("id") or job_id
        if not resolved["run"].get("id"):
            args.append(f"run.id={run_id}")
        wid = _wandb_id(resolved, run_id, args)
    if cluster.backend == "ray" or (cluster.backend == "k8s" and not is_distributed(stage)):
        args += ray_address_overrides(resolved)  # the stage uses the Ray cluster it runs in (a RayJob's on k8s)
    after = scheduler_dependency(req.after, cluster.backend, store) if req.after else None
    return JobSpec(id=job_id, stage=stage, stage_args=args + extra, cluster=cluster, job_dir=store.job_dir(job_id),
                   submit_cwd=cwd or os.getcwd(), config_text=text, run_id=run_id,
                   wandb=wandb_info(resolved, run_id, wid), progress_paths=progress_paths(resolved, run_id), after=after,
                   array=req.array)


def _wandb_id(resolved: dict, run_id: str, args: list[str]) -> str | None:
    """The W&B id the job's run logs to: the one its run directory keeps, or a new unique one passed to the job as
    ``tracking.id`` (which a config may also set itself)."""
    tracking = resolved.get("tracking")
    if not isinstance(tracking, dict):
        return None
    if tracking.get("id"):
        return str(tracking["id"])
    wid, new = run_wandb_id(str(resolved["run"]["root"]), run_id)
    if new:
        args.append(f"tracking.id={wid}")
    return wid


def submit(req: SubmitRequest, out: TextIO = sys.stdout) -> int:
    """Render and (unless ``dry_run``) submit; prints the artefacts on a dry run, else the job summary."""
    submit_record(req, out)
    return 0


def submit_record(req: SubmitRequest, out: TextIO = sys.stdout) -> JobRecord | None:
    """``submit``, returning the new job's record (None on a dry run)."""
    cluster = cluster_config(req)
    if req.after and cluster.backend == "ray":
        raise ConfigError("--after needs a scheduler with dependencies (Slurm); on Ray submit when the job ends")
    store = JobStore(cluster.state_path)
    spec = build_spec(req, cluster, store)
    if warning := grace_warning(spec):
        print(f"tessera submit: warning: {warning}", file=sys.stderr)
    backend = get_backend(cluster.backend)
    artefacts = backend.render(spec)
    check_clean({"the resolved config": spec.config_text, **artefacts})
    if req.dry_run:
        for name, text in artefacts.items():
            out.write(f"# ---- {name} (tessera submit --dry-run: nothing was submitted)\n{text}")
            out.write("" if text.endswith("\n") else "\n")
        return None
    record = JobRecord(id=spec.id, backend=cluster.backend, stage=spec.stage_str, run_id=spec.run_id,
                       wandb=spec.wandb, job_dir=str(spec.job_dir), log_dir=str(spec.log_dir),
                       config=str(spec.config_path), artefacts=sorted(artefacts), after=spec.after, array=spec.array,
                       retry={"preemptions": cluster.retry.preemptions, "crashes": cluster.retry.crashes})
    store.create(record, {spec.config_path.name: spec.config_text, **artefacts})
    try:
        backend.submit(spec, record, store)
    except BackendError as e:
        record.state, record.reason = "FAILED", f"not submitted: {e}"
        raise
    finally:
        store.save(record)
    check_clean({"the job record": record.to_json()})
    _report(record, out)
    return record


def _report(record: JobRecord, out: TextIO) -> None:
    """The three things a user needs next: the job id, where its logs are, and the W&B run."""
    out.write(f"submitted {record.stage} as job {record.id} ({record.backend} {record.backend_id})\n")
    where = record.log_dir if record.backend == "slurm" else record.endpoint
    out.write(f"  logs:  tessera jobs logs {record.id} --follow   ({where})\n")
    if record.wandb:
        w = record.wandb
        mode = f" ({w['mode']})" if w.get("mode") not in (None, "auto", "online") else ""
        out.write(f"  W&B:   {w['url']}{mode}\n")
    out.write(f"  state: tessera jobs status {record.id}\n")
