"""``tessera export --format diffusers``: a folder diffusers loads, and how exports carry their encoders.

What is written into ``out`` (a local folder):

* ``transformer/`` (DiT -> ``PixArtTransformer2DModel``, MMDiT -> ``SD3Transformer2DModel``) or ``unet/``
  (``UNet2DConditionModel``): config.json + safetensors, by the diffusers class's own ``save_pretrained``
  after a strict ``load_state_dict`` of our weights mapped with the import key tables (``trainer/convert``);
* when diffusers also knows the text encoder, the autoencoder and the sampler (today: a PixArt-style DiT
  with a T5 encoder, an ``AutoencoderKL`` and a DDPM or velocity-flow objective), the whole pipeline:
  ``model_index.json``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``, ``vae/``, which
  ``DiffusionPipeline.from_pretrained(out)`` loads, plus ``tessera_diffusers.json`` saying how to call it
  for the image ``tessera sample`` gives (same seed rule, steps, guidance);
* for a LoRA run, ``lora/``: its adapter in diffusers' format, for the base model (``trainer/lora_diffusers.py``);
* otherwise the Tessera format as well (``ema/``, ``raw/``, ``tessera.json``), with a message naming what
  diffusers lacks. A model with no diffusers class gets the Tessera format only, with the same message.

``--components path|copy`` (both formats): the text encoder and the VAE are carried by their resolved local
path (aliases such as ``minilm`` resolved; in a diffusers folder, symlinks) or copied into the export; never
by an alias alone. SD3 and SDXL pipelines need transformers CLIP text encoders; Tessera's ``clip`` encoder is
open_clip, so those exports stop at the model folder (docs/models.md).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from tessera import storage
from tessera.trainer.convert import keys, pixart, sd3

log = logging.getLogger("tessera.export")

PIPELINE_FILE, NOTES_FILE = "model_index.json", "tessera_diffusers.json"


class NotMappable(ValueError):
    """A part of a Tessera model or job that diffusers has no equivalent for."""


# --------------------------------------------------------------------------- the model


def diffusers_model(model) -> tuple[str, torch.nn.Module]:
    """(subfolder, diffusers model holding ``model``'s weights); raises ``NotMappable`` with the reasons."""
    import diffusers

    if model.family == "unet":
        return "unet", model.unet
    conv, cls = (pixart, diffusers.PixArtTransformer2DModel) if model.family == "dit" else (
        sd3, diffusers.SD3Transformer2DModel)
    why = conv.diffusers_unsupported(model.config)
    if why:
        raise NotMappable(f"Tessera {model.family} with {'; '.join(why)} has no {cls.__name__} equivalent")
    with torch.device("meta"):  # shapes only: the weights are assigned below
        ref = cls(**conv.to_diffusers_config(model.config))
    target = ref.state_dict()
    sd = keys.invert(conv.rules(model.config), model.state_dict(), {k: v.shape for k, v in target.items()})
    if model.family == "mmdit":
        sd.update(sd3.derived_buffers(model.config))
    ref.load_state_dict({k: v.detach().clone().contiguous() for k, v in sd.items()}, strict=True, assign=True)
    return "transformer", ref.eval()


# --------------------------------------------------------------------------- control branches


def diffusers_controlnet(model) -> tuple[str, torch.nn.Module]:
    """(subfolder, diffusers ControlNet holding a control model's branch): the UNet's is diffusers'
    ``ControlNetModel`` itself; the MMDiT's maps onto ``SD3ControlNetModel`` with the SD3 key table; PixArt's
    ControlNet-Transformer has no diffusers class (raises ``NotMappable``)."""
    import dataclasses

    import diffusers

    if model.family == "unet":
        return "controlnet", model.control
    if model.family != "mmdit":
        raise NotMappable("diffusers has no class for PixArt's ControlNet-Transformer (PixArt-δ ships its own code, "
                          "not in diffusers); the branch stays in Tessera's format")
    cfg, n = model.config, len(model.control.blocks)
    why = sd3.diffusers_unsupported(cfg)
    if why:
        raise NotMappable(f"Tessera mmdit with {'; '.join(why)} has no SD3ControlNetModel equivalent")
    with torch.device("meta"):
        ref = diffusers.SD3ControlNetModel(**dict(sd3.to_diffusers_config(cfg), num_layers=n))
    ours = model.control.state_dict()
    # The branch's blocks are full joint blocks (none text-only-output): the table of a base one block deeper.
    table = [r for r in sd3.rules(dataclasses.replace(cfg, depth=n + 1)) if r.ours in ours]
    table += keys.linear("input_embedder", "pos_embed_input.proj", "conv")
    for i in range(n):
        table += keys.linear(f"controlnet_blocks.{i}", f"controlnet_blocks.{i}")
    sd = keys.invert(table, ours, {k: v.shape for k, v in ref.state_dict().items()})
    sd.update(sd3.derived_buffers(cfg))
    ref.load_state_dict({k: v.detach().clone().contiguous() for k, v in sd.items()}, strict=True, assign=True)
    return "controlnet", ref.eval()


def export_control(source: str, meta: dict, variant: str, out: Path) -> list[str]:
    """A control export's branch as the diffusers ControlNet class of its family (``controlnet/``), beside Tessera's
    format (which ``tessera sample`` reads with the base ``model.init_from`` names); returns the notes."""
    from tessera.config import from_dict
    from tessera.trainer import checkpoint as C
    from tessera.trainer.config import ModelConfig
    from tessera.trainer.inference import model_from_weights

    model = model_from_weights(from_dict(ModelConfig, meta["model"], f"{source}/tessera.json"),
                               C.read_tensors(storage.join(source, variant, "model.safetensors")), torch.device("cpu"))
    try:
        sub, ref = diffusers_controlnet(model)
    except NotMappable as e:
        return [f"no diffusers ControlNet: {e}"]
    ref.save_pretrained(out / sub, safe_serialization=True)
    return [f"{sub}/ loads with diffusers' {type(ref).__name__}.from_pretrained(out, subfolder={sub!r}); its base is "
            f"{meta['model']['init_from']} (export that for the pipeline's {'unet' if model.family == 'unet' else 'transformer'})"]


# --------------------------------------------------------------------------- scheduler and pipeline


def scheduler_for(objective, sampler) -> tuple[str, dict]:
    """The diffusers scheduler (class name, kwargs) that steps like Tessera's ``sampler`` for ``objective``."""
    if objective.name == "flow":
        f = objective.flow
        if f.prediction != "velocity" or f.timestep_scale != 1000.0:
            raise NotMappable("flow objective with prediction 'sample' or timestep_scale != 1000 (diffusers' flow "
                              "schedulers step a velocity at t*1000)")
        if sampler.name == "euler":
            return "FlowMatchEulerDiscreteScheduler", dict(
                num_train_timesteps=1000, shift=f.shift, use_dynamic_shifting=f.dynamic_shift, base_shift=f.base_shift,
                max_shift=f.max_shift, base_image_seq_len=f.base_seq_len, max_image_seq_len=f.max_seq_len)
        if sampler.name == "dpmpp_2m":
            return "DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                       flow_shift=f.shift, use_dynamic_shifting=f.dynamic_shift,
                                                       algorithm_type="dpmsolver++", solver_order=2)
    elif objective.name == "ddpm":
        d, s = objective.ddpm, objective.ddpm.schedule
        common = dict(num_train_timesteps=s.num_train_timesteps, beta_schedule=s.schedule, beta_start=s.beta_start,
                      beta_end=s.beta_end, rescale_betas_zero_snr=s.zero_terminal_snr,
                      prediction_type={"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[d.prediction])
        spacing = dict(timestep_spacing=sampler.timestep_spacing)
        table = {"ddim": ("DDIMScheduler", dict(common, clip_sample=False, **spacing)),
                 "ddpm": ("DDPMScheduler", dict(common, clip_sample=False, **spacing)),
                 "euler_discrete": ("EulerDiscreteScheduler", dict(common, **spacing)),
                 "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(common, algorithm_type="dpmsolver++", solver_order=2,
                                                                  lower_order_final=True)),
                 # a distilled consistency student (tessera distill, method lcm): LCM's grid and boundary scalings
                 "lcm": ("LCMScheduler", dict(common, clip_sample=False, original_inference_steps=sampler.lcm_origin_steps,
                                              timestep_scaling=10.0))}
        if sampler.name in table:
            return table[sampler.name]
    raise NotMappable(f"sampler {sampler.name!r} for objective {objective.name!r} has no diffusers scheduler here")


