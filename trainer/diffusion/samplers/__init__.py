"""Samplers, one file each, registered in ``SAMPLERS`` on import; see ``base.py`` for the contract."""

from trainer.diffusion.samplers.base import SAMPLERS, Sampler
from trainer.diffusion.samplers.ddim import DDIMSampler
from trainer.diffusion.samplers.ddpm import DDPMSampler
from trainer.diffusion.samplers.dpm_solver import DPMSolverSampler
from trainer.diffusion.samplers.edm_heun import EDMHeunSampler
from trainer.diffusion.samplers.euler import EulerDiscreteSampler, FlowEulerSampler

__all__ = [
    "SAMPLERS",
    "Sampler",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverSampler",
    "EDMHeunSampler",
    "EulerDiscreteSampler",
    "FlowEulerSampler",
]
