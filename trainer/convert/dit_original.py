"""The original DiT release (facebookresearch/DiT ``DiT-XL-2-256x256.pt``, class-conditional) -> Tessera DiT.

What carries over unchanged: the patch embedding, the timestep MLP, every block's self-attention (fused QKV
and output) and MLP, and the final linear (its learned-variance half dropped unless ``keep_sigma``).

What cannot carry over, and what it becomes:

* Class conditioning. DiT adds a label embedding to the timestep embedding; Tessera conditions on text by
  cross-attention. The label table is not loaded; the caption projection (``y_embedder``) and every block's
  cross-attention are freshly initialised, with the cross-attention output projection at zero, so at import
  the text path contributes exactly nothing.
* adaLN-Zero -> adaLN-single, re-parameterised as PixArt-α did it (Chen et al. 2023, Sec. 2.3): each DiT
  block has its own ``adaLN_modulation`` linear; Tessera has one shared ``t_block`` plus a per-block table.
  ``t_block`` becomes the mean of the blocks' linears, and each block's table is set so that at the anchor
  timestep ``t*`` (500, as in PixArt) with the null ("unconditional") class, our modulation equals DiT's
  exactly. The final layer's (shift, scale) is anchored the same way. At ``t*`` the imported model
  reproduces unconditional DiT; at other timesteps the modulation is the shared linear's, which fine-tuning
  then adapts.
* ``pos_embed`` is DiT's fixed sin-cos grid; it is checked against ours (``base_size`` = the grid side) and
  dropped, since Tessera computes positions on the fly for any resolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tessera.trainer.convert.keys import MappingError, Rule, linear
from tessera.trainer.models.dit import sincos_2d, timestep_embedding

ANCHOR_T = 500.0
# DiT's model sizes share widths with heads 6, 12, 16, 16 (S, B, L, XL); the checkpoint stores no head count.
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}


def is_original_dit(sd: dict) -> bool:
    """True for a state dict with the original DiT's key names."""
    return "y_embedder.embedding_table.weight" in sd and "blocks.0.adaLN_modulation.1.weight" in sd


def to_tessera_config(sd: dict, text_dim: int, num_heads: int | None = None, keep_sigma: bool = False) -> dict:
    """Tessera ``DiTConfig`` fields read off the weights' shapes (``num_heads`` from DiT's size table if None)."""
    D, C, p, _ = sd["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = num_heads or HEADS_BY_WIDTH.get(D)
    if heads is None:
        raise MappingError(f"original DiT of width {D}: the head count is not stored; pass num_heads")
    grid = math.isqrt(sd["pos_embed"].shape[1])
    out = sd["final_layer.linear.weight"].shape[0] // (p * p)
    return dict(in_channels=C, out_channels=out if keep_sigma else C, patch_size=p, hidden_size=D, depth=depth,
                num_heads=heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D, text_dim=text_dim,
                pooled_dim=None, qk_norm=False, learn_sigma=False, base_size=grid, interpolation_scale=1.0)


def rules(depth: int) -> list[Rule]:
    """The tensors that carry over unchanged (ours <- original)."""
    r = linear("x_embedder", "x_embedder.proj", "conv")
    r += linear("t_embedder.fc1", "t_embedder.mlp.0") + linear("t_embedder.fc2", "t_embedder.mlp.2")
    for i in range(depth):
        b = f"blocks.{i}."
        r += linear(b + "attn.qkv", b + "attn.qkv") + linear(b + "attn.proj", b + "attn.proj")
        r += linear(b + "mlp.fc1", b + "mlp.fc1") + linear(b + "mlp.fc2", b + "mlp.fc2")
    r += linear("final_layer.linear", "final_layer.linear")
    return r


# Source keys the re-parameterisation folds into others (or the position check drops) instead of a rule.
CONSUMED = ("blocks.*.adaLN_modulation.1.*", "y_embedder.embedding_table.weight", "final_layer.adaLN_modulation.1.*",
            "pos_embed")


@torch.no_grad()
def reparameterise(sd: dict, depth: int, anchor_t: float = ANCHOR_T) -> dict[str, torch.Tensor]:
    """adaLN-Zero -> adaLN-single: ``t_block``, every block's table and the final table, anchored at ``anchor_t``."""
    # float64 throughout: each table is a difference of two modulations, so rounding here would be amplified.
    t = torch.tensor([anchor_t])
    g = {k: v.double() for k, v in sd.items() if not k.startswith("blocks.") or "adaLN" in k}

    def t_emb():  # (1, D): DiT's TimestepEmbedder at t*, which we import as our t_embedder
        h = F.linear(timestep_embedding(t).double(), g["t_embedder.mlp.0.weight"], g["t_embedder.mlp.0.bias"])
        return F.linear(F.silu(h), g["t_embedder.mlp.2.weight"], g["t_embedder.mlp.2.bias"])

    ours_c = t_emb()
    dit_c = ours_c + g["y_embedder.embedding_table.weight"][-1:]  # the null class: the table's last row
    def w(i: int) -> torch.Tensor:  # (6D, D) block i's adaLN-Zero linear
        return g[f"blocks.{i}.adaLN_modulation.1.weight"]

    def b(i: int) -> torch.Tensor:  # (6D,)
        return g[f"blocks.{i}.adaLN_modulation.1.bias"]

    w_bar = sum(w(i) for i in range(depth)) / depth  # (6D, D); a running sum, not a (depth, 6D, D) stack
    b_bar = sum(b(i) for i in range(depth)) / depth
    shared = F.linear(F.silu(ours_c), w_bar, b_bar)  # (1, 6D): what our t_block gives at t*
    out = {"t_block.weight": w_bar, "t_block.bias": b_bar}
    for i in range(depth):
        dit_mod = F.linear(F.silu(dit_c), w(i), b(i))  # (1, 6D)
        out[f"blocks.{i}.scale_shift_table"] = (dit_mod - shared).view(6, -1)
    fin = F.linear(F.silu(dit_c), g["final_layer.adaLN_modulation.1.weight"],
                   g["final_layer.adaLN_modulation.1.bias"])  # (1, 2D) shift, scale
    out["final_layer.scale_shift_table"] = fin.view(2, -1) - ours_c  # ours adds t itself to its table
    return {k: v.float() for k, v in out.items()}


def check_pos_embed(sd: dict, base_size: int) -> None:
    """Raise unless the checkpoint's fixed positions are the sin-cos grid we compute."""
    pe = sd["pos_embed"][0].float()  # (T, D)
    ours = sincos_2d(pe.shape[1], base_size, base_size, base_size, 1.0)
    if pe.shape != ours.shape or not torch.allclose(pe, ours, atol=1e-5):
        raise MappingError("pos_embed: the checkpoint's positions are not DiT's 2D sin-cos grid; cannot drop them")
