"""Regional ``torch.compile``: each repeated transformer block is compiled, not the whole model (torchtitan's
``apply_compile``).

Why per block: the blocks of a DiT/MMDiT are one class with one ``forward``; torch always inlines ``nn.Module``s
and treats their parameters as graph inputs, so the first block's compiled graph serves every block and a
12-block model compiles once instead of tracing the whole network (minutes at 28+ layers). The glue around the
blocks (patch embedding, final layer, masks) stays eager, where a graph break would cost nothing. Activation
checkpointing (``torch.utils.checkpoint`` around each block in the model's forward) wraps the compiled block, as
torchtitan does. ZeRO-3 is left eager: its parameter gathering runs in module hooks inside the blocks, which
would break every graph.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("tessera.train")

BLOCK_LISTS = ("blocks",)  # the ModuleList attributes that hold a family's repeated blocks (DiT, MMDiT)


def wants_compile(mode: str, device: torch.device) -> bool:
    """``train.compile``: on, off, or auto (on with CUDA; on CPU inductor's compile costs more than it saves)."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def compile_blocks(model: torch.nn.Module, mode: str, device: torch.device, zero_stage: int,
                   backend: str = "inductor") -> int:
    """Compile ``model``'s repeated blocks in place (``Module.compile``) when ``mode`` asks for it; returns how
    many were compiled (0: the model runs eager)."""
    if not wants_compile(mode, device):
        return 0
    blocks = [b for name in BLOCK_LISTS for b in getattr(model, name, None) or []]
    if not blocks:
        log.info("train.compile=%s: %s has no repeated blocks to compile; running eager", mode, type(model).__name__)
        return 0
    if zero_stage == 3:
        log.warning("train.compile=%s: ZeRO-3 gathers parameters in hooks inside each block, which would break "
                    "every compiled graph; running eager", mode)
        return 0
    for block in blocks:
        # static first; a second bucket shape recompiles with dynamic sizes
        block.compile(backend=backend, dynamic=None)
    log.info("compiled %d %s blocks (regional torch.compile)", len(blocks), type(blocks[0]).__name__)
    return len(blocks)
