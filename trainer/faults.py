"""Fault injection for tests and drills (``debug:`` config): non-finite losses and gradients on a chosen rank at
chosen optimizer steps, slow or failing checkpoint writes, and a per-step record of the sample keys each rank
trained on."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch


@dataclass(kw_only=True)
class DebugConfig:
    """Fault injection for tests and drills: non-finite loss/gradients at given optimizer steps (0-based)."""

    nan_loss_at_steps: list[int] = field(default_factory=list)
    nan_grad_at_steps: list[int] = field(default_factory=list)
    nan_rank: int = 0  # which rank is poisoned (-1: all)
    record_keys: bool = False  # append each step's sample keys to <run>/keys/rank<R>.jsonl (data lineage audits)
    ckpt_write_delay_s: float = 0.0  # sleep between checkpoint files (widens the window a kill test aims at)
    ckpt_fail_steps: list[int] = field(default_factory=list)  # the checkpoints of these steps fail to write ...
    ckpt_fail_rank: int = 0  # ... on this rank (-1: all), after its shard is written


def hits(cfg: DebugConfig, steps: list[int], step: int, rank: int) -> bool:
    """True when this rank is poisoned at ``step``."""
    return step in steps and cfg.nan_rank in (rank, -1)


def poison_local_grads(engine) -> None:
    """Make this rank's gradients infinite after backward (tests the gradient-norm guard): ZeRO-2 keeps the
    reduced partition in ``averaged_gradients``, ZeRO-1/3 in the parameters' or fp32 partitions' ``.grad``."""
    opt = engine.optimizer
    touched = False
    for group in getattr(opt, "averaged_gradients", {}).values() or []:
        for g in group or []:
            g.fill_(float("inf"))
            touched = True
    for p in engine.module.parameters():
        if p.grad is not None:
            p.grad.fill_(float("inf"))
            touched = True
    for fp32 in getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_partitioned_groups_flat",
                                                                                 None) or []:
        if fp32.grad is not None:
            fp32.grad.fill_(float("inf"))
            touched = True
    if not touched:
        raise RuntimeError("fault injection found no gradient to poison")


def checkpoint_drill(cfg: DebugConfig, rank: int):
    """What a rank's checkpoint writer runs between its files (``Checkpointer.between_files``): the drill's
    delay, and the injected write failure of ``ckpt_fail_steps`` on ``ckpt_fail_rank``."""
    def between_files(step: int) -> None:
        if cfg.ckpt_write_delay_s > 0:
            time.sleep(cfg.ckpt_write_delay_s)
        if step in cfg.ckpt_fail_steps and cfg.ckpt_fail_rank in (rank, -1):
            raise OSError(f"injected checkpoint write failure on rank {rank} at step {step} (debug.ckpt_fail_steps)")

    return between_files


def record_keys(local_dir, rank: int, step: int, keys: list[str]) -> None:
    """Append this step's sample keys (data lineage) to ``keys/rank<R>.jsonl`` in the run's local dir."""
    path = local_dir / "keys" / f"rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "keys": keys}) + "\n")


def nan_like(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` times NaN: keeps the graph, so backward gives non-finite gradients."""
    return loss * float("nan")
