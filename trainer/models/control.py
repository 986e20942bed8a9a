"""Control branches (ControlNet, Zhang et al. 2023): a trainable copy of part of a frozen base model whose
zero-initialised outputs are added to the base's hidden states, so training starts exactly at the base model.

* DiT: PixArt's ControlNet-Transformer (Chen et al. 2024, PixArt-δ): copies of the base's first N blocks; the
  condition (its latent, embedded by the base's frozen patch embedding) enters the first copy through a
  zero-initialised ``before_proj`` added to the base's hidden states after block 0, and copy i's output, through
  its zero-initialised ``after_proj[i]``, is added to the input of base block i + 1.
* MMDiT: SD3 ControlNet (diffusers' ``SD3ControlNetModel``): copies of the embedders and the first N joint blocks,
  the condition latent patch-embedded by a zero-initialised ``input_embedder``; copy i's image stream through the
  zero-initialised ``controlnet_blocks[i]`` is added after base block j, for j spread over the depth as diffusers'
  ``SD3Transformer2DModel`` spreads them (``int(j / (depth / N))``, none after the last, text-only-output block).
* UNet: diffusers' ``ControlNetModel.from_unet`` itself (encoder copy, zero convolutions), its residuals passed to
  the base UNet as diffusers' pipelines do.

Every family keeps Tessera's forward signature plus ``control`` (the branch's input: the condition's latent for
DiT/MMDiT, ``input_space = "latent"``; the condition image in [0, 1] for the UNet, ``"pixel"``) and
``control_scale`` (the conditioning scale; 0 or no ``control`` is exactly the base model). The base model files stay
as they are: the DiT/MMDiT wrappers run the base's own modules in the base's order, and a test holds them to the
base's output bit for bit.

The base is frozen and its weights are never checkpointed (its fingerprint is: the ``base_fingerprint`` buffer,
which checkpoints carry); a branch paired with other base weights is refused (``ControlBaseMismatch``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from tessera.registry import Registry

from .dit import DiT, prepare_text_mask, timestep_embedding
from .pinned import BaseMismatch, PinnedBase
from .mmdit import MMDiT
from .mmdit import timestep_embedding as mm_timestep_embedding

CONTROLS: Registry = Registry("control")  # base family -> its controlled-model class (plugins: tessera.controls)


@dataclass(kw_only=True)
class ControlConfig:
    """The ``model.control`` section: train a control branch on a frozen base (``model.init_from``)."""

    condition: str  # the dataset's KEY.cond.<condition>.png (`tessera data condition`)
    blocks: int | None = None  # DiT/MMDiT: copies of the first N blocks (None: half the depth, PixArt's 13 of 28)
    dropout: float = 0.0  # share of samples whose condition is replaced by the null condition (zeros)
    scale: float = 1.0  # the conditioning scale sampling uses unless told otherwise (--control-scale)
    embedding_channels: list[int] | None = None  # UNet: ControlNet's condition encoder (None: from vae_scale_factor)

    def __post_init__(self) -> None:
        if not self.condition or "." in self.condition:
            raise ValueError(f"control.condition must name a condition without dots, got {self.condition!r}")
        if self.blocks is not None and self.blocks < 1:
            raise ValueError(f"control.blocks must be >= 1 or null, got {self.blocks}")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"control.dropout must be in [0, 1], got {self.dropout}")


class ControlBaseMismatch(BaseMismatch):
    """A control branch paired with base weights other than those it was trained on."""


def _zero_linear(d_in: int, d_out: int) -> nn.Linear:
    lin = nn.Linear(d_in, d_out)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


class ControlledModel(PinnedBase):
    """A frozen ``base`` and a trainable ``control`` branch; ``family``/``config`` are the base's."""

    input_space = "latent"
    what = "this control branch"
    mismatch = ControlBaseMismatch

    def __init__(self, base: nn.Module, cfg: ControlConfig) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.control_cfg = cfg
        self.control_checkpointing = False

    @property
    def family(self) -> str:
        """The base's family (FLOPs, export and the loader treat the model as its base)."""
        return self.base.family

    @property
    def config(self):
        """The base's config."""
        return self.base.config

    def pin_base(self, source: str) -> None:  # type: ignore[override]
        """Record the loaded base's fingerprint (``source``: where it came from, for messages)."""
        super().pin_base(self.base, source)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing of the base's blocks and the branch's."""
        self.base.set_gradient_checkpointing(enabled)
        self.control_checkpointing = enabled

    def forward(self, x, t, text, text_mask=None, pooled=None, control=None, control_scale: float | None = None):
        """The base's forward plus the branch's residuals for ``control``, times ``control_scale``."""
        self.check_restored()
        scale = self.control_cfg.scale if control_scale is None else float(control_scale)
        if control is not None and scale != 0.0:
            control = control.to(x.dtype)
            if control.shape[0] != x.shape[0]:
                raise ValueError(f"control batch {control.shape[0]} != latent batch {x.shape[0]}")
        else:
            control = None
        return self.controlled(x, t, text, text_mask, pooled, control, scale)

    def controlled(self, x, t, text, text_mask, pooled, control, scale):
        """The family's forward with the branch (``control`` None: the base model)."""
        raise NotImplementedError

    def _run(self, module, *args):
        if (self.control_checkpointing or getattr(self.base, "gradient_checkpointing", False)) \
                and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
        return module(*args)


