"""The start of every job that runs on the trainer's seams (``tessera train``, ``tessera finetune``): the same
steps in the same order, so a fine-tuning run directory is a training run directory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tessera import lineage, storage
from tessera.assets import require_assets
from tessera.device import pick_device
from tessera.tracking import Run, Tracker, new_run_id
from tessera.trainer import checkpoint as C
from tessera.trainer.distributed import detect_env, init_distributed, shared_run_id
from tessera.trainer.engine import seed_everything


@dataclass
class Session:
    """This process's place in the job and the run it writes to."""

    rank: int
    world: int
    device: torch.device
    run: Run
    config_hash: str  # of the job config written to the run directory; checkpoints carry it
    tracker: Tracker


def start_session(cfg) -> Session:
    """Join the process group, seed this rank, pick the device, agree on one run id over the ranks, log to the
    run directory, write the job config there and open the tracker.

    ``cfg`` is a job config with ``train.seed``, ``train.deterministic``, ``run`` and ``tracking``."""
    require_assets(cfg)  # seconds, not minutes: before the process group and DeepSpeed's op builds
    denv = detect_env()
    init_distributed(denv)
    seed_everything(cfg.train.seed, denv.rank, cfg.train.deterministic)
    device = pick_device()
    run = Run(dataclasses.replace(cfg.run, id=shared_run_id(cfg.run.id, new_run_id)), denv.rank)
    run.attach_file_logging()
    config_hash = run.write_config(cfg)
    # A fine-tuning job (``checkpoint``) joins the W&B group and project of the run that wrote its base model.
    tracker = Tracker(cfg.tracking, run, cfg, source=getattr(cfg, "checkpoint", None) or None)
    track_lineage(tracker, cfg, run)
    return Session(denv.rank, denv.world_size, device, run, config_hash, tracker)


def track_lineage(tracker: Tracker, cfg, run: Run) -> None:
    """W&B lineage of a training job: its datasets as inputs, and the checkpoints committed by the end of this
    process as outputs (logged by reference when the tracker finishes)."""
    data = getattr(cfg, "data", None)
    for path in getattr(data, "paths", None) or []:
        tracker.use_artifact(lineage.dataset_artifact(path))
    root = getattr(cfg.train, "ckpt_root", None) or run.path("checkpoints")
    tracker.outputs_at_finish(lambda: checkpoint_artifacts(root, run.meta["wandb_id"]))


def checkpoint_artifacts(root: str, wandb_id: str) -> list[lineage.ArtifactRef]:
    """Every complete checkpoint under ``root`` as a version of ``model-<wandb_id>``."""
    refs = []
    for step in C.CheckpointManager(root).complete_steps():
        url = storage.join(root, C.step_dirname(step))
        state = C.read_json(storage.join(url, "trainer_state.json")).get("trainer", {})
        refs.append(lineage.checkpoint_artifact(url, wandb_id, step=step, samples=state.get("samples")))
    return refs
