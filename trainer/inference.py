"""Inference: the one seeded sampling loop, CFG's empty-prompt condition, and loading any checkpoint or export.

Training grids, ``tessera sample``, evaluation suites and the quickstart all sample through
``sample_seeded``: an image is a pure function of (weights, sampler settings, prompt, seed), because its
x_T and every stochastic sampler step come from that image's own CPU generator. So batch size, batch
composition and Ray actor layout never change an image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from tessera import storage
from tessera.config import from_dict, load_config
from tessera.device import pick_device
from tessera.trainer import checkpoint as C
from tessera.trainer import consolidate
from tessera.trainer.autoencoders import AutoencoderConfig, build_autoencoder
from tessera.trainer.diffusion.guidance import cat_cond, guidance_on, guided_output
from tessera.trainer.diffusion.objectives import ObjectiveConfig
from tessera.trainer.diffusion.sampling import SamplerConfig, build_sampler
from tessera.trainer.text_encoders import TextEncoderConfig, build_text_encoder


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


def grid_seed(seed: int, index: int) -> int:
    """Per-image seed of the ``index``-th prompt of a grid or batch drawn with ``seed``."""
    digest = hashlib.sha256(f"tessera-grid:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def from_pil(images: list[Image.Image]) -> torch.Tensor:
    """8-bit images of one size -> (B, 3, H, W) in [-1, 1] (the loader's scale)."""
    import numpy as np

    u8 = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images]))  # (B, H, W, 3)
    return u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> 8-bit RGB images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def sample_seeded(model, text_encoder, autoencoder, sampler_cfg: SamplerConfig, objective_cfg: ObjectiveConfig,
                  prompts: list[str], seeds: list[int], *, height: int, width: int, device: torch.device,
                  dtype: torch.dtype = torch.float32, control: torch.Tensor | None = None,
                  control_scale: float | None = None) -> list[Image.Image]:
    """One image per (prompt, seed), in one batched forward per step.

    Each image gets its own sampler instance (samplers keep per-run state such as multistep history) and
    its own CPU generator for x_T and stochastic steps, so the result does not depend on which other
    images share its batch. A control model takes ``control``, one condition image per prompt (B, 3, height,
    width) in [-1, 1], at ``control_scale`` (None: the model's configured scale; 0: the base model).
    """
    f = autoencoder.downsample_factor
    if height % f or width % f:
        raise ValueError(f"height/width must be multiples of the autoencoder factor {f}, got {height}x{width}")
    was_training = model.training
    model.eval()
    shape1 = (1, autoencoder.latent_channels, height // f, width // f)
    cond = text_encoder.encode(list(prompts)).to(device)
    both = cat_cond(cond, uncond_like(text_encoder, cond, device)) if sampler_cfg.cfg_scale != 1.0 else None
    samplers = [build_sampler(sampler_cfg, objective_cfg) for _ in seeds]
    for s in samplers:
        s.set_timesteps(sampler_cfg.steps, image_shape=shape1)
    gens = [torch.Generator().manual_seed(int(sd)) for sd in seeds]
    x = torch.cat([torch.randn(shape1, generator=g, dtype=torch.float32) for g in gens]).to(device)  # (B, C, h, w)
    x = x * samplers[0].init_noise_sigma

    ctrl = control_kwargs(model, autoencoder, control, control_scale, device)

    def model_fn(xx, t, c):
        kw = ctrl(xx.shape[0])
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(xx.to(dtype), t, c.hidden.to(dtype), c.mask,
                         None if c.pooled is None else c.pooled.to(dtype), **kw).float()

    for t in samplers[0].timesteps:
        x_in, t_model = samplers[0].model_input(x, t)  # every sampler sits at the same step
        timestep = torch.full((x.shape[0],), t_model, device=x.device, dtype=torch.float32)  # (B,)
        on = both is not None and guidance_on(sampler_cfg.guidance_interval, samplers[0].noise_level(t))
        out = guided_output(model_fn, x_in, timestep, cond, both if on else None, sampler_cfg.cfg_scale)
        x = torch.cat([s.step(out[i:i + 1], t, x[i:i + 1], generator=gens[i]) for i, s in enumerate(samplers)])
    model.train(was_training)
    return to_pil(autoencoder.decode(x))  # decode: (B, C, h, w) -> (B, 3, H, W)


def control_kwargs(model, autoencoder, control: torch.Tensor | None, scale: float | None, device: torch.device):
    """``n -> model kwargs`` of a sampling call: the condition in the branch's input space, repeated when CFG
    doubles the batch (diffusers' pipelines also condition both halves), and the scale; {} without control."""
    if control is None:
        return lambda n: {}
    from tessera.trainer.components import control_tensor

    if not hasattr(model, "input_space"):
        raise ValueError("a control image was given, but this checkpoint has no control branch (model.control)")
    x = control_tensor(control, model.input_space, autoencoder, device)  # (B, ...)
    return lambda n: {"control": x.repeat(n // x.shape[0], *[1] * (x.dim() - 1)), "control_scale": scale}


def generate(model, text_encoder, autoencoder, sampler_cfg, objective_cfg, prompts: list[str], *, height: int,
             width: int, seed: int, device: torch.device, dtype: torch.dtype = torch.float32,
             batch_size: int = 16, controls: list[Image.Image] | None = None,
             control_scale: float | None = None) -> list[Image.Image]:
    """Images for ``prompts`` (one each); image ``i`` is seeded by ``grid_seed(seed, i)``; ``controls``: a control
    model's condition image for each prompt, at ``height`` x ``width``."""
    if controls is not None and len(controls) != len(prompts):
        raise ValueError(f"{len(controls)} control images for {len(prompts)} prompts")
    out: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        seeds = [grid_seed(seed, i + k) for k in range(len(chunk))]
        ctl = None if controls is None else from_pil(controls[i:i + batch_size])
        out += sample_seeded(model, text_encoder, autoencoder, sampler_cfg, objective_cfg, chunk, seeds,
                             height=height, width=width, device=device, dtype=dtype, control=ctl,
                             control_scale=control_scale)
    return out


def load_condition(url: str, size: tuple[int, int] | None) -> Image.Image:
    """A condition image (local or s3://) as RGB, resized to ``size`` (h, w) with nearest-neighbour (an edge map
    stays binary) when it differs."""
    img = Image.open(io.BytesIO(storage.read_bytes(url)))
    img = img.convert("RGB")
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.NEAREST)
    return img


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


def png_bytes(img: Image.Image) -> bytes:
    """Lossless PNG encoding."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def model_from_weights(model_cfg, weights: dict[str, torch.Tensor], device: torch.device):
    """A plain (non-DeepSpeed) model with the given full weights, for sampling and export. A control model's weights
    are its branch's, a LoRA run's its adapters': the frozen base is ``init_from``'s, checked against the
    fingerprint the weights carry. A LoRA model comes back merged, as a plain model of its family."""
    frozen_base = model_cfg.control is not None or model_cfg.lora is not None
    model = model_cfg.build(init=frozen_base)  # these weights replace init_from's, except for a frozen base
    missing, unexpected = model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("buffer/")},
                                                strict=False)
    if model_cfg.control is not None:
        missing = [k for k in missing if not k.startswith("base.") and k != "base_fingerprint"]
        model.check_base(weights.get("buffer/base_fingerprint"), "the control branch's weights")
    if model_cfg.lora is not None:
        missing = [k for k in missing if ".lora_" in k]
        model.check_base(weights.get("buffer/base_fingerprint"), "the LoRA adapter's weights")
    if missing or unexpected:
        raise KeyError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if model_cfg.lora is not None:
        merged = dataclasses.replace(model_cfg, lora=None, init_from=None).build(init=False)
        merged.load_state_dict(model.merged_state(), strict=True)
        model = merged
    return model.to(device).eval()


# --------------------------------------------------------------------------- checkpoints and exports

EXPORT_FORMAT = "tessera-export/1"


def resolve_checkpoint(url: str) -> tuple[str, str]:
    """(kind, url) for a checkpoint dir, an export dir, or a run dir (its newest complete checkpoint)."""
    url = str(url).rstrip("/")
    if storage.exists(storage.join(url, "tessera.json")):
        return "export", url
    if C.is_checkpoint_dir(url):
        return "checkpoint", url
    found = C.CheckpointManager(storage.join(url, "checkpoints")).resolve("auto")
    if found:
        return "checkpoint", found
    raise FileNotFoundError(f"no complete checkpoint or export at {url}")


def job_config(ckpt_url: str):
    """The resolved training config stored in a checkpoint."""
    from tessera.trainer.config import TrainJobConfig

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "config.yaml"
        p.write_text(storage.read_text(storage.join(ckpt_url, "config.yaml")))
        return load_config(TrainJobConfig, p)


def sampling_weights(kind: str, url: str, use_ema: bool = True) -> str:
    """The weights ``load_for_sampling`` reads: EMA when asked for and present, else raw. For an export a file
    relative to ``url``; for a checkpoint a weight set as ``consolidate.weight_sets`` names it (a file, or
    ``ema``/``raw`` assembled from the shards)."""
    if kind == "export":
        meta = C.read_json(storage.join(url, "tessera.json"))
        return f"{'ema' if use_ema and 'ema' in meta['variants'] else 'raw'}/model.safetensors"
    return consolidate.pick(url, use_ema)


def load_for_sampling(checkpoint: str, use_ema: bool = True, device: torch.device | None = None):
    """(model, text_encoder, autoencoder, objective_cfg, sampler_cfg, (h, w)) from a checkpoint or an export."""
    from tessera.trainer.models import load_pretrained

    device = device or pick_device()
    kind, url = resolve_checkpoint(checkpoint)
    if kind == "export":
        meta = json.loads(storage.read_text(storage.join(url, "tessera.json")))
        variant = sampling_weights(kind, url, use_ema).split("/")[0]
        src = f"{url}/tessera.json"
        if meta.get("control"):  # a control export: the branch's weights; the frozen base is named by model.init_from
            from tessera.trainer.config import ModelConfig

            weights = C.read_tensors(storage.join(url, sampling_weights(kind, url, use_ema)))
            model = model_from_weights(from_dict(ModelConfig, meta["model"], src), weights, device)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                for u in storage.list_prefix(storage.join(url, variant) + "/"):
                    (Path(tmp) / Path(u).name).write_bytes(storage.read_bytes(u))
                model = load_pretrained(tmp).to(device).eval()
        te_cfg = from_dict(TextEncoderConfig, meta["text_encoder"], src)
        ae_cfg = from_dict(AutoencoderConfig, meta["autoencoder"], src)
        obj_cfg = from_dict(ObjectiveConfig, meta["objective"], src)
        smp_cfg = from_dict(SamplerConfig, meta["sampler"], src)
        size = tuple(meta["sample_size"])
    else:
        cfg = job_config(url)
        name = sampling_weights(kind, url, use_ema)
        model = model_from_weights(cfg.model, consolidate.read_weights(url, name), device)  # offline, any world
        te_cfg, ae_cfg, obj_cfg, smp_cfg = cfg.text_encoder, cfg.autoencoder, cfg.objective, cfg.samples.sampler
        size = (cfg.samples.height, cfg.samples.width)
    ae = build_autoencoder(ae_cfg)
    ae = ae.to(device) if hasattr(ae, "to") else ae
    return model, build_text_encoder(te_cfg), ae, obj_cfg, smp_cfg, size


def sample_from(checkpoint: str, prompts: list[str], *, out: str, height: int | None = None, width: int | None = None,
                steps: int | None = None, cfg_scale: float | None = None, seed: int = 0, sampler: str | None = None,
                use_ema: bool = True, guidance_interval: list[float] | None = None, control: list[str] | None = None,
                control_scale: float | None = None) -> None:
    """``tessera sample``: a captioned grid PNG of one image per prompt; a control model takes ``control``, one
    condition image for every prompt or one per prompt (the grid then shows each condition above its image)."""
    model, te, ae, obj_cfg, smp_cfg, (h0, w0) = load_for_sampling(checkpoint, use_ema)
    if control:
        if len(control) not in (1, len(prompts)):
            raise ValueError(f"--control: give one image for every prompt or one per prompt ({len(prompts)}), "
                             f"got {len(control)}")
        first = load_condition(control[0], None)
        h0, w0 = (height or first.height, width or first.width)  # the sample size defaults to the condition's
        conds = [load_condition(u, (h0, w0)) for u in control]
        conds = conds * len(prompts) if len(conds) == 1 else conds
    over = {"steps": steps, "cfg_scale": cfg_scale, "name": sampler,
            "guidance_interval": None if guidance_interval is None else list(guidance_interval)}
    smp_cfg = dataclasses.replace(smp_cfg, **{k: v for k, v in over.items() if v is not None})
    device = next(model.parameters()).device
    images = generate(model, te, ae, smp_cfg, obj_cfg, prompts, height=height or h0, width=width or w0, seed=seed,
                      device=device, controls=conds if control else None, control_scale=control_scale)
    if control:
        images, prompts = conds + images, ["condition"] * len(conds) + list(prompts)
    grid = make_grid(images, prompts, ncols=len(images) // 2 if control else None,
                     scale=max(1, 128 // max(height or h0, 1)))
    storage.write_bytes(out, png_bytes(grid))
