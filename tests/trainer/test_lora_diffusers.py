"""A LoRA's diffusers export for the MMDiT (SD3) and the UNet (SD): the adapter that ``tessera export --format
diffusers`` writes, loaded by diffusers onto the base model's own diffusers export, gives the merged model's output
(the same table maps weights and adapters, fused qkv included). The DiT (PixArt) case runs on a trained LoRA in
test_lora_train.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from tessera.config import from_dict
from tessera.trainer.config import TrainJobConfig
from tessera.trainer.export import write_export
from tessera.trainer.export_diffusers import export_any

from . import published as P

TE = {"name": "hf_encoder", "hf_encoder": {"path": "minilm", "max_length": 8}}


def _cfg(model: dict) -> TrainJobConfig:
    return from_dict(TrainJobConfig, {"model": model, "data": {"path": "unused"}, "text_encoder": TE,
                                      "autoencoder": {"name": "identity"}, "objective": {"name": "flow"},
                                      "samples": {"height": 16, "width": 16, "sampler": {"name": "euler", "steps": 3}}})


def _lora_exports(tmp: Path, section: dict) -> tuple[Path, Path]:
    """(the base's diffusers export, the LoRA's diffusers export) for a model section with init_from; the adapter's
    B matrices get seeded noise so it changes the model (fresh LoRA B is zero)."""
    base_cfg = _cfg(section)
    write_export(str(tmp / "base"), base_cfg, {"ema": base_cfg.model.build().state_dict()}, source="t", step=0,
                 samples=0)
    export_any(str(tmp / "base"), str(tmp / "d-base"), fmt="diffusers")
    cfg = _cfg(dict(section, init_from=str(tmp / "base"), lora={"rank": 2, "alpha": 8.0}))
    model = cfg.model.build()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    weights["buffer/base_fingerprint"] = model.base_fingerprint.clone()
    write_export(str(tmp / "lora"), cfg, {"ema": weights}, source="t", step=0, samples=0)
    export_any(str(tmp / "lora"), str(tmp / "d-lora"), fmt="diffusers")
    assert dataclasses.asdict(cfg.model.lora)["rank"] == 2
    return tmp / "d-base", tmp / "d-lora"


def test_mmdit_lora_loads_onto_the_base_sd3_transformer(tmp_path):
    from diffusers import SD3Transformer2DModel

    from tessera.trainer.convert import read_weights

    P.sd3(tmp_path / "sd3")
    d_base, d_lora = _lora_exports(tmp_path, {"name": "mmdit", "mmdit": read_weights(str(tmp_path / "sd3")).config,
                                              "init_from": str(tmp_path / "sd3")})
    merged = SD3Transformer2DModel.from_pretrained(d_lora, subfolder="transformer").eval()
    base = SD3Transformer2DModel.from_pretrained(d_base, subfolder="transformer").eval()
    inp = P.inputs(h=8, w=12)

    def run(m):
        with torch.no_grad():
            return m(inp["x"], encoder_hidden_states=inp["text"], pooled_projections=inp["pooled"],
                     timestep=inp["t"], return_dict=False)[0]

    want = run(merged)
    assert (run(base) - want).abs().max() > 1e-3
    # what StableDiffusion3Pipeline.load_lora_weights does for the transformer
    base.load_lora_adapter(str(d_lora / "lora"), prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
    P.assert_rel_close(run(base), want)


def test_unet_lora_loads_through_the_sd_pipeline(tmp_path):
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    d_base, d_lora = _lora_exports(tmp_path, {"name": "unet", "unet": {"preset": "tiny",
                                                                       "kwargs": {"cross_attention_dim": 384}}})
    merged = UNet2DConditionModel.from_pretrained(d_lora, subfolder="unet").eval()
    base = UNet2DConditionModel.from_pretrained(d_base, subfolder="unet").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, base.config.in_channels, 16, 16, generator=g)
    text = torch.randn(2, 5, 384, generator=g)

    def run(m):
        with torch.no_grad():
            return m(x, torch.tensor([10, 700]), encoder_hidden_states=text, return_dict=False)[0]

    want = run(merged)
    assert (run(base) - want).abs().max() > 1e-3
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=base, scheduler=DDPMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(d_lora / "lora"))
    P.assert_rel_close(run(pipe.unet), want)
