"""What a stage needs on a cluster, learnt from the stage itself.

Any ``tessera`` stage can be submitted (``data ingest``, ``data recaption``, ``data precompute``, ``train``,
``finetune``, ``distill``, ``eval``, and stages added later): the submitter runs ``tessera STAGE --config F [k=v ...]
--dry-run`` here, which validates the config and prints it fully resolved. That text is staged into the job
directory and the job runs from it, so a requeued attempt sees exactly the config of the first one, however
the user's files change meanwhile. The resolved mapping also tells whether the stage has a run (``run.id``,
the W&B run) and where its progress shows (checkpoints, an output directory).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import yaml

from tessera.config import ConfigError

# Stages whose ranks form one process group: one rank per GPU across the job's nodes.
DISTRIBUTED = {"train", "finetune", "distill"}
# Stages made of independent shards: a Slurm job array may split them.
DATA = {"data"}
_STAGE_TIMEOUT_S = 300


def stage_words(stage: list[str] | str) -> list[str]:
    """``"data ingest"`` or ``["data", "ingest"]`` -> ``["data", "ingest"]``, checked to be plain words."""
    words = stage.split() if isinstance(stage, str) else [w for s in stage for w in s.split()]
    if not words or any(not w.replace("-", "").replace("_", "").isalnum() for w in words):
        raise ConfigError(f"STAGE must be tessera subcommand words such as 'train' or 'data ingest', got {stage!r}")
    return words


def is_distributed(stage: list[str]) -> bool:
    """True for stages that run one rank per GPU in one process group."""
    return stage[0] in DISTRIBUTED


def is_data(stage: list[str]) -> bool:
    """True for the data stages (ingest, recaption, precompute)."""
    return stage[0] in DATA


def resolve_config(stage: list[str], config: str, overrides: list[str], extra: list[str]) -> tuple[str, dict]:
    """Run the stage's ``--dry-run`` here; returns the resolved config text and its mapping.

    A bad config fails the submission with the stage's own message (unknown key, wrong type, file not found).
    """
    argv = [sys.executable, "-m", "tessera.cli", *stage, "--config", config, *overrides, *extra, "--dry-run"]
    env = dict(os.environ, TESSERA_NO_PROGRESS="1")
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=_STAGE_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"tessera {' '.join(stage)} --dry-run took over {_STAGE_TIMEOUT_S} s") from None
    if out.returncode != 0:
        msg = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit code {out.returncode}"
        raise ConfigError(f"'tessera {' '.join(stage)}' rejected the config: {msg.removeprefix('tessera: error: ')}")
    try:
        data = yaml.safe_load(out.stdout)
    except yaml.YAMLError as e:
        raise ConfigError(f"tessera {' '.join(stage)} --dry-run printed no YAML config: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"tessera {' '.join(stage)} --dry-run printed no config mapping")
    return out.stdout, data


def has_run(resolved: dict) -> bool:
    """True when the stage writes a run directory (``run.root``/``run.id``): training and fine-tuning."""
    run = resolved.get("run")
    return isinstance(run, dict) and "id" in run and "root" in run


def wandb_info(resolved: dict, run_id: str | None, wid: str | None = None) -> dict[str, Any] | None:
    """The W&B run the job logs to: its id is fixed at submit time (``tracking.id``, or the run directory's
    ``run.json`` for a run that exists), so every requeue continues it."""
    tracking = resolved.get("tracking")
    if run_id is None or wid is None or not isinstance(tracking, dict) or tracking.get("mode") == "disabled":
        return None
    project, entity, mode = tracking.get("project") or "tessera", tracking.get("entity"), tracking.get("mode")
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").replace("://api.", "://", 1).rstrip("/")
    url = f"{base}/{entity or '<your-entity>'}/{project}/runs/{wid}"
    return {"id": wid, "project": project, "entity": entity, "mode": mode, "url": url}


def progress_paths(resolved: dict, run_id: str | None) -> list[str]:
    """Local paths whose change shows an attempt made progress: the checkpoint pointer of a run, or the output
    directory of a data/eval stage. Remote (``s3://``) locations cannot be probed from a batch shell: then a
    crashed attempt counts as one without progress and is not retried."""
    paths: list[str] = []
    if has_run(resolved) and run_id:
        train = resolved.get("train") if isinstance(resolved.get("train"), dict) else {}
        ckpt_root = train.get("ckpt_root") or f"{str(resolved['run']['root']).rstrip('/')}/{run_id}/checkpoints"
        paths.append(f"{ckpt_root.rstrip('/')}/latest")
    elif isinstance(resolved.get("output"), str):
        paths.append(resolved["output"])
    return [p for p in paths if "://" not in p]


def ray_address_overrides(resolved: dict, prefix: str = "") -> list[str]:
    """``<section>.address=auto`` for every Ray address left to an embedded runtime (``ray.address`` of the data
    stages, ``distribute.address`` of eval): on a Ray cluster the stage uses the cluster it runs in."""
    out = []
    for key, value in resolved.items():
        if isinstance(value, dict):
            if "address" in value and value["address"] is None:
                out.append(f"{prefix}{key}.address=auto")
            out += ray_address_overrides(value, f"{prefix}{key}.")
    return out
