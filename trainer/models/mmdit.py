"""SD3-style MMDiT (Esser et al. 2024, "Scaling Rectified Flow Transformers"), self-contained.

Notation: N batch, C latent channels, H x W latent size, p patch size, T = (H / p) * (W / p) image
tokens, L text tokens, D hidden width.

Two token streams, text and image, each with its own weights (adaLN-Zero modulation, QKV, output
projection, MLP); in every block they meet in one joint attention over the concatenation
[text; image], a single ``F.scaled_dot_product_attention`` call whose boolean key mask hides padded
text tokens. Padded text tokens are never keys, so their content cannot reach any other token. Image
tokens are always valid keys, so a caption that is all padding still gives finite output. Conditioning
c = timestep embedding (+ pooled text embedding) drives both streams' adaLN-Zero. The last block only
needs the text stream's keys and values (SD3's ``context_pre_only``). Positions: the same
resolution-interpolated 2D sin-cos as our DiT (PixArt style), cached per token grid.

Options for SD3/SD3.5 weights (defaults off, see docs/models.md): ``pos_embed_max_size`` takes positions as
the centre crop of one fixed M x M sin-cos grid (SD3's cropped positions); ``mask_text: false`` lets every
text token, padding included, be a key (SD3 was trained so); ``dual_attention_layers`` adds SD3.5-medium's
second, image-only self-attention (MMDiT-X) to those blocks, with its own modulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
import torch.utils.checkpoint

MMDIT_PRESETS: dict[str, dict] = {
    "tiny": dict(depth=2, hidden_size=32, num_heads=2, patch_size=2, text_dim=32, pooled_dim=32),
    "S": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "B": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    # SD3-medium's MMDiT (Esser et al. 2024; diffusers SD3Transformer2DModel config): 24 blocks x 1536 (24 x 64),
    # T5-XXL width 4096, CLIP-L + CLIP-G pooled 768 + 1280. Pair with pos_embed_max_size 192, mask_text false.
    "sd3-medium": dict(depth=24, hidden_size=1536, num_heads=24, patch_size=2, text_dim=4096, pooled_dim=2048),
}


@dataclass(kw_only=True)
class MMDiTConfig:
    """MMDiT architecture; ``preset`` fills every field left at None, explicit fields override it."""

    preset: str | None = None
    in_channels: int = 4
    out_channels: int | None = None  # None -> in_channels
    patch_size: int | None = None
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    text_dim: int | None = None
    pooled_dim: int | None = None  # None/0: no pooled-text conditioning
    qk_norm: bool = True  # SD3.5 uses RMS QK-norm
    base_size: int = 32
    interpolation_scale: float = 1.0
    norm_eps: float = 1e-6
    pos_embed_max_size: int | None = None  # SD3: positions cropped from one M x M grid (None: interpolated)
    mask_text: bool = True  # False: padded text tokens are keys too (SD3/SD3.5 attend to them)
    dual_attention_layers: list[int] = field(default_factory=list)  # SD3.5-medium MMDiT-X blocks
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in MMDIT_PRESETS:
            raise ValueError(f"preset: unknown {self.preset!r} (known: {', '.join(MMDIT_PRESETS)})")
        base = dict(patch_size=2, hidden_size=384, depth=12, num_heads=6, text_dim=4096, pooled_dim=None)
        base.update(MMDIT_PRESETS.get(self.preset or "", {}))
        for k, v in base.items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size: {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.out_channels is None:
            self.out_channels = self.in_channels
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth - 1]
        if bad:  # the last block is context_pre_only; SD3.5 never makes it a dual block
            raise ValueError(f"dual_attention_layers: {bad} outside 0..{self.depth - 2}")


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) [sin | cos] features."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(dim: int, h: int, w: int, base_size: int, scale: float) -> torch.Tensor:
    """(h*w, dim) positions on a grid stretched to ``base_size`` / ``scale`` per axis (PixArt)."""
    gh = torch.arange(h, dtype=torch.float64) / (h / base_size) / scale
    gw = torch.arange(w, dtype=torch.float64) / (w / base_size) / scale
    mh, mw = torch.meshgrid(gh, gw, indexing="ij")  # (h, w)
    return torch.cat([sincos_1d(dim // 2, mw.flatten()), sincos_1d(dim // 2, mh.flatten())], dim=1)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) timesteps -> (N, dim) [cos | sin] features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RMSNorm(nn.RMSNorm):
    """RMSNorm (QK-norm) computed in float32 and returned in the input dtype, so bf16 q/k stay bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight, self.eps).to(x.dtype)


