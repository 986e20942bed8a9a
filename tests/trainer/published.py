"""Tiny random stand-ins for published models, built from configs by diffusers/transformers and saved with
``save_pretrained`` (the layouts the real releases have), plus an original-DiT checkpoint with DiT's key names."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import torch

TEXT_DIM, POOLED_DIM = 16, 10


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Seeded noise on every parameter, so zero-initialised layers (adaLN, outputs) are live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def pixart(folder: Path | None = None, *, micro: bool = False, sample_size: int = 8, out_channels: int = 8,
           heads: int = 3, seed: int = 0):
    """A PixArt-α-layout ``PixArtTransformer2DModel`` (learned sigma: out = 2 x in), saved if ``folder``."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = perturb(PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=2, attention_head_dim=8, num_attention_heads=heads, in_channels=4,
        out_channels=out_channels, cross_attention_dim=8 * heads, caption_channels=TEXT_DIM,
        use_additional_conditions=micro), seed).eval()
    if folder is not None:
        model.save_pretrained(folder)
    return model


def sd3(folder: Path | None = None, *, qk_norm: str | None = None, dual: tuple = (), seed: int = 0):
    """An ``SD3Transformer2DModel`` (SD3: no qk-norm; SD3.5: rms_norm, SD3.5-medium: dual layers)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = perturb(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, caption_projection_dim=16, pooled_projection_dim=POOLED_DIM, out_channels=4,
        pos_embed_max_size=12, dual_attention_layers=dual, qk_norm=qk_norm), seed).eval()
    if folder is not None:
        model.save_pretrained(folder)
    return model


def original_dit(path: Path, seed: int = 0):
    """(diffusers ``DiTTransformer2DModel`` made equal to the original DiT, ``path``: its weights under the original
    release's key names). The inverse of diffusers' ``scripts/convert_dit_to_diffusers.py``.

    diffusers' port differs from facebookresearch/DiT in two numbers, set back here: its timestep frequencies use
    ``downscale_freq_shift=1`` (DiT: 0) and its block LayerNorm eps defaults to 1e-5 (DiT: 1e-6)."""
    from diffusers import DiTTransformer2DModel
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    torch.manual_seed(seed)
    ref = perturb(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                        norm_eps=1e-6), seed).eval()
    emb0 = ref.transformer_blocks[0].norm1.emb
    with torch.no_grad():
        for block in ref.transformer_blocks:  # DiT has one timestep/label embedder: every block shares it
            block.norm1.emb.load_state_dict(emb0.state_dict())
            block.norm1.emb.time_proj.downscale_freq_shift = 0
    sd = ref.state_dict()
    e = "transformer_blocks.0.norm1.emb."
    out = {"pos_embed": get_2d_sincos_pos_embed(16, 4, base_size=4).float()[None],
           "y_embedder.embedding_table.weight": sd[e + "class_embedder.embedding_table.weight"]}
    pairs = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": e + "timestep_embedder.linear_1",
             "t_embedder.mlp.2": e + "timestep_embedder.linear_2", "final_layer.adaLN_modulation.1": "proj_out_1",
             "final_layer.linear": "proj_out_2"}
    for i in range(2):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        pairs.update({b + "attn.proj": d + "attn1.to_out.0", b + "mlp.fc1": d + "ff.net.0.proj",
                      b + "mlp.fc2": d + "ff.net.2", b + "adaLN_modulation.1": d + "norm1.linear"})
        for p in ("weight", "bias"):
            out[f"{b}attn.qkv.{p}"] = torch.cat([sd[f"{d}attn1.to_{n}.{p}"] for n in "qkv"])
    for ours, theirs in pairs.items():
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = sd[f"{theirs}.{p}"]
    out = {k: v.contiguous() for k, v in out.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(out, str(path))
    else:
        torch.save(out, path)
    return ref


def t5_folder(folder: Path) -> Path:
    """A tiny ``T5EncoderModel`` + ``ByT5Tokenizer`` (needs no vocab files) in one folder, like a T5 release."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=384, d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    T5EncoderModel(cfg).save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    return folder


def vae_folder(folder: Path, scaling_factor: float = 0.5) -> Path:
    """A tiny SD-layout ``AutoencoderKL`` (factor 2, 4 latent channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                  norm_num_groups=8, sample_size=16, scaling_factor=scaling_factor).save_pretrained(folder)
    return folder


def inputs(batch: int = 2, h: int = 8, w: int = 8, text_len: int = 6, seed: int = 0) -> dict:
    """Latents, timesteps, text, a padding mask (rows with 3 and 5 valid tokens) and a pooled vector."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, text_len, dtype=torch.long)
    for i in range(batch):
        mask[i, : (3, 5)[i % 2]] = 1
    return dict(x=torch.randn(batch, 4, h, w, generator=g), t=torch.tensor([10.0, 700.0])[:batch],
                text=torch.randn(batch, text_len, TEXT_DIM, generator=g), text_mask=mask,
                pooled=torch.randn(batch, POOLED_DIM, generator=g))


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """max |got - want| <= rel * max |want| (fp32 relative error at the output's scale)."""
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"
