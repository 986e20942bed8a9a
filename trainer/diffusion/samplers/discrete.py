"""Helpers shared by the discrete-time (DDPM-schedule) samplers: timestep spacing and x0/eps recovery."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Spacing = Literal["linspace", "leading", "trailing"]


def spaced_timesteps(num_train: int, n: int, spacing: Spacing, steps_offset: int = 0) -> np.ndarray:
    """n descending integer timesteps out of 0..T-1, with diffusers' spacing rules (Lin et al. 2023, Table 2)."""
    if not 0 < n <= num_train:
        raise ValueError(f"steps must be in 1..{num_train}, got {n}")
    if spacing == "linspace":
        ts = np.linspace(0, num_train - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, n) * (num_train // n)).round()[::-1] + steps_offset
    elif spacing == "trailing":  # starts at T-1, so zero-terminal-SNR models see SNR 0 first
        ts = np.round(np.arange(num_train, 0, -num_train / n)) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}")
    return ts.astype(np.int64).copy()


def to_x0_eps(
    prediction: str, out: torch.Tensor, x: torch.Tensor, ab: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) implied by a network output of type eps | v | x0 at x_t with alpha_bar ``ab``."""
    a, s = ab**0.5, (1 - ab) ** 0.5
    if prediction == "eps":
        return (x - s * out) / a, out
    if prediction == "x0":
        return out, (x - a * out) / s
    if prediction == "v":
        return a * x - s * out, a * out + s * x
    raise ValueError(f"prediction must be eps, v or x0, got {prediction!r}")
