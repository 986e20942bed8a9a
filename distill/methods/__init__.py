"""Distillation methods, one module each, registered in ``METHODS`` on import (see ``base.py`` for the contract)."""

from tessera.distill.methods.base import METHODS, Context, Method, ObjectiveMismatch
from tessera.distill.methods.lcm import LCM
from tessera.distill.methods.progressive import Progressive
from tessera.distill.methods.reflow import Reflow

__all__ = ["METHODS", "Context", "Method", "ObjectiveMismatch", "LCM", "Progressive", "Reflow"]
