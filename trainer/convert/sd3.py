"""SD3 / SD3.5 (diffusers ``SD3Transformer2DModel``) <-> Tessera MMDiT.

Names follow diffusers' ``transformer_sd3.py`` / ``JointTransformerBlock`` (the target of
``scripts/convert_sd3_to_diffusers.py``). What needs care:

* diffusers' ``AdaLayerNormContinuous`` (the last block's text-stream modulation and ``norm_out``) splits
  its linear as (scale, shift); ours is (shift, scale): those tensors are ``swap``-ped.
* SD3's positions are the centre crop of one ``pos_embed_max_size``-square grid (our ``pos_embed_max_size``),
  calibrated to ``base_size = sample_size // patch_size`` at interpolation scale 1; its persistent
  ``pos_embed.pos_embed`` buffer is derived, so it is dropped on import and rebuilt on export.
* SD3 never masks text: every token, padding included, is a key (our ``mask_text: false``).
* SD3.5: ``qk_norm: rms_norm`` is our ``qk_norm``; ``dual_attention_layers`` (MMDiT-X) is ours too.
* The joint attention concatenates [image; text] in diffusers and [text; image] here; attention is
  invariant to the order of keys, so outputs agree up to float rounding.
"""

from __future__ import annotations

import torch

from tessera.trainer.convert.keys import Rule, linear, param

CLASS_NAMES = ("SD3Transformer2DModel",)
DERIVED = ("pos_embed.pos_embed",)


def _stream_rules(b: str, d: str, ours: str, pre_only: bool, qk_norm: bool, context: bool) -> list[Rule]:
    """Rules of one stream of block ``b`` (diffusers block prefix ``d``)."""
    r = []
    q, k, v = ("add_q_proj", "add_k_proj", "add_v_proj") if context else ("to_q", "to_k", "to_v")
    norm = "norm1_context" if context else "norm1"
    r += linear(f"{b}{ours}.adaLN", f"{d}{norm}.linear", "swap" if pre_only else None)
    r += linear(f"{b}{ours}.qkv", tuple(f"{d}attn.{n}" for n in (q, k, v)))
    if qk_norm:
        nq, nk = ("norm_added_q", "norm_added_k") if context else ("norm_q", "norm_k")
        r += param(f"{b}{ours}.q_norm.weight", f"{d}attn.{nq}.weight")
        r += param(f"{b}{ours}.k_norm.weight", f"{d}attn.{nk}.weight")
    if not pre_only:
        r += linear(f"{b}{ours}.proj", f"{d}attn.{'to_add_out' if context else 'to_out.0'}")
        ff = "ff_context" if context else "ff"
        r += linear(f"{b}{ours}.mlp.fc1", f"{d}{ff}.net.0.proj") + linear(f"{b}{ours}.mlp.fc2", f"{d}{ff}.net.2")
    return r


def rules(cfg) -> list[Rule]:
    """The key table for a Tessera ``MMDiTConfig`` (ours <- diffusers)."""
    r = linear("x_embedder", "pos_embed.proj", "conv")
    r += linear("t_embedder.fc1", "time_text_embed.timestep_embedder.linear_1")
    r += linear("t_embedder.fc2", "time_text_embed.timestep_embedder.linear_2")
    r += linear("pooled_embedder.fc1", "time_text_embed.text_embedder.linear_1")
    r += linear("pooled_embedder.fc2", "time_text_embed.text_embedder.linear_2")
    r += linear("context_embedder", "context_embedder")
    for i in range(cfg.depth):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        r += _stream_rules(b, d, "x", False, cfg.qk_norm, context=False)
        r += _stream_rules(b, d, "context", i == cfg.depth - 1, cfg.qk_norm, context=True)
        if i in cfg.dual_attention_layers:
            r += linear(f"{b}x.attn2.qkv", tuple(f"{d}attn2.to_{n}" for n in "qkv"))
            r += linear(f"{b}x.attn2.proj", f"{d}attn2.to_out.0")
            if cfg.qk_norm:
                r += param(f"{b}x.attn2.q_norm.weight", f"{d}attn2.norm_q.weight")
                r += param(f"{b}x.attn2.k_norm.weight", f"{d}attn2.norm_k.weight")
    r += linear("adaLN_out", "norm_out.linear", "swap")
    r += linear("proj_out", "proj_out")
    return r