def pipeline_blockers(model, meta: dict, mode: str) -> list[str]:
    """Why no whole diffusers pipeline can be written for this export with components carried by ``mode``."""
    why = []
    if model.family != "dit":
        why.append(f"the {model.family} pipelines (SD3, SD/SDXL) need transformers CLIP text encoders; Tessera's "
                   "'clip' encoder is open_clip")
    te, ae = meta["text_encoder"], meta["autoencoder"]
    if te["name"] != "t5":
        why.append(f"text encoder {te['name']!r}: PixArt pipelines take a T5 encoder")
    if ae["name"] != "kl":
        why.append(f"autoencoder {ae['name']!r}: " + ("pixel space has no VAE" if ae["name"] == "identity"
                                                      else "PixArt pipelines take an AutoencoderKL"))
    elif te["name"] == "t5":
        why += _component_blockers(te, ae, mode)
    c = model.config
    if model.family == "dit" and c.micro_conditions and c.base_size * c.patch_size != 128:
        why.append("micro-conditions: PixArtAlphaPipeline passes them only to sample_size-128 (1024 px) models")
    objective, sampler = _typed(meta)
    try:
        scheduler_for(objective, sampler)
        if objective.name == "flow" and objective.flow.dynamic_shift:
            why.append("dynamic flow shift: PixArt pipelines cannot pass the resolution-dependent mu")
        if objective.name == "flow" and sampler.name == "euler":
            why.append("flow + euler: PixArt pipelines call scheduler.scale_model_input, which "
                       "FlowMatchEulerDiscreteScheduler lacks; sample with dpmpp_2m")
    except NotMappable as e:
        why.append(str(e))
    return why


