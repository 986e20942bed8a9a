"""Sampling images from a model: grids during training, ``tessera sample`` and evaluation."""

from __future__ import annotations

import io
import logging
import math

import torch
from PIL import Image, ImageDraw

from tessera import storage

log = logging.getLogger("tessera.sample")


def uncond_like(text_encoder, cond, device):
    """The empty-prompt condition for classifier-free guidance, token-aligned with ``cond`` (padded when the
    empty prompt is shorter than a 'longest'-padded batch, cut when longer) and broadcast to its batch."""
    empty = text_encoder.empty_embedding().to(device)
    n, L = cond.hidden.shape[:2]
    if empty.hidden.shape[1] < L:
        e = empty.pad_to(L)
    else:
        e = type(empty)(empty.hidden[:, :L], empty.mask[:, :L], empty.pooled)
    return type(empty)(e.hidden[:1].expand(n, -1, -1), e.mask[:1].expand(n, -1),
                       None if e.pooled is None else e.pooled[:1].expand(n, -1))


@torch.no_grad()
def generate(model, text_encoder, autoencoder, sampler_cfg, objective_cfg, prompts: list[str], *, height: int,
             width: int, seed: int, device: torch.device, dtype: torch.dtype = torch.float32,
             batch_size: int = 16) -> list[Image.Image]:
    """Images for ``prompts`` (one each) at ``height``x``width`` pixels; deterministic given ``seed``."""
    from trainer.diffusion.sampling import build_sampler, sample

    model.eval()
    f = autoencoder.downsample_factor
    if height % f or width % f:
        raise ValueError(f"height/width must be multiples of the autoencoder factor {f}, got {height}x{width}")
    out: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        cond = text_encoder.encode(chunk).to(device)
        uncond = uncond_like(text_encoder, cond, device)
        gen = torch.Generator().manual_seed(seed + i)
        sampler = build_sampler(sampler_cfg, objective_cfg)

        def model_fn(x, t, c):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                return model(x.to(dtype), t, c.hidden.to(dtype), c.mask,
                             None if c.pooled is None else c.pooled.to(dtype)).float()

        shape = (len(chunk), autoencoder.latent_channels, height // f, width // f)
        lat = sample(model_fn, sampler, shape, cond, uncond, sampler_cfg.cfg_scale, sampler_cfg.steps, gen, device)
        imgs = autoencoder.decode(lat).float().clamp(-1, 1)
        arr = ((imgs + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out.extend(Image.fromarray(a) for a in arr)
    return out


def make_grid(images: list[Image.Image], captions: list[str] | None = None, ncols: int | None = None,
              scale: int = 1) -> Image.Image:
    """Tile images in a grid, optionally with a caption strip under each."""
    n = len(images)
    ncols = ncols or min(n, int(math.ceil(math.sqrt(n))))
    nrows = int(math.ceil(n / ncols))
    w, h = images[0].size
    w, h = w * scale, h * scale
    cap_h = 12 if captions else 0
    grid = Image.new("RGB", (ncols * w, nrows * (h + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x, y = (i % ncols) * w, (i // ncols) * (h + cap_h)
        grid.paste(im.resize((w, h), Image.NEAREST), (x, y))
        if captions:
            draw.text((x + 1, y + h), captions[i][: max(4, w // 6)], fill="black")
    return grid


def model_from_weights(model_cfg, weights: dict[str, torch.Tensor], device: torch.device):
    """A plain (non-DeepSpeed) model with the given full weights, for sampling and export."""
    model = model_cfg.build()
    missing, unexpected = model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("buffer/")},
                                                strict=False)
    if missing or unexpected:
        raise KeyError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval()


def log_sample_grid(cfg, ema, engine, frozen, tracker, run, step: int, rank: int) -> None:
    """Rank 0: sample the fixed prompts with the EMA (or raw) weights, save a PNG and log it to W&B."""
    from trainer.checkpoint import full_fp32_params

    # Gathering is collective; every rank takes part even though only rank 0 samples.
    weights = ema.state_dict() if ema is not None else full_fp32_params(engine)
    if rank != 0:
        return
    sc = cfg.samples
    device = next(engine.module.parameters()).device
    model = model_from_weights(cfg.model, weights, device)
    images = generate(model, frozen.text, frozen.ae, sc.sampler, cfg.objective, list(sc.prompts), height=sc.height,
                      width=sc.width, seed=sc.seed, device=device)
    grid = make_grid(images, list(sc.prompts), scale=max(1, 96 // max(sc.height, 1)))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    storage.write_bytes(run.path("samples", f"step_{step:09d}.png"), buf.getvalue())
    tracker.log_images("samples/ema" if ema is not None else "samples/raw", images, list(sc.prompts), step=step)
    log.info("sample grid for step %d written", step)
    del model


def run_in_training_eval(cfg, ema, engine, frozen, tracker, step: int, rank: int) -> None:
    """Rank 0: evaluate the EMA (or raw) weights with the configured suite and log ``eval/<suite>/*``."""
    from tessera.config import load_config
    from trainer.checkpoint import full_fp32_params

    weights = ema.state_dict() if ema is not None else full_fp32_params(engine)  # collective when gathered
    if rank != 0:
        return
    from evaluation.in_training import evaluate_weights
    from evaluation.suite import EvalSuiteConfig

    suite = load_config(EvalSuiteConfig, cfg.eval.suite, cfg.eval.overrides)
    device = next(engine.module.parameters()).device
    model = model_from_weights(cfg.model, weights, device)
    metrics = evaluate_weights(model, frozen.text, frozen.ae, cfg.objective, suite, step, tracker,
                               sampler_cfg=cfg.samples.sampler, size=(cfg.samples.height, cfg.samples.width))
    log.info("in-training eval at step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()
                                                       if isinstance(v, float)})
