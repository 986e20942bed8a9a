"""PixArt-α-style text-to-image DiT (Peebles & Xie 2023; Chen et al. 2023), self-contained.

Notation follows facebookresearch/DiT ``models.py``: N batch, C latent channels, H x W latent size,
p patch size, T = (H / p) * (W / p) image tokens, L text tokens, D hidden width.

* Patch embedding works for any H x W that are multiples of p, so one model trains on mixed aspect
  ratios (each batch holds one bucket).
* Positional encoding: resolution-interpolated 2D sin-cos (PixArt's ``base_size`` /
  ``interpolation_scale``), not 2D RoPE. Why: it is added once at the input and cached per
  (h, w), so it costs nothing per layer, whereas RoPE rotates q and k in every attention call (extra
  elementwise work that is a real fraction of a CPU/small-batch step); it keeps the self-attention a
  single fused SDPA call; and it is the scheme PixArt-α/Σ checkpoints and diffusers'
  ``PixArtTransformer2DModel`` use, so weights and numerics port one to one. Interpolating the grid to
  ``base_size`` keeps position statistics stable when the resolution changes.
* Timestep conditioning is adaLN-single: one shared MLP maps t to 6 D modulation values, and every
  block adds its own learned (6, D) table (PixArt-α, ~27% fewer parameters than adaLN-Zero).
* Self-attention is one fused QKV linear plus one ``F.scaled_dot_product_attention`` call; optional
  QK-norm (RMSNorm per head). Cross-attention attends to the projected text tokens with the padding mask
  honoured; a row whose text is all padding attends to zeros (finite output, no NaN).
* Optional micro-conditions (PixArt-α 1024 px, ``micro_conditions``): the image's pixel height, width and
  aspect ratio, each embedded like a timestep, are added to the timestep embedding; they follow from the
  latent size and ``vae_scale_factor``, so the forward signature stays the same for every family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
import torch.utils.checkpoint

# Size presets (DiT's S/B/L/XL table; PixArt-α is XL/2 with 4096-wide T5-XXL captions).
DIT_PRESETS: dict[str, dict] = {
    "tiny": dict(depth=2, hidden_size=32, num_heads=2, patch_size=2, text_dim=32),
    "S": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "B": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "L": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
    "0.6B": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2, text_dim=4096),
    "1.6B": dict(depth=24, hidden_size=2048, num_heads=16, patch_size=2, text_dim=4096),
}


@dataclass(kw_only=True)
class DiTConfig:
    """DiT architecture; ``preset`` fills every field left at None, explicit fields override it."""

    preset: str | None = None
    in_channels: int = 4
    out_channels: int | None = None  # None -> in_channels (x2 with learn_sigma)
    patch_size: int | None = None
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    text_dim: int | None = None  # width of the text encoder's tokens
    pooled_dim: int | None = None  # width of a pooled text vector added to the timestep embedding
    qk_norm: bool = False
    learn_sigma: bool = False
    base_size: int = 32  # token-grid side the sin-cos positions are calibrated to (512 px at p=2, f=8)
    interpolation_scale: float = 1.0
    norm_eps: float = 1e-6
    micro_conditions: bool = False  # PixArt-α 1024 px: pixel size and aspect ratio added to the timestep embedding
    vae_scale_factor: int = 8  # pixels per latent cell (micro-conditions only)
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in DIT_PRESETS:
            raise ValueError(f"preset: unknown {self.preset!r} (known: {', '.join(DIT_PRESETS)})")
        base = dict(patch_size=2, hidden_size=384, depth=12, num_heads=6, text_dim=4096)
        base.update(DIT_PRESETS.get(self.preset or "", {}))
        for k, v in base.items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size: {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.out_channels is None:
            self.out_channels = self.in_channels * (2 if self.learn_sigma else 1)
        if self.micro_conditions and self.hidden_size % 3:
            raise ValueError(f"micro_conditions: hidden_size {self.hidden_size} must be divisible by 3 "
                             "(height, width and aspect ratio each take a third)")


# --------------------------------------------------------------------------- embeddings


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) [sin | cos] features, as in MAE/DiT."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(dim: int, h: int, w: int, base_size: int, scale: float) -> torch.Tensor:
    """(h*w, dim) PixArt positions: the grid is stretched to ``base_size`` / ``scale`` on each axis."""
    gh = torch.arange(h, dtype=torch.float64) / (h / base_size) / scale
    gw = torch.arange(w, dtype=torch.float64) / (w / base_size) / scale
    mh, mw = torch.meshgrid(gh, gw, indexing="ij")  # (h, w) each, row-major tokens
    # Half the channels encode the column (w) and half the row (h), in PixArt/diffusers' order.
    return torch.cat([sincos_1d(dim // 2, mw.flatten()), sincos_1d(dim // 2, mh.flatten())], dim=1)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) possibly fractional timesteps -> (N, dim) [cos | sin] features (DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RMSNorm(nn.RMSNorm):
    """RMSNorm (QK-norm) computed in float32 and returned in the input dtype, so bf16 q/k stay bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight, self.eps).to(x.dtype)


