"""Samplers, one file each, registered in ``SAMPLERS`` on import; see ``base.py`` for the contract."""

from tessera.trainer.diffusion.samplers.base import SAMPLERS, Sampler
from tessera.trainer.diffusion.samplers.ddim import DDIMSampler
from tessera.trainer.diffusion.samplers.ddpm import DDPMSampler
from tessera.trainer.diffusion.samplers.dpm_solver import DPMSolverSampler
from tessera.trainer.diffusion.samplers.edm_heun import EDMHeunSampler
from tessera.trainer.diffusion.samplers.euler import EulerDiscreteSampler, FlowEulerSampler
from tessera.trainer.diffusion.samplers.euler_uniform import FlowEulerUniformSampler
from tessera.trainer.diffusion.samplers.lcm import LCMSampler

__all__ = [
    "SAMPLERS",
    "Sampler",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverSampler",
    "EDMHeunSampler",
    "EulerDiscreteSampler",
    "FlowEulerSampler",
    "FlowEulerUniformSampler",
    "LCMSampler",
]
