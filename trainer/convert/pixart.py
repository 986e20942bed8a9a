"""PixArt-α / PixArt-Σ (diffusers ``PixArtTransformer2DModel``) <-> Tessera DiT.

The key table follows diffusers' ``scripts/convert_pixart_{alpha,sigma}_to_diffusers.py`` (which maps the
original PixArt checkpoints onto the same diffusers names). Both layouts are PixArt's adaLN-single DiT, so
every tensor carries over; only the fused QKV/KV linears and the conv-vs-linear patch embedding differ.

Positions: diffusers' ``PatchEmbed`` calibrates its sin-cos grid to ``base_size = sample_size // patch_size``
with ``interpolation_scale`` (default ``max(sample_size // 64, 1)``), which is our ``base_size`` and
``interpolation_scale``. ``use_additional_conditions`` (on by default at sample_size 128: PixArt-α 1024 px)
is our ``micro_conditions``. PixArt's learned variance (``out_channels = 2 * in_channels``) is dropped on
import unless ``keep_sigma``: Tessera's objectives predict the mean only, and the released pipelines throw
the variance half away at sampling too.
"""

from __future__ import annotations

import torch

from tessera.trainer.convert.keys import Rule, linear, param

CLASS_NAMES = ("PixArtTransformer2DModel", "Transformer2DModel")


def rules(cfg) -> list[Rule]:
    """The key table for a Tessera ``DiTConfig`` (ours <- diffusers)."""
    r = linear("x_embedder", "pos_embed.proj", "conv")
    r += linear("t_embedder.fc1", "adaln_single.emb.timestep_embedder.linear_1")
    r += linear("t_embedder.fc2", "adaln_single.emb.timestep_embedder.linear_2")
    r += linear("t_block", "adaln_single.linear")
    r += linear("y_embedder.fc1", "caption_projection.linear_1")
    r += linear("y_embedder.fc2", "caption_projection.linear_2")
    if cfg.micro_conditions:
        for name in ("resolution_embedder", "aspect_ratio_embedder"):  # the same names on both sides
            r += linear(f"{name}.fc1", f"adaln_single.emb.{name}.linear_1")
            r += linear(f"{name}.fc2", f"adaln_single.emb.{name}.linear_2")
    for i in range(cfg.depth):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        r += param(b + "scale_shift_table", d + "scale_shift_table")
        r += linear(b + "attn.qkv", tuple(f"{d}attn1.to_{n}" for n in "qkv"))
        r += linear(b + "attn.proj", d + "attn1.to_out.0")
        r += linear(b + "cross_attn.q", d + "attn2.to_q")
        r += linear(b + "cross_attn.kv", (d + "attn2.to_k", d + "attn2.to_v"))
        r += linear(b + "cross_attn.proj", d + "attn2.to_out.0")
        r += linear(b + "mlp.fc1", d + "ff.net.0.proj")
        r += linear(b + "mlp.fc2", d + "ff.net.2")
    r += linear("final_layer.linear", "proj_out")
    r += param("final_layer.scale_shift_table", "scale_shift_table")
    return r


def unsupported(dcfg: dict) -> list[str]:
    """Reasons a diffusers PixArt config has no Tessera DiT equivalent (empty: it maps)."""
    why = []
    checks = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "attention_bias": True,
              "norm_elementwise_affine": False, "attention_type": "default"}
    why += [f"{k}={dcfg.get(k)!r} (need {v!r})" for k, v in checks.items() if dcfg.get(k, v) != v]
    if dcfg.get("caption_channels") is None:
        why.append("caption_channels is None (no caption projection)")
    inner = dcfg["num_attention_heads"] * dcfg["attention_head_dim"]
    if dcfg.get("cross_attention_dim", inner) != inner:
        why.append(f"cross_attention_dim {dcfg.get('cross_attention_dim')} != inner dim {inner}")
    return why


def to_tessera_config(dcfg: dict, keep_sigma: bool = False) -> dict:
    """Tessera ``DiTConfig`` fields for a diffusers PixArt config (``PixArtTransformer2DModel.config``)."""
    sample, p = dcfg["sample_size"], dcfg["patch_size"]
    scale = dcfg.get("interpolation_scale")
    micro = dcfg.get("use_additional_conditions")
    out = dcfg.get("out_channels") or dcfg["in_channels"]
    if out == 2 * dcfg["in_channels"] and not keep_sigma:
        out = dcfg["in_channels"]
    return dict(
        in_channels=dcfg["in_channels"], out_channels=out, patch_size=p,
        hidden_size=dcfg["num_attention_heads"] * dcfg["attention_head_dim"], depth=dcfg["num_layers"],
        num_heads=dcfg["num_attention_heads"], mlp_ratio=4.0, text_dim=dcfg["caption_channels"], pooled_dim=None,
        qk_norm=False, learn_sigma=False, base_size=sample // p,
        interpolation_scale=float(scale if scale is not None else max(sample // 64, 1)),
        norm_eps=dcfg.get("norm_eps", 1e-6), micro_conditions=bool(sample == 128 if micro is None else micro),
    )


def drop_sigma(w: torch.Tensor, patch: int, out_channels: int) -> torch.Tensor:
    """Keep the first ``out_channels`` of a final linear whose rows are (p, p, C_out) with C innermost."""
    c_full = w.shape[0] // (patch * patch)
    return w.reshape(patch * patch, c_full, *w.shape[1:])[:, :out_channels].reshape(-1, *w.shape[1:])


def diffusers_unsupported(cfg) -> list[str]:
    """Reasons a Tessera ``DiTConfig`` has no PixArtTransformer2DModel equivalent (empty: it maps)."""
    why = []
    if cfg.pooled_dim:
        why.append("pooled_dim (a pooled text vector in the timestep embedding)")
    if cfg.qk_norm:
        why.append("qk_norm")
    if cfg.mlp_ratio != 4.0:
        why.append(f"mlp_ratio {cfg.mlp_ratio} (PixArt's feed-forward is 4x)")
    if cfg.norm_eps != 1e-6:
        why.append(f"norm_eps {cfg.norm_eps} (PixArt's final norm is fixed at 1e-6)")
    return why


def to_diffusers_config(cfg) -> dict:
    """``PixArtTransformer2DModel`` kwargs for a Tessera ``DiTConfig``."""
    return dict(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        cross_attention_dim=cfg.hidden_size, sample_size=cfg.base_size * cfg.patch_size, patch_size=cfg.patch_size,
        caption_channels=cfg.text_dim, interpolation_scale=cfg.interpolation_scale, norm_eps=cfg.norm_eps,
        use_additional_conditions=cfg.micro_conditions, norm_type="ada_norm_single", activation_fn="gelu-approximate",
        attention_bias=True, norm_elementwise_affine=False, num_embeds_ada_norm=1000,
    )
