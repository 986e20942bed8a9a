"""The sampler contract shared by every sampler, and the ``SAMPLERS`` registry.

A sampler follows diffusers' scheduler contract so single steps can be compared with diffusers:

* ``set_timesteps(n)`` fills ``timesteps`` (the values to iterate over, one per model evaluation);
* ``model_input(x, t) -> (x_in, timestep)``: what the network sees (scaled input, scalar timestep in the
  units the objective trained with);
* ``step(model_output, t, x, generator=None) -> x_next``: one update from the raw network output;
* ``noise_level(t) -> float``: how noisy the input at table value ``t`` is, on one scale for every objective
  (below), so a guidance interval means the same thing for a flow, DDPM or EDM model.

Samplers keep per-run state (step index, multistep history), so ``set_timesteps`` must be called first.
Stochastic steps draw noise from a CPU ``torch.Generator`` and move it to ``x.device``.
"""

from __future__ import annotations

import math

import torch

from tessera.registry import Registry

SAMPLERS: Registry[type] = Registry("sampler")


def step_noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, I) like ``x``, drawn on the generator's device (CPU by convention) then moved to x's device."""
    dev = generator.device if generator is not None else torch.device("cpu")
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.randn(x.shape, generator=generator, device=dev, dtype=dtype).to(x.device, x.dtype)


def level_from_sigma(sigma: float) -> float:
    """The noise level sigma / (1 + sigma) of a noise-to-signal ratio sigma (EDM's sigma; inf -> 1).

    It is the rectified-flow time with the same signal-to-noise ratio: x_t = (1 - t) x0 + t eps has
    sigma = t / (1 - t). 0 is clean data, 1 pure noise.
    """
    return 1.0 if math.isinf(sigma) else sigma / (1.0 + sigma)


def level_from_alpha_bar(alpha_bar: float) -> float:
    """The noise level of a VP (DDPM) step: sqrt(1 - ab) / (sqrt(ab) + sqrt(1 - ab)), 1 at zero terminal SNR."""
    a, s = math.sqrt(max(alpha_bar, 0.0)), math.sqrt(max(1.0 - alpha_bar, 0.0))
    return s / (a + s)


class Sampler:
    """Base class: subclasses set ``timesteps`` and implement ``step``; ``objective`` names the family."""

    objective: str = ""  # "ddpm" | "flow" | "edm": the training objective whose models this samples
    init_noise_sigma: float = 1.0  # x_T = init_noise_sigma * N(0, I)
    timesteps: torch.Tensor

    def set_timesteps(self, n: int, *, image_shape: tuple[int, ...] | None = None) -> None:
        """Prepare ``timesteps`` for an n-step run (``image_shape`` is for resolution-dependent shifts)."""
        raise NotImplementedError

    def model_input(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The network input and the scalar timestep it sees at table value ``t``."""
        return x, float(t)

    def step(
        self, model_output: torch.Tensor, t: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Advance ``x`` from table value ``t`` to the next one."""
        raise NotImplementedError

    def noise_level(self, t: torch.Tensor) -> float:
        """The noise level in [0, 1] (``level_from_sigma``) of the input at table value ``t``."""
        raise NotImplementedError(f"{type(self).__name__} does not report its noise level")