class MLP(nn.Module):
    """Linear -> GELU(tanh) -> Linear; no dropout modules (they cost time even at p=0)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, act: str = "tanh") -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim_in, hidden), nn.Linear(hidden, dim_out)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = F.silu(h) if self.act == "silu" else F.gelu(h, approximate="tanh")
        return self.fc2(h)


class _AddCMul(torch.autograd.Function):
    """a + b * c with broadcasting, whose backward takes 2 full-size passes instead of autograd's 3.

    autograd's addcmul backward multiplies by the scalar ``value`` (an extra full-size pass, ~5% of a
    CPU step here); modulation and gated residuals never need it.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(b, c)
        ctx.shapes_dtypes = [(t.shape, t.dtype) for t in (a, b, c)]
        return torch.addcmul(a, b, c)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        b, c = ctx.saved_tensors
        (sa, da), (sb, db), (sc, dc) = ctx.shapes_dtypes
        ga = g.sum_to_size(sa).to(da) if ctx.needs_input_grad[0] else None
        gb = (g * c).sum_to_size(sb).to(db) if ctx.needs_input_grad[1] else None
        gc = (g * b).sum_to_size(sc).to(dc) if ctx.needs_input_grad[2] else None
        return ga, gb, gc


def addcmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a + b * c (broadcasting), with a lean backward when grad is on."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (a, b, c)):
        return _AddCMul.apply(a, b, c)
    return torch.addcmul(a, b, c)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale1: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift in one fused op; ``scale1`` is already 1 + scale, shapes (N, 1, D)."""
    return addcmul(shift, x, scale1)


# --------------------------------------------------------------------------- attention


class SelfAttention(nn.Module):
    """Multi-head self-attention: one fused QKV linear and one SDPA call."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.h, self.d = num_heads, dim // num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.d, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.d, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        # unbind(2) then transpose: backward stacks the three grads straight into the linear's layout.
        q, k, v = (u.transpose(1, 2) for u in self.qkv(x).view(N, T, 3, self.h, self.d).unbind(2))  # (N, h, T, d)
        o = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)  # (N, h, T, d)
        return self.proj(o.transpose(1, 2).reshape(N, T, D))


class TextMask(NamedTuple):
    """The text padding mask in the forms attention needs, built once per forward."""

    keep: torch.Tensor  # (N, 1, 1, L) bool, True = attend
    bias: torch.Tensor  # (N, 1, 1, L) float32, 0 or -inf
    has_text: torch.Tensor  # (N, 1, 1, 1) bool, False for a row that is all padding


def prepare_text_mask(text_mask: torch.Tensor | None) -> TextMask | None:
    """(N, L) bool|int padding mask -> TextMask.

    A row with no valid token would make every score -inf and attention return NaN, so such a row may
    attend to all keys while its values are zeroed through ``has_text``: its cross-attention is exactly 0.
    """
    if text_mask is None:
        return None
    keep = text_mask.bool()
    any_text = keep.any(dim=1, keepdim=True)  # (N, 1)
    keep = (keep | ~any_text)[:, None, None, :]
    bias = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device).masked_fill_(~keep, float("-inf"))
    return TextMask(keep, bias, any_text[:, None, None])


