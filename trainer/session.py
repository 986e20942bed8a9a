"""The start of every job that runs on the trainer's seams (``tessera train``, ``tessera finetune``): the same
steps in the same order, so a fine-tuning run directory is a training run directory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tessera.device import pick_device
from tessera.tracking import Run, Tracker, new_run_id
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
    denv = detect_env()
    init_distributed(denv)
    seed_everything(cfg.train.seed, denv.rank, cfg.train.deterministic)
    device = pick_device()
    run = Run(dataclasses.replace(cfg.run, id=shared_run_id(cfg.run.id, new_run_id)), denv.rank)
    run.attach_file_logging()
    config_hash = run.write_config(cfg)
    return Session(denv.rank, denv.world_size, device, run, config_hash, Tracker(cfg.tracking, run, cfg))
