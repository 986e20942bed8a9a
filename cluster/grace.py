"""Is the preemption grace period long enough to checkpoint? The warning ``tessera submit`` prints when it is not.

A preempted training job gets a signal (Slurm: ``--signal=B:USR1@<slurm.signal_grace_s>``; Kubernetes: SIGTERM,
then SIGKILL after the pod's ``terminationGracePeriodSeconds``, ``k8s.grace_period_s``), finishes its step, saves
and exits 75. Every checkpoint records how long its save took (``trainer_state.json``: ``save.seconds``); when the
run being resumed has one, its newest is compared with the grace period (``ClusterConfig.grace_s``).
"""

from __future__ import annotations

import logging

import yaml

from tessera.cluster.spec import JobSpec

log = logging.getLogger("tessera.cluster")


def grace_warning(spec: JobSpec) -> str | None:
    """A warning when the newest checkpoint of the run being resumed took longer to save than the grace period."""
    grace = spec.cluster.grace_s
    if grace is None or not spec.distributed or spec.run_id is None:
        return None
    from tessera.trainer.checkpoint import CheckpointManager
    from tessera.trainer.train_state import save_seconds

    resolved = yaml.safe_load(spec.config_text) or {}
    train, run = resolved.get("train") or {}, resolved.get("run") or {}
    root = train.get("ckpt_root") or f"{str(run.get('root', '')).rstrip('/')}/{spec.run_id}/checkpoints"
    try:
        url = CheckpointManager(root).resolve(train.get("resume") or "auto")
        seconds = save_seconds(url) if url else None
    except (OSError, ValueError) as e:  # e.g. no S3 credentials on the submitting machine
        log.warning("could not read the last checkpoint's save time under %s: %s", root, e)
        return None
    if seconds is None or seconds <= grace:
        return None
    hint = "cluster.slurm.signal_grace_s" if spec.cluster.backend == "slurm" else "cluster.k8s.grace_period_s"
    return (f"the last checkpoint of this run ({url}) took {seconds:.0f} s to save, longer than the {grace} s "
            f"grace period after the preemption signal ({spec.cluster.backend}): a preempted attempt would be killed "
            f"before its checkpoint is committed (raise {hint})")