def attention_small_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None):
    """Explicit softmax(q k^T / sqrt(d) + bias) v for few keys; (N, h, T, d) x (N, h, L, d) -> (N, h, T, d).

    With few keys (text tokens) on CPU, PyTorch's fused SDPA kernel is ~1.7x slower than two matmuls in
    bf16 (they use AMX) and on par in fp32 (measured fwd+bwd, L=32, T=256); the softmax runs in float32.
    """
    s = q @ k.transpose(-1, -2)  # (N, h, T, L)
    scale = q.shape[-1] ** -0.5
    s = torch.add(bias, s, alpha=scale) if bias is not None else s * scale
    return torch.softmax(s, dim=-1, dtype=torch.float32).to(v.dtype) @ v


class CrossAttention(nn.Module):
    """Image tokens attend to the (few) text tokens, honouring the padding mask."""

    use_sdpa: bool | None = None  # None: fused SDPA except on CPU, where the explicit form is faster

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.h, self.d = num_heads, dim // num_heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.d, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.d, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: TextMask | None) -> torch.Tensor:
        N, T, D = x.shape
        q = self.q(x).view(N, T, self.h, self.d).transpose(1, 2)  # (N, h, T, d)
        k, v = (u.transpose(1, 2) for u in self.kv(y).view(N, y.shape[1], 2, self.h, self.d).unbind(2))  # (N, h, L, d)
        if mask is not None:
            v = v * mask.has_text.to(v.dtype)  # rows with no text attend (uniformly) to zeros -> exactly 0
        q, k = self.q_norm(q), self.k_norm(k)
        use_sdpa = self.use_sdpa if self.use_sdpa is not None else x.device.type != "cpu"
        if use_sdpa:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.keep)
        else:
            o = attention_small_kv(q, k, v, None if mask is None else mask.bias)
        return self.proj(o.transpose(1, 2).reshape(N, T, D))


# --------------------------------------------------------------------------- blocks


class DiTBlock(nn.Module):
    """PixArt block: adaLN-single-modulated self-attention, plain cross-attention, modulated MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)  # adaLN supplies scale/shift
        self.attn = SelfAttention(dim, num_heads, qk_norm)
        self.cross_attn = CrossAttention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x, y, t6, mask):
        """x (N, T, D), y (N, L, D), t6 (N, 6, D) shared modulation."""
        mod = self.scale_shift_table[None] + t6  # (N, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)  # (N, 1, D)
        x = addcmul(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, 1 + scale_msa)))
        x = x + self.cross_attn(x, y, mask)
        return addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, 1 + scale_mlp)))


class FinalLayer(nn.Module):
    """PixArt T2IFinalLayer: LayerNorm, table + t modulation, linear to p*p*C_out."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # (N, 1, D)
        return self.linear(modulate(self.norm(x), shift, 1 + scale))


# --------------------------------------------------------------------------- model