def unsupported(dcfg: dict) -> list[str]:
    """Reasons a diffusers SD3 config has no Tessera MMDiT equivalent (empty: it maps)."""
    why = []
    inner = dcfg["num_attention_heads"] * dcfg["attention_head_dim"]
    if dcfg.get("caption_projection_dim", inner) != inner:
        why.append(f"caption_projection_dim {dcfg['caption_projection_dim']} != inner dim {inner}")
    if dcfg.get("qk_norm") not in (None, "rms_norm"):
        why.append(f"qk_norm {dcfg['qk_norm']!r} (only rms_norm maps)")
    if not dcfg.get("pos_embed_max_size"):
        why.append("pos_embed_max_size unset")
    return why


def to_tessera_config(dcfg: dict) -> dict:
    """Tessera ``MMDiTConfig`` fields for a diffusers ``SD3Transformer2DModel.config``."""
    return dict(
        in_channels=dcfg["in_channels"], out_channels=dcfg.get("out_channels") or dcfg["in_channels"],
        patch_size=dcfg["patch_size"], hidden_size=dcfg["num_attention_heads"] * dcfg["attention_head_dim"],
        depth=dcfg["num_layers"], num_heads=dcfg["num_attention_heads"], mlp_ratio=4.0,
        text_dim=dcfg["joint_attention_dim"], pooled_dim=dcfg["pooled_projection_dim"],
        qk_norm=dcfg.get("qk_norm") == "rms_norm", base_size=dcfg["sample_size"] // dcfg["patch_size"],
        interpolation_scale=1.0, norm_eps=1e-6, pos_embed_max_size=dcfg["pos_embed_max_size"], mask_text=False,
        dual_attention_layers=sorted(int(i) for i in dcfg.get("dual_attention_layers") or ()),
    )


def diffusers_unsupported(cfg) -> list[str]:
    """Reasons a Tessera ``MMDiTConfig`` has no SD3Transformer2DModel equivalent (empty: it maps)."""
    why = []
    if cfg.pos_embed_max_size is None:
        why.append("interpolated positions (SD3 crops one grid: set pos_embed_max_size)")
    if cfg.mask_text:
        why.append("mask_text (SD3 attends to padded text tokens: set mask_text: false)")
    if not cfg.pooled_dim:
        why.append("no pooled_dim (SD3 always adds a pooled text vector)")
    if cfg.interpolation_scale != 1.0:
        why.append(f"interpolation_scale {cfg.interpolation_scale} (SD3's is 1)")
    if cfg.mlp_ratio != 4.0 or cfg.norm_eps != 1e-6:
        why.append("mlp_ratio/norm_eps other than SD3's 4 / 1e-6")
    return why


def to_diffusers_config(cfg) -> dict:
    """``SD3Transformer2DModel`` kwargs for a Tessera ``MMDiTConfig``."""
    return dict(
        sample_size=cfg.base_size * cfg.patch_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
        num_layers=cfg.depth, attention_head_dim=cfg.hidden_size // cfg.num_heads, num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.text_dim, caption_projection_dim=cfg.hidden_size, pooled_projection_dim=cfg.pooled_dim,
        out_channels=cfg.out_channels, pos_embed_max_size=cfg.pos_embed_max_size,
        dual_attention_layers=tuple(cfg.dual_attention_layers), qk_norm="rms_norm" if cfg.qk_norm else None,
    )


def derived_buffers(cfg) -> dict[str, torch.Tensor]:
    """SD3's persistent ``pos_embed.pos_embed`` (1, M*M, D) for an export, from our own sin-cos grid."""
    from tessera.trainer.models.mmdit import sincos_2d

    M = cfg.pos_embed_max_size
    return {"pos_embed.pos_embed": sincos_2d(cfg.hidden_size, M, M, cfg.base_size, cfg.interpolation_scale)[None]}