def _component_blockers(te: dict, ae: dict, mode: str) -> list[str]:
    """Why the T5 folder or the VAE cannot be carried into a pipeline folder (empty: they can)."""
    from tessera.trainer.export_components import local_source

    t5, kl = te.get("t5") or {}, ae.get("kl") or {}
    if local_source(t5.get("path", "google/t5-v1_1-xxl")) is None or \
            local_source(kl.get("path", "stabilityai/sd-vae-ft-mse"), kl.get("subfolder")) is None:
        return ["the text encoder and the VAE must be local folders to be carried into a diffusers folder"]
    scale, shift = _vae_scale_shift(ae)
    if shift != 0.0:
        return ["a VAE shift_factor: PixArt pipelines decode latents / scaling_factor without a shift"]
    vae_cfg = json.loads((local_source(kl.get("path", "stabilityai/sd-vae-ft-mse"), kl.get("subfolder"))
                          / "config.json").read_text())
    if mode == "path" and vae_cfg.get("scaling_factor") != scale:
        return [f"the VAE's config says scaling_factor {vae_cfg.get('scaling_factor')}, Tessera applies {scale}: "
                "export with --components copy (the copy's config carries Tessera's value)"]
    return []


def _typed(meta: dict):
    """(ObjectiveConfig, SamplerConfig) of an export's ``tessera.json``."""
    from tessera.config import from_dict
    from tessera.trainer.diffusion.objectives import ObjectiveConfig
    from tessera.trainer.diffusion.sampling import SamplerConfig

    return from_dict(ObjectiveConfig, meta["objective"], "tessera.json"), from_dict(SamplerConfig, meta["sampler"],
                                                                                  "tessera.json")