class MLP(nn.Module):
    """Linear -> GELU(tanh) | SiLU -> Linear."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, act: str = "tanh") -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim_in, hidden), nn.Linear(hidden, dim_out)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(F.silu(h) if self.act == "silu" else F.gelu(h, approximate="tanh"))


class SelfAttention(nn.Module):
    """Image-only self-attention of an MMDiT-X block (SD3.5's ``attn2``): fused QKV, QK-norm, one SDPA call."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.h, self.d = num_heads, dim // num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.d, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.d, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, T, D) -> (N, T, D)."""
        N, T, D = x.shape
        q, k, v = (u.transpose(1, 2) for u in self.qkv(x).view(N, T, 3, self.h, self.d).unbind(2))  # (N, h, T, d)
        o = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(o.transpose(1, 2).reshape(N, T, D))


class Stream(nn.Module):
    """One modality's weights in a joint block: adaLN-Zero, QKV (+ QK-norm), and unless pre_only, out + MLP.

    ``dual`` (SD3.5 MMDiT-X, image stream only) adds a second self-attention over the stream's own tokens,
    fed by the same normalised input under its own shift/scale/gate (9 modulation chunks instead of 6).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, eps: float, pre_only: bool,
                 dual: bool = False):
        super().__init__()
        self.h, self.d, self.pre_only, self.dual = num_heads, dim // num_heads, pre_only, dual
        self.adaLN = nn.Linear(dim, (2 if pre_only else 9 if dual else 6) * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.d, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.d, eps=1e-6) if qk_norm else nn.Identity()
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
            self.mlp = MLP(dim, int(dim * mlp_ratio), dim)
        if dual:
            self.attn2 = SelfAttention(dim, num_heads, qk_norm)

    def pre(self, x: torch.Tensor, c: torch.Tensor):
        """x (N, S, D), c (N, D) -> q, k, v (N, h, S, d) and what ``post`` needs (modulation chunks (N, 1, D))."""
        N, S, _ = x.shape
        mod = self.adaLN(F.silu(c))[:, None].chunk(2 if self.pre_only else 9 if self.dual else 6, dim=-1)
        normed = self.norm1(x)
        h = torch.addcmul(mod[0], normed, 1 + mod[1])
        q, k, v = (u.transpose(1, 2) for u in self.qkv(h).view(N, S, 3, self.h, self.d).unbind(2))
        rest = mod[2:6]
        if self.dual:  # attn2's input: the same normalised x under its own shift and scale, then its gate
            rest = (*rest, torch.addcmul(mod[6], normed, 1 + mod[7]), mod[8])
        return self.q_norm(q), self.k_norm(k), v, rest

    def post(self, x: torch.Tensor, o: torch.Tensor, mod) -> torch.Tensor:
        """Gated residual attention output (then attn2's), then gated residual MLP; o (N, S, D)."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:4]
        x = x + gate_msa * self.proj(o)
        if self.dual:
            x = x + mod[5] * self.attn2(mod[4])
        return x + gate_mlp * self.mlp(torch.addcmul(shift_mlp, self.norm2(x), 1 + scale_mlp))


class JointBlock(nn.Module):
    """MMDiT block: per-stream modulation/projections, one joint attention over [text; image]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, eps: float, pre_only: bool,
                 dual: bool = False):
        super().__init__()
        self.context = Stream(dim, num_heads, mlp_ratio, qk_norm, eps, pre_only)
        self.x = Stream(dim, num_heads, mlp_ratio, qk_norm, eps, False, dual)

    def forward(self, x, y, c, mask):
        """x (N, T, D) image, y (N, L, D) text, c (N, D), mask (N, 1, 1, L+T) bool or None."""
        N, T, D = x.shape
        L = y.shape[1]
        qy, ky, vy, mod_y = self.context.pre(y, c)
        qx, kx, vx, mod_x = self.x.pre(x, c)
        q, k, v = torch.cat([qy, qx], 2), torch.cat([ky, kx], 2), torch.cat([vy, vx], 2)  # (N, h, L+T, d)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(N, L + T, D)
        x = self.x.post(x, o[:, L:], mod_x)
        y = None if self.context.pre_only else self.context.post(y, o[:, :L], mod_y)
        return x, y


class MMDiT(nn.Module):
    """SD3-style MMDiT: forward(x (N,C,H,W), t (N,), text (N,L,Dt), text_mask (N,L), pooled (N,Dp))."""

    family = "mmdit"

    def __init__(self, config: MMDiTConfig) -> None:
        super().__init__()
        self.config = c = config
        D, p = c.hidden_size, c.patch_size
        self.gradient_checkpointing = c.gradient_checkpointing
        self.x_embedder = nn.Linear(c.in_channels * p * p, D)
        self.t_embedder = MLP(256, D, D, act="silu")
        self.pooled_embedder = MLP(c.pooled_dim, D, D, act="silu") if c.pooled_dim else None
        self.context_embedder = nn.Linear(c.text_dim, D)
        self.blocks = nn.ModuleList(
            [JointBlock(D, c.num_heads, c.mlp_ratio, c.qk_norm, c.norm_eps, pre_only=i == c.depth - 1,
                        dual=i in c.dual_attention_layers) for i in range(c.depth)]
        )
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=c.norm_eps)
        self.adaLN_out = nn.Linear(D, 2 * D)
        self.proj_out = nn.Linear(D, p * p * c.out_channels)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """xavier linears, N(0, 0.02) embedder MLPs; adaLN-Zero: every modulation and the output are zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for mlp in (self.t_embedder, self.pooled_embedder):
            if mlp is not None:
                nn.init.normal_(mlp.fc1.weight, std=0.02)
                nn.init.normal_(mlp.fc2.weight, std=0.02)
        zero = [self.adaLN_out, self.proj_out] + [s.adaLN for b in self.blocks for s in (b.context, b.x)]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Toggle activation checkpointing of every block."""
        self.gradient_checkpointing = enabled

    def pos_embed(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(1, h*w, D) cached positions for an h x w token grid."""
        key = (h, w, device, dtype)
        if key not in self._pos_cache:
            c = self.config
            M = c.pos_embed_max_size
            if M is None:
                pe = sincos_2d(c.hidden_size, h, w, c.base_size, c.interpolation_scale)
            elif h > M or w > M:
                raise ValueError(f"token grid {h}x{w} exceeds pos_embed_max_size {M}")
            else:  # SD3: the centre h x w window of one fixed M x M grid
                top, left = (M - h) // 2, (M - w) // 2
                grid = sincos_2d(c.hidden_size, M, M, c.base_size, c.interpolation_scale).view(M, M, -1)
                pe = grid[top:top + h, left:left + w].reshape(h * w, -1)
            self._pos_cache[key] = pe.to(device=device, dtype=dtype)[None]
        return self._pos_cache[key]

    def forward(self, x, t, text, text_mask=None, pooled=None) -> torch.Tensor:
        """Predict the model target for latents x (N, C, H, W) at timesteps t given text (N, L, Dt)."""
        N, C, H, W = x.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not a multiple of patch size {p}")
        h, w = H // p, W // p
        x = x.reshape(N, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(N, h * w, C * p * p)
        x = self.x_embedder(x) + self.pos_embed(h, w, x.device, x.dtype)  # (N, T, D)
        c = self.t_embedder(timestep_embedding(t).to(x.dtype))  # (N, D)
        if self.pooled_embedder is not None and pooled is not None:
            c = c + self.pooled_embedder(pooled)
        y = self.context_embedder(text)  # (N, L, D)
        mask = None
        if text_mask is not None and self.config.mask_text:  # image keys are always valid: no row is all masked
            img = torch.ones(N, h * w, dtype=torch.bool, device=x.device)
            mask = torch.cat([text_mask.bool(), img], dim=1)[:, None, None, :]  # (N, 1, 1, L+T)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, y = torch.utils.checkpoint.checkpoint(block, x, y, c, mask, use_reentrant=False)
            else:
                x, y = block(x, y, c, mask)
        shift, scale = self.adaLN_out(F.silu(c))[:, None].chunk(2, dim=-1)  # (N, 1, D)
        x = self.proj_out(torch.addcmul(shift, self.norm_out(x), 1 + scale))  # (N, T, p*p*C_out)
        x = x.reshape(N, h, w, p, p, self.config.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(N, self.config.out_channels, H, W)


def flops_per_sample(cfg: MMDiTConfig, height: int, width: int, text_len: int) -> int:
    """Forward matmul FLOPs (2*m*n*k, incl. joint-attention QK^T and AV) for one H x W latent sample."""
    D, p, L = cfg.hidden_size, cfg.patch_size, text_len
    T = (height // p) * (width // p)
    F_ = int(D * cfg.mlp_ratio)
    f = 2 * T * cfg.in_channels * p * p * D + 2 * (256 * D + D * D) + 2 * L * cfg.text_dim * D
    f += 2 * (cfg.pooled_dim * D + D * D) if cfg.pooled_dim else 0
    for i in range(cfg.depth):
        pre_only = i == cfg.depth - 1
        f += 2 * D * 6 * D + 2 * D * (2 if pre_only else 6) * D  # adaLN of both streams
        f += 2 * (T + L) * D * 3 * D + 2 * 2 * (T + L) ** 2 * D  # QKV, joint QK^T + AV
        S = T if pre_only else T + L  # tokens that go on through out-proj + MLP
        f += 2 * S * D * D + 2 * 2 * S * D * F_
        if i in cfg.dual_attention_layers:  # attn2 over the image tokens and its 3 extra modulation chunks
            f += 2 * D * 3 * D + 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D
    f += 2 * D * 2 * D + 2 * T * D * p * p * cfg.out_channels
    return f
