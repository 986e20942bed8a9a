"""A frozen base pinned by its weights' fingerprint: what ControlNet branches (``models/control.py``) and LoRA
adapters (``trainer/lora.py``) share. Their checkpoints and exports hold only what trains, plus the base's
fingerprint (the ``base_fingerprint`` buffer, saved with the other buffers); wherever they are loaded (resume,
sample, export), the base that ``model.init_from`` gives is checked against it, and a mismatch is refused naming
both fingerprints and where the base came from.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


class BaseMismatch(ValueError):
    """Trained weights (a control branch, a LoRA adapter) paired with another base than the one they trained on."""


def weights_fingerprint(model: nn.Module) -> bytes:
    """sha256 of a module's state (names, dtypes, shapes, bytes, in name order): the same weights give the same
    digest whatever file or format they were loaded from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


class PinnedBase(nn.Module):
    """An ``nn.Module`` over a frozen base: ``pin_base`` records the loaded base's fingerprint in the
    ``base_fingerprint`` buffer; ``check_base`` refuses saved weights whose buffer names another base; the first
    forward checks the buffer a resume restored. Subclasses name what they hold (``what``) and their error."""

    what = "these weights"
    mismatch: type[BaseMismatch] = BaseMismatch

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("base_fingerprint", torch.zeros(32, dtype=torch.uint8))
        self._pinned: bytes | None = None  # the fingerprint of the base this process loaded
        self._source = "the base model"
        self._checked = False

    def pin_base(self, base: nn.Module, source: str) -> None:
        """Record ``base``'s fingerprint (``source``: where its weights came from, for messages)."""
        self._pinned, self._source = weights_fingerprint(base), source
        self.base_fingerprint.copy_(torch.frombuffer(bytearray(self._pinned), dtype=torch.uint8))

    def check_base(self, saved: torch.Tensor | None, where: str) -> None:
        """Refuse saved weights (``where``) trained on another base than the one pinned here."""
        if self._pinned is None or saved is None or not bool(saved.any()):
            return
        got = bytes(saved.to(torch.uint8).cpu().tolist())
        if got != self._pinned:
            raise self.mismatch(
                f"{where}: {self.what} was trained on a base model with weights fingerprint {got.hex()[:16]}, "
                f"but {self._source} has {self._pinned.hex()[:16]}; pair it with the base it was trained on "
                "(model.init_from in its training config)")

    def check_restored(self) -> None:
        """Once, at the first forward: a resume restores the saved buffer before it, and it must be this base's."""
        if not self._checked:
            self.check_base(self.base_fingerprint, "the restored checkpoint")
            self._checked = True