def _vae_scale_shift(ae: dict) -> tuple[float, float]:
    """The latent scale/shift Tessera applies with this KL config (read from config files, no weights)."""
    from diffusers import AutoencoderKL

    from tessera.config import from_dict
    from tessera.trainer.autoencoders.configs import KLConfig
    from tessera.trainer.autoencoders.kl import resolve_scale_shift
    from tessera.trainer.text_encoders.runtime import resolve_path

    cfg = from_dict(KLConfig, ae.get("kl") or {}, "autoencoder.kl")
    kwargs = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
    return resolve_scale_shift(cfg, SimpleNamespace(**AutoencoderKL.load_config(resolve_path(cfg.path), **kwargs)))


def write_pipeline(out: Path, model, meta: dict, mode: str) -> dict:
    """Write scheduler, text encoder, tokenizer, VAE and ``model_index.json`` next to ``out/transformer``; returns the
    call settings that reproduce ``tessera sample`` (also written to ``tessera_diffusers.json``)."""
    import diffusers
    import transformers

    from tessera.trainer.export_components import local_source, place

    objective, sampler = _typed(meta)
    sched_name, sched_kwargs = scheduler_for(objective, sampler)
    getattr(diffusers, sched_name)(**sched_kwargs).save_pretrained(out / "scheduler")
    t5, kl = meta["text_encoder"].get("t5") or {}, meta["autoencoder"].get("kl") or {}
    te_src = local_source(t5.get("path", "google/t5-v1_1-xxl"))
    vae_src = local_source(kl.get("path", "stabilityai/sd-vae-ft-mse"), kl.get("subfolder"))
    scale = _vae_scale_shift(meta["autoencoder"])[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(te_src)
    place(te_src, out / "text_encoder", mode)
    if mode == "copy":
        tokenizer.save_pretrained(out / "tokenizer")
    else:
        place(te_src, out / "tokenizer", mode)
    place(vae_src, out / "vae", mode, {"scaling_factor": scale, "shift_factor": None})
    pipe = "PixArtAlphaPipeline" if model.config.micro_conditions or t5.get("max_length", 120) <= 120 \
        else "PixArtSigmaPipeline"
    index = {"_class_name": pipe, "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", sched_name], "text_encoder": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", type(tokenizer).__name__],
             "transformer": ["diffusers", "PixArtTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (out / PIPELINE_FILE).write_text(json.dumps(index, indent=2) + "\n")
    h, w = meta["sample_size"]
    call = {"num_inference_steps": sampler.steps, "guidance_scale": sampler.cfg_scale, "height": h, "width": w,
            "max_sequence_length": t5.get("max_length", 120), "use_resolution_binning": False, "clean_caption": False}
    if sampler.name == "ddim":
        call["eta"] = sampler.eta
    return call


def _seed_rule() -> str:
    """How to draw the same x_T as ``tessera sample`` (documented next to the export)."""
    return ("image i of a `tessera sample --seed S` grid: generator=torch.Generator().manual_seed("
            "tessera.trainer.inference.grid_seed(S, i)), one prompt per pipeline call; the pipeline's first draw "
            "is x_T, as Tessera's")


def export_diffusers(source: str, out: str, *, components: str = "path", use_ema: bool = True) -> list[str]:
    """Write a diffusers folder for the Tessera export ``source`` into ``out``; returns (and logs) its notes."""
    from tessera.trainer.models import load_pretrained

    if storage.is_s3(out):
        raise ValueError("--format diffusers writes a local folder (diffusers' save_pretrained); copy it afterwards")
    meta = json.loads(storage.read_text(storage.join(source, "tessera.json")))
    variant = "ema" if use_ema and "ema" in meta["variants"] else "raw"
    if meta.get("control"):  # a control branch: diffusers' ControlNet class, and Tessera's format beside it
        notes = export_control(source, meta, variant, Path(out))
        notes.append("wrote Tessera's format too (ema/, raw/, tessera.json): `tessera sample --checkpoint --control` "
                     "reads it")
        _copy_tessera_export(source, out, components)
        for n in notes:
            log.warning("export: %s", n)
        return notes
    with tempfile.TemporaryDirectory() as tmp:
        for u in storage.list_prefix(storage.join(source, variant) + "/"):
            (Path(tmp) / Path(u).name).write_bytes(storage.read_bytes(u))
        model = load_pretrained(tmp)
    out_p, notes = Path(out), []
    try:
        sub, ref = diffusers_model(model)
        ref.save_pretrained(out_p / sub, safe_serialization=True)
        blockers = pipeline_blockers(model, meta, components)
        if blockers:
            notes.append(f"{sub}/ loads with diffusers' {type(ref).__name__}.from_pretrained(out, subfolder={sub!r}); "
                         f"no whole pipeline: {'; '.join(blockers)}")
    except NotMappable as e:
        blockers, notes = ["model"], [f"no diffusers model: {e}"]
    if "model" not in blockers and storage.exists(storage.join(source, "lora", "adapter_config.json")):
        from tessera.trainer.lora_diffusers import NoLoraMapping, write_diffusers_lora

        try:  # a LoRA run's adapter, for the base pipeline (the folder above holds the merged model)
            notes.append(write_diffusers_lora(storage.join(source, "lora"), model, out_p / "lora"))
        except NoLoraMapping as e:
            notes.append(f"no diffusers LoRA: {e}; the PEFT adapter for Tessera's model is in Tessera's format")
            blockers.append("lora")
    if not blockers:
        call = write_pipeline(out_p, model, meta, components)
        if meta["objective"]["name"] == "flow":
            notes.append("diffusers' flow DPM-Solver feeds the model int(t * 1000) where Tessera feeds t * 1000: "
                         "images differ from `tessera sample` by a few 8-bit levels (docs/models.md)")
        gi = meta["sampler"].get("guidance_interval")
        if gi and list(gi) != [0.0, 1.0]:
            notes.append(f"diffusers pipelines guide every step; this model's guidance_interval {gi} is not carried")
        (out_p / NOTES_FILE).write_text(json.dumps({"call": call, "seed": _seed_rule(), "variant": variant,
                                                     "notes": notes}, indent=2) + "\n")
    else:
        notes.append("wrote Tessera's format too (ema/, raw/, tessera.json): `tessera sample --checkpoint` reads it")
        # lora/ stays the diffusers adapter when one was written (Tessera's PEFT adapter is the source's lora/)
        _copy_tessera_export(source, out, components, adapter="lora" not in blockers and (out_p / "lora").exists())
    for n in notes:
        log.warning("export: %s", n)
    return notes


def _copy_tessera_export(source: str, out: str, components: str, adapter: bool = False) -> None:
    """Copy a Tessera export's weights and ``tessera.json`` into ``out`` (``adapter``: ``out/lora`` already holds
    the diffusers adapter, so Tessera's is not copied over it), then carry its components."""
    from tessera.trainer.export_components import carry_tessera

    root = source.rstrip("/")
    for u in storage.list_prefix(root + "/"):
        rel = u[len(root) + 1:]
        if rel.split("/")[0] in ("ema", "raw") + (() if adapter else ("lora",)) or rel == "tessera.json":
            storage.write_bytes(storage.join(out, rel), storage.read_bytes(u))
    carry_tessera(out, components)


def export_any(checkpoint: str, out: str, *, fmt: str = "tessera", components: str = "path",
               use_ema: bool = True) -> str:
    """``tessera export``: Tessera's format (``trainer.export``) or a diffusers folder, components carried per
    ``components``; a checkpoint is first exported to Tessera's (stable) format, then converted."""
    from tessera.trainer.export import export
    from tessera.trainer.export_components import carry_tessera
    from tessera.trainer.inference import resolve_checkpoint

    kind, url = resolve_checkpoint(checkpoint)
    if fmt == "tessera":
        export(checkpoint, out)
        carry_tessera(out, components)
        return out
    if kind == "export":
        export_diffusers(url, out, components=components, use_ema=use_ema)
        return out
    with tempfile.TemporaryDirectory() as tmp:
        export(checkpoint, str(Path(tmp) / "export"))
        export_diffusers(str(Path(tmp) / "export"), out, components=components, use_ema=use_ema)
    return out
