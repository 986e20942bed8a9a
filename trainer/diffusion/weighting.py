"""Per-sample loss weights as a function of the noise level.

min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy") clamps the
x0-space weight at ``gamma`` so low-noise steps stop dominating the gradient. Expressed for each prediction
target it becomes (same as diffusers' ``train_text_to_image.py``):

* x0:  min(snr, gamma)
* eps: min(snr, gamma) / snr
* v:   min(snr, gamma) / (snr + 1)
"""

from __future__ import annotations

import torch

PREDICTIONS = ("eps", "v", "x0")


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """min-SNR-gamma weight for a (B,) SNR tensor and a prediction target ``eps`` | ``v`` | ``x0``."""
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
    clipped = torch.clamp(snr, max=gamma)
    if prediction == "x0":
        return clipped
    if prediction == "eps":
        # min(snr, g)/snr == min(1, g/snr); this form stays finite (1) at the zero-terminal-SNR step.
        return torch.clamp(gamma / snr, max=1.0)
    if prediction == "v":
        return clipped / (snr + 1)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 (Karras et al. 2022)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