class DiT(nn.Module):
    """Text-conditioned DiT: forward(x (N,C,H,W), t (N,), text (N,L,Dt), text_mask (N,L)) -> (N,C_out,H,W)."""

    family = "dit"

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = c = config
        D, p = c.hidden_size, c.patch_size
        self.gradient_checkpointing = c.gradient_checkpointing
        self.x_embedder = nn.Linear(c.in_channels * p * p, D)  # patchify-as-linear == stride-p conv
        self.t_embedder = MLP(256, D, D, act="silu")
        self.t_block = nn.Linear(D, 6 * D)  # adaLN-single: applied to SiLU(t), shared by all blocks
        self.y_embedder = MLP(c.text_dim, D, D)  # caption projection Dt -> D
        self.pooled_embedder = MLP(c.pooled_dim, D, D, act="silu") if c.pooled_dim else None
        if c.micro_conditions:  # PixArt-α: height and width share one MLP, the aspect ratio has its own
            self.resolution_embedder = MLP(256, D // 3, D // 3, act="silu")
            self.aspect_ratio_embedder = MLP(256, D // 3, D // 3, act="silu")
        self.blocks = nn.ModuleList(
            [DiTBlock(D, c.num_heads, c.mlp_ratio, c.qk_norm, c.norm_eps) for _ in range(c.depth)]
        )
        self.final_layer = FinalLayer(D, p, c.out_channels, c.norm_eps)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT/PixArt init: xavier linears, N(0, 0.02) embedder MLPs, zero adaLN, cross-attn out, final."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        micro = [self.resolution_embedder, self.aspect_ratio_embedder] if self.config.micro_conditions else []
        for mlp in (self.t_embedder, self.y_embedder, self.pooled_embedder, *micro):
            if mlp is not None:
                nn.init.normal_(mlp.fc1.weight, std=0.02)
                nn.init.normal_(mlp.fc2.weight, std=0.02)
        zero = [self.t_block, self.final_layer.linear] + [b.cross_attn.proj for b in self.blocks]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Toggle activation checkpointing of every block."""
        self.gradient_checkpointing = enabled

    def pos_embed(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(1, h*w, D) cached sin-cos positions for an h x w token grid."""
        key = (h, w, device, dtype)
        if key not in self._pos_cache:
            c = self.config
            pe = sincos_2d(c.hidden_size, h, w, c.base_size, c.interpolation_scale)
            self._pos_cache[key] = pe.to(device=device, dtype=dtype)[None]
        return self._pos_cache[key]

    def micro_embedding(self, n: int, H: int, W: int, like: torch.Tensor) -> torch.Tensor:
        """(n, D) PixArt-α micro-conditions of an H x W latent: [height | width | aspect ratio] embeddings."""
        f = self.config.vae_scale_factor
        size = torch.tensor([H * f, W * f], dtype=torch.float32, device=like.device)  # pixels
        res = self.resolution_embedder(timestep_embedding(size).to(like.dtype)).reshape(1, -1)  # (1, 2D/3)
        ratio = torch.tensor([H / W], dtype=torch.float32, device=like.device)
        ar = self.aspect_ratio_embedder(timestep_embedding(ratio).to(like.dtype))  # (1, D/3)
        return torch.cat([res, ar], dim=1).expand(n, -1)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, T, C*p*p), patch features in (C, p, p) order like a conv weight."""
        N, C, H, W = x.shape
        p = self.config.patch_size
        x = x.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (N, h, w, C, p, p)
        return x.reshape(N, (H // p) * (W // p), C * p * p)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(N, T, p*p*C_out) -> (N, C_out, H, W)."""
        p, c = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, text, text_mask=None, pooled=None) -> torch.Tensor:
        """Predict the model target for latents x (N, C, H, W) at timesteps t (N,) given text (N, L, Dt)."""
        N, _, H, W = x.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not a multiple of patch size {p}")
        h, w = H // p, W // p
        x = self.x_embedder(self.patchify(x))  # (N, T, D), T = h * w
        x = x + self.pos_embed(h, w, x.device, x.dtype)
        t = self.t_embedder(timestep_embedding(t).to(x.dtype))  # (N, D)
        if self.pooled_embedder is not None and pooled is not None:
            t = t + self.pooled_embedder(pooled)
        if self.config.micro_conditions:
            t = t + self.micro_embedding(N, H, W, t)
        t6 = self.t_block(F.silu(t)).view(N, 6, -1)  # (N, 6, D)
        y = self.y_embedder(text)  # (N, L, D)
        mask = prepare_text_mask(text_mask)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, y, t6, mask, use_reentrant=False)
            else:
                x = block(x, y, t6, mask)
        x = self.final_layer(x, t)  # (N, T, p*p*C_out)
        return self.unpatchify(x, h, w)


def flops_per_sample(cfg: DiTConfig, height: int, width: int, text_len: int) -> int:
    """Forward matmul FLOPs (2*m*n*k, incl. attention QK^T and AV) for one H x W latent sample."""
    D, p, L = cfg.hidden_size, cfg.patch_size, text_len
    T = (height // p) * (width // p)
    F_ = int(D * cfg.mlp_ratio)
    f = 2 * T * cfg.in_channels * p * p * D  # patch embedding
    f += 2 * (256 * D + D * D) + 2 * D * 6 * D  # timestep MLP + adaLN-single
    f += 2 * (cfg.pooled_dim * D + D * D) if cfg.pooled_dim else 0
    f += 2 * 3 * (256 * (D // 3) + (D // 3) ** 2) if cfg.micro_conditions else 0
    f += 2 * L * (cfg.text_dim * D + D * D)  # caption projection
    per_block = 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D  # self-attn: qkv, QK^T + AV, out
    per_block += 2 * T * D * D + 2 * L * D * 2 * D + 2 * 2 * T * L * D + 2 * T * D * D  # cross-attn
    per_block += 2 * 2 * T * D * F_  # MLP
    f += cfg.depth * per_block
    f += 2 * T * D * p * p * cfg.out_channels  # final layer
    return f