# --------------------------------------------------------------------------- DiT: PixArt ControlNet-Transformer


class DiTBranch(nn.Module):
    """Copies of the base's first N blocks; zero-initialised projections in (``before_proj``) and out."""

    def __init__(self, base: DiT, n: int) -> None:
        super().__init__()
        D = base.config.hidden_size
        self.blocks = copy.deepcopy(base.blocks[:n]).requires_grad_(True)
        self.before_proj = _zero_linear(D, D)
        self.after_proj = nn.ModuleList([_zero_linear(D, D) for _ in range(n)])


@CONTROLS.register("dit")
class ControlledDiT(ControlledModel):
    """PixArt ControlNet-Transformer around a Tessera DiT."""

    def __init__(self, base: DiT, cfg: ControlConfig) -> None:
        n = cfg.blocks or max(1, base.config.depth // 2)
        if n > base.config.depth - 1:  # copy i feeds base block i + 1
            raise ValueError(f"control.blocks {n}: a DiT of depth {base.config.depth} takes at most "
                             f"{base.config.depth - 1}")
        branch = DiTBranch(base, n)
        super().__init__(base, cfg)
        self.control = branch

    def controlled(self, x, t, text, text_mask, pooled, control, scale):
        """DiT.forward's steps, with the branch between base blocks 1..N."""
        b, c = self.base, self.base.config
        N, _, H, W = x.shape
        p = c.patch_size
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not a multiple of patch size {p}")
        h, w = H // p, W // p
        pos = b.pos_embed(h, w, x.device, x.dtype)
        x = b.x_embedder(b.patchify(x)) + pos  # (N, T, D)
        temb = b.t_embedder(timestep_embedding(t).to(x.dtype))  # (N, D)
        if b.pooled_embedder is not None and pooled is not None:
            temb = temb + b.pooled_embedder(pooled)
        if c.micro_conditions:
            temb = temb + b.micro_embedding(N, H, W, temb)
        t6 = b.t_block(F.silu(temb)).view(N, 6, -1)  # (N, 6, D)
        y, mask = b.y_embedder(text), prepare_text_mask(text_mask)
        x = self._run(b.blocks[0], x, y, t6, mask)
        start = 1
        if control is not None:
            if control.shape[-2:] != (H, W):
                raise ValueError(f"control latent {tuple(control.shape[-2:])} != latent {H}x{W}")
            hc = self.control.before_proj(b.x_embedder(b.patchify(control)) + pos) + x  # (N, T, D)
            for i, block in enumerate(self.control.blocks):
                hc = self._run(block, hc, y, t6, mask)
                x = self._run(b.blocks[i + 1], x + scale * self.control.after_proj[i](hc), y, t6, mask)
            start = len(self.control.blocks) + 1
        for block in b.blocks[start:]:
            x = self._run(block, x, y, t6, mask)
        return b.unpatchify(b.final_layer(x, temb), h, w)


# --------------------------------------------------------------------------- MMDiT: SD3 ControlNet


class MMDiTBranch(nn.Module):
    """SD3ControlNetModel's layout under MMDiT's names (so the SD3 key table exports it): copies of the embedders and
    the first N joint blocks, a zero-initialised condition patch embedding and zero-initialised outputs."""

    def __init__(self, base: MMDiT, n: int) -> None:
        super().__init__()
        c = base.config
        D = c.hidden_size
        for name in ("x_embedder", "t_embedder", "pooled_embedder", "context_embedder"):
            setattr(self, name, copy.deepcopy(getattr(base, name)))
        self.blocks = copy.deepcopy(base.blocks[:n])
        self.input_embedder = _zero_linear(c.in_channels * c.patch_size ** 2, D)
        self.controlnet_blocks = nn.ModuleList([_zero_linear(D, D) for _ in range(n)])
        self.requires_grad_(True)


@CONTROLS.register("mmdit")
class ControlledMMDiT(ControlledModel):
    """SD3 ControlNet around a Tessera MMDiT."""

    def __init__(self, base: MMDiT, cfg: ControlConfig) -> None:
        n = cfg.blocks or max(1, base.config.depth // 2)
        if n > base.config.depth - 1:  # the last base block is text-only-output (SD3's context_pre_only)
            raise ValueError(f"control.blocks {n}: an MMDiT of depth {base.config.depth} takes at most "
                             f"{base.config.depth - 1}")
        branch = MMDiTBranch(base, n)
        super().__init__(base, cfg)
        self.control = branch

    def _branch(self, tokens, ctokens, t, text, pooled, mask, pos) -> list[torch.Tensor]:
        """The N residuals (N, T, D) of SD3ControlNetModel.forward (unscaled)."""
        br = self.control
        x = br.x_embedder(tokens) + pos + br.input_embedder(ctokens)
        c = br.t_embedder(mm_timestep_embedding(t).to(x.dtype))
        if br.pooled_embedder is not None and pooled is not None:
            c = c + br.pooled_embedder(pooled)
        y, out = br.context_embedder(text), []
        for block, proj in zip(br.blocks, br.controlnet_blocks):
            x, y = self._run(block, x, y, c, mask)
            out.append(proj(x))
        return out

    def controlled(self, x, t, text, text_mask, pooled, control, scale):
        """MMDiT.forward's steps, adding a branch residual after each base block but the last."""
        b, cfg = self.base, self.base.config
        N, C, H, W = x.shape
        p = cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not a multiple of patch size {p}")
        h, w = H // p, W // p

        def patches(z):  # (N, C, H, W) -> (N, T, C*p*p)
            return z.reshape(N, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(N, h * w, C * p * p)

        tokens, pos = patches(x), b.pos_embed(h, w, x.device, x.dtype)
        x = b.x_embedder(tokens) + pos  # (N, T, D)
        c = b.t_embedder(mm_timestep_embedding(t).to(x.dtype))  # (N, D)
        if b.pooled_embedder is not None and pooled is not None:
            c = c + b.pooled_embedder(pooled)
        y = b.context_embedder(text)  # (N, L, D)
        mask = None
        if text_mask is not None and cfg.mask_text:
            img = torch.ones(N, h * w, dtype=torch.bool, device=x.device)
            mask = torch.cat([text_mask.bool(), img], dim=1)[:, None, None, :]  # (N, 1, 1, L+T)
        res = []
        if control is not None:
            if control.shape[-2:] != (H, W):
                raise ValueError(f"control latent {tuple(control.shape[-2:])} != latent {H}x{W}")
            res = self._branch(tokens, patches(control), t, text, pooled, mask, pos)
        every = len(b.blocks) / max(len(res), 1)
        for i, block in enumerate(b.blocks):
            x, y = self._run(block, x, y, c, mask)
            if res and not block.context.pre_only:
                x = x + scale * res[int(i / every)]
        shift, sc = b.adaLN_out(F.silu(c))[:, None].chunk(2, dim=-1)  # (N, 1, D)
        x = b.proj_out(torch.addcmul(shift, b.norm_out(x), 1 + sc))  # (N, T, p*p*C_out)
        x = x.reshape(N, h, w, p, p, cfg.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(N, cfg.out_channels, H, W)


# --------------------------------------------------------------------------- UNet: diffusers ControlNetModel


def embedding_channels(vae_scale_factor: int) -> list[int]:
    """ControlNet's condition encoder for pixels ``vae_scale_factor`` times the latent: diffusers' (16, 32, 96, 256)
    (three stride-2 convolutions, 8x) cut or extended to log2 of the factor (a pixel-space UNet: one layer)."""
    n = vae_scale_factor.bit_length() - 1
    if vae_scale_factor < 1 or 1 << n != vae_scale_factor:
        raise ValueError(f"vae_scale_factor {vae_scale_factor} is not a power of 2: set control.embedding_channels")
    return ([16, 32, 96, 256] + [256] * n)[: n + 1]


@CONTROLS.register("unet")
class ControlledUNet(ControlledModel):
    """``ControlNetModel.from_unet`` around a Tessera UNet; the condition is an image in [0, 1]."""

    input_space = "pixel"

    def __init__(self, base, cfg: ControlConfig) -> None:
        from diffusers import ControlNetModel

        channels = cfg.embedding_channels or embedding_channels(base.config.vae_scale_factor)
        branch = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=tuple(channels))
        super().__init__(base, cfg)
        self.control = branch.requires_grad_(True)
        self.pixel_factor = 2 ** (len(channels) - 1)

    @property
    def unet(self):
        """The base's diffusers UNet (``unet.flops_per_sample`` reads its config)."""
        return self.base.unet

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """diffusers' checkpointing in the base UNet and the ControlNet."""
        super().set_gradient_checkpointing(enabled)
        (self.control.enable_gradient_checkpointing if enabled else self.control.disable_gradient_checkpointing)()

    def controlled(self, x, t, text, text_mask, pooled, control, scale):
        """UNet.forward with the ControlNet's down/mid residuals (scaled by diffusers' ``conditioning_scale``)."""
        b = self.base
        mask = None if text_mask is None or not b.config.mask_text else text_mask.to(x.dtype)  # 1 = keep
        added = b.added_cond(x, pooled)
        extra = {}
        if control is not None:
            want = (x.shape[-2] * self.pixel_factor, x.shape[-1] * self.pixel_factor)
            if tuple(control.shape[-2:]) != want:
                raise ValueError(f"control image {tuple(control.shape[-2:])} != {want} (latent x {self.pixel_factor})")
            # diffusers' ControlNetModel takes no text mask: its cross-attention sees padded tokens too.
            down, mid = self.control(x, t, encoder_hidden_states=text, controlnet_cond=control,
                                     conditioning_scale=scale, added_cond_kwargs=added, return_dict=False)
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return b.unet(x, t, encoder_hidden_states=text, encoder_attention_mask=mask, added_cond_kwargs=added,
                      return_dict=False, **extra)[0]


def branch_weights(model: ControlledModel) -> dict[str, torch.Tensor]:
    """What an export of a control model holds: the branch's tensors and the base's fingerprint (as the
    ``buffer/base_fingerprint`` a checkpoint carries), never the base's weights."""
    out = {f"control.{k}": v.detach().cpu().contiguous() for k, v in model.control.state_dict().items()}
    out["buffer/base_fingerprint"] = model.base_fingerprint.detach().cpu().clone()
    return out


def build_controlled(base: nn.Module, cfg: ControlConfig) -> ControlledModel:
    """The base family's controlled model (base frozen, branch fresh: zero-initialised outputs)."""
    return CONTROLS.get(base.family)(base, cfg)
