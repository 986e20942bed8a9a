"""Fine-tuning methods, one module each, registered in ``METHODS`` on import (see ``base.py`` for the contract)."""

from tessera.finetune.methods.base import METHODS, Batch, Context, Method
from tessera.finetune.methods.dpo import DPO
from tessera.finetune.methods.draft import DRaFT
from tessera.finetune.methods.policy_gradient import PolicyGradient

__all__ = ["METHODS", "Batch", "Context", "Method", "DPO", "DRaFT", "PolicyGradient"]
