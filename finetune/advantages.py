"""Advantages from rewards gathered over every rank (each rank then keeps its own rows).

* DDPO: per-prompt running statistics (ddpo-pytorch's ``PerPromptStatTracker``): each prompt keeps its last
  ``buffer_size`` rewards; with fewer than ``min_count`` the update's own mean and std stand in. The buffers
  are checkpointed, so a resumed run computes the same advantages.
* GRPO: group-relative, (r - mean of the prompt's group) / std, the std of the group or of the whole update
  (flow_grpo's ``global_std``).
"""

from __future__ import annotations

from collections import deque

import numpy as np


class PerPromptStats:
    """DDPO's per-prompt reward buffers."""

    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Add the rewards to their prompts' buffers; return (r - mean) / (std + 1e-6) per sample."""
        rewards = np.asarray(rewards, np.float64)
        prompts_arr = np.asarray(prompts, dtype=object)
        adv = np.empty_like(rewards)
        for p in sorted(set(prompts)):
            mask = prompts_arr == p
            buf = self.buffers.setdefault(p, deque(maxlen=self.buffer_size))
            buf.extend(rewards[mask].tolist())
            ref = np.asarray(buf) if len(buf) >= self.min_count else rewards
            adv[mask] = (rewards[mask] - ref.mean()) / (ref.std() + 1e-6)
        return adv

    def state_dict(self) -> dict:
        """The buffers as JSON-ready lists (floats round-trip exactly through JSON)."""
        return {"buffers": {p: list(b) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the buffers."""
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state.get("buffers", {}).items()}


def group_advantages(prompts: list[str], rewards: np.ndarray, global_std: bool, eps: float = 1e-4) -> np.ndarray:
    """(r - group mean) / (std + eps), the std of the group or of every reward (Flow-GRPO)."""
    rewards = np.asarray(rewards, np.float64)
    prompts_arr = np.asarray(prompts, dtype=object)
    adv = np.empty_like(rewards)
    for p in set(prompts):
        mask = prompts_arr == p
        std = rewards.std() if global_std else rewards[mask].std()
        adv[mask] = (rewards[mask] - rewards[mask].mean()) / (std + eps)
    return adv


def zero_std_share(prompts: list[str], rewards: np.ndarray) -> float:
    """Share of the update's prompt groups whose rewards are all equal (they teach nothing)."""
    rewards = np.asarray(rewards, np.float64)
    prompts_arr = np.asarray(prompts, dtype=object)
    groups = [rewards[prompts_arr == p] for p in set(prompts)]
    return float(np.mean([g.max() == g.min() for g in groups])) if groups else 0.0
