"""``tessera submit``: validate and stage the stage's config, render it for a backend, submit, record, report."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TextIO

from tessera.cluster.backend import BackendError, get_backend
from tessera.cluster.config import ClusterConfig, load_cluster_config
from tessera.cluster.records import JobRecord, JobStore
from tessera.cluster.secrets import check_clean
from tessera.cluster.spec import JobSpec, new_job_id
from tessera.cluster.stages import (
    has_run, is_distributed, progress_paths, ray_address_overrides, resolve_config, stage_words, wandb_info,
)  # fmt: skip
from tessera.config import ConfigError

CLUSTER_PREFIX = "cluster."


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
    """The cluster config: file, then ``cluster.*`` overrides, then the flags."""
    ovs = [o[len(CLUSTER_PREFIX):] for o in req.overrides if o.startswith(CLUSTER_PREFIX)]
    names = {"backend": "backend", "nodes": "resources.nodes", "gpus_per_node": "resources.gpus_per_node",
             "time": "resources.time", "partition": "slurm.partition", "account": "slurm.account"}
    ovs += [f"{key}={req.flags[flag]}" for flag, key in names.items() if req.flags.get(flag) is not None]
    return load_cluster_config(req.cluster_file, ovs)


def build_spec(req: SubmitRequest, cluster: ClusterConfig, store: JobStore, job_id: str | None = None,
               cwd: str | None = None) -> JobSpec:
    """Resolve the stage's config (its own ``--dry-run``) and describe the job."""
    stage = stage_words(req.stage)
    stage_ovs = [o for o in req.overrides if not o.startswith(CLUSTER_PREFIX)]
    extra = [a for c in req.checkpoints for a in ("--checkpoint", c)]
    text, resolved = resolve_config(stage, req.config, stage_ovs, extra)
    job_id = job_id or new_job_id(stage)
    args: list[str] = []
    run_id = None
    if has_run(resolved):
        # A new run gets the job's id; a config naming its run (run.id) continues that run.
        run_id = resolved["run"].get("id") or job_id
        if not resolved["run"].get("id"):
            args.append(f"run.id={run_id}")
    if cluster.backend == "ray" or (cluster.backend == "k8s" and not is_distributed(stage)):
        args += ray_address_overrides(resolved)  # the stage uses the Ray cluster it runs in (a RayJob's on k8s)
    after = store.find(req.after).backend_id if req.after else None
    if req.after and not after:
        raise ConfigError(f"job {req.after!r} has no backend id yet")
    return JobSpec(id=job_id, stage=stage, stage_args=args + extra, cluster=cluster, job_dir=store.job_dir(job_id),
                   submit_cwd=cwd or os.getcwd(), config_text=text, run_id=run_id,
                   wandb=wandb_info(resolved, run_id), progress_paths=progress_paths(resolved, run_id), after=after,
                   array=req.array)


def submit(req: SubmitRequest, out: TextIO = sys.stdout) -> int:
    """Render and (unless ``dry_run``) submit; prints the artefacts on a dry run, else the job summary."""
    cluster = cluster_config(req)
    if req.after and cluster.backend == "ray":
        raise ConfigError("--after needs a scheduler with dependencies (Slurm); on Ray submit when the job ends")
    store = JobStore(cluster.state_path)
    spec = build_spec(req, cluster, store)
    backend = get_backend(cluster.backend)
    artefacts = backend.render(spec)
    check_clean({"the resolved config": spec.config_text, **artefacts})
    if req.dry_run:
        for name, text in artefacts.items():
            out.write(f"# ---- {name} (tessera submit --dry-run: nothing was submitted)\n{text}")
            out.write("" if text.endswith("\n") else "\n")
        return 0
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
    return 0


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
