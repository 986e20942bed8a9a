"""Noise schedules: DDPM betas, zero-terminal-SNR rescale, sigma tables, flow-matching shifts, Karras sigmas.

The DDPM tables are built exactly the way diffusers builds them (float32 ``linspace``/``cumprod``), so a
model trained with diffusers' schedulers sees bit-identical ``alphas_cumprod`` here. Samplers and objectives
cast these tables to float64 before doing arithmetic with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(kw_only=True)
class BetaScheduleConfig:
    """A discrete DDPM noise schedule (the diffusers ``beta_schedule`` family)."""

    schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    zero_terminal_snr: bool = False  # Lin et al. 2023; pair with v-prediction

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")


def cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the squared-cosine alpha_bar (Nichol & Dhariwal 2021), in float64 math, float32 out."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift/scale sqrt(alpha_bar) so the last step has SNR 0 and the first is unchanged (Lin et al. 2023, Alg. 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])  # undo the cumprod
    return 1.0 - alphas


def make_betas(cfg: BetaScheduleConfig) -> torch.Tensor:
    """The (T,) float32 beta table for a schedule config."""
    n = cfg.num_train_timesteps
    if cfg.schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    elif cfg.schedule == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    elif cfg.schedule == "squaredcos_cap_v2":
        betas = cosine_betas(n)
    else:
        raise ValueError(f"unknown beta schedule {cfg.schedule!r}")
    return rescale_zero_terminal_snr(betas) if cfg.zero_terminal_snr else betas


def alphas_cumprod(cfg: BetaScheduleConfig) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), (T,) float32."""
    return torch.cumprod(1.0 - make_betas(cfg), dim=0)


def ddpm_sigmas(ac: torch.Tensor, zero_terminal_snr: bool = False) -> torch.Tensor:
    """VE-form noise levels sigma_t = sqrt((1 - alpha_bar) / alpha_bar), (T,) in the dtype of ``ac``."""
    if zero_terminal_snr:
        # sigma would be infinite at SNR 0; diffusers clamps alpha_bar to 2**-24 there, and so do we.
        ac = ac.clone()
        ac[-1] = 2**-24
    return ((1 - ac) / ac) ** 0.5


def snr(ac: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar)."""
    return ac / (1 - ac)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 static shift of flow-matching noise levels: shift*s / (1 + (shift-1)*s); shift > 1 adds noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(mu: float, sigmas: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """FLUX/SD3 resolution-dependent (exponential) shift: e^mu / (e^mu + (1/s - 1)^power)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** power)


def calculate_shift(
    seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15
) -> float:
    """mu linear in the image token count: ``base_shift`` at ``base_seq_len``, ``max_shift`` at ``max_seq_len``."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + base_shift - m * base_seq_len


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM (Karras et al. 2022, eq. 5) noise levels, (n,) float64, from sigma_max down to sigma_min."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho
