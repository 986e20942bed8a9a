"""``tessera train --estimate-memory``: parameters, FLOPs per image and per-rank model-state memory (ZeRO formulas
and DeepSpeed's estimators), all from the config on the meta device: no weights are read or allocated."""

from __future__ import annotations

import contextlib
import io

# Pixels per latent cell of each autoencoder family (SD/SDXL/SD3 VAEs: 8; Sana's DC-AE f32c32: 32).
DOWNSAMPLE = {"identity": 1, "kl": 8, "dc": 32}


def meta_model(model_cfg):
    """The configured model built on the meta device (shapes only; ``init_from`` is not read)."""
    import torch

    with torch.device("meta"):
        return model_cfg.build(init=False)


def count_params(model_cfg, model=None) -> tuple[int, int]:
    """(total trainable parameters, largest single layer's parameters), built on the meta device (no allocation)."""
    model = model if model is not None else meta_model(model_cfg)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, largest


def shadowed_preset(model_cfg) -> dict[str, tuple]:
    """{field: (value, preset value)} for every field of the model's preset that an explicit value overrides."""
    from tessera.trainer.models import DIT_PRESETS, MMDIT_PRESETS, UNET_PRESETS

    sec = model_cfg.section()
    tables = {"dit": DIT_PRESETS, "mmdit": MMDIT_PRESETS, "unet": UNET_PRESETS}  # plugin families: no presets here
    if model_cfg.name not in tables or not getattr(sec, "preset", None):
        return {}
    table = tables[model_cfg.name][sec.preset]
    if model_cfg.name == "unet":
        return {k: (v, table[k]) for k, v in sec.kwargs.items() if k in table and v != table[k]}
    return {k: (getattr(sec, k), v) for k, v in table.items() if getattr(sec, k) != v}


def text_length(te_cfg) -> int:
    """Text tokens per prompt the model sees (SD3's concat: the channel-joined part plus the appended ones)."""
    sec = te_cfg.section()
    if te_cfg.name != "concat":
        return sec.max_length
    return max([text_length(c) for c in sec.channel] or [0]) + sum(text_length(c) for c in sec.sequence)


def config_notes(cfg) -> list[str]:
    """What a dry run should say beyond the resolved config: shadowed preset fields, weights it did not read."""
    notes = []
    shadow = shadowed_preset(cfg.model)
    if shadow:
        name = cfg.model.name
        fields = ", ".join(f"{k}={v!r} (preset {p!r})" for k, (v, p) in shadow.items())
        notes.append(f"model.{name}.preset={cfg.model.section().preset!r} is shadowed by explicit fields: {fields}")
    if cfg.model.init_from:
        notes.append(f"model.init_from={cfg.model.init_from!r}: its weights load when training starts "
                     "(not in a dry run)")
    return notes


def flops_line(cfg, model) -> str:
    """Forward FLOPs per image at the config's sample size and text length (x3 for a training step)."""
    from tessera.trainer.models import model_flops

    f = DOWNSAMPLE.get(cfg.autoencoder.name, 1)
    h, w, L = cfg.samples.height // f, cfg.samples.width // f, text_length(cfg.text_encoder)
    fwd = model_flops(model, h, w, L)
    return (f"FLOPs per image at {cfg.samples.height}x{cfg.samples.width} px ({h}x{w} latent, {L} text tokens): "
            f"forward {fwd / 1e9:,.1f} GFLOP, training (fwd+bwd) {3 * fwd / 1e9:,.1f} GFLOP")


def zero_formula_bytes(n: int, stage: int, world: int, precision: str, offload_optimizer: bool = False,
                       offload_param: bool = False) -> dict[str, float]:
    """Model-state bytes per rank (ZeRO paper, Adam): weights, gradients, optimizer (fp32 master + 2 moments)."""
    mixed = precision == "bf16"
    w_bytes = (2 if mixed else 4) * n
    g_bytes = (2 if mixed else 4) * n
    opt_bytes = (12 if mixed else 8) * n  # mixed: fp32 master + exp_avg + exp_avg_sq; fp32: the moments only
    if stage >= 1:
        opt_bytes /= world
    if stage >= 2:
        g_bytes /= world
    if stage >= 3:
        w_bytes /= world
    device = {"weights": w_bytes, "gradients": g_bytes, "optimizer": opt_bytes}
    host = {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0}
    if offload_optimizer:
        host["optimizer"], device["optimizer"] = device["optimizer"], 0.0
    if offload_param and stage == 3:
        host["weights"], device["weights"] = device["weights"], 0.0
    return {**{f"device_{k}": v for k, v in device.items()}, **{f"host_{k}": v for k, v in host.items()}}


def deepspeed_estimate(n: int, largest: int, stage: int, world: int) -> str:
    """DeepSpeed's own estimator output (all offload options) for ZeRO-2 or ZeRO-3."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

            estimate_zero3_model_states_mem_needs_all_cold(n, largest, num_gpus_per_node=world, num_nodes=1)
        else:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

            estimate_zero2_model_states_mem_needs_all_cold(n, num_gpus_per_node=world, num_nodes=1)
    return buf.getvalue()


def report(cfg, world: int) -> str:
    """The text printed by ``--estimate-memory``."""
    from tessera.trainer.ds_config import device_capacity, resolve_precision, resolve_stage

    model = meta_model(cfg.model)
    n, largest = count_params(cfg.model, model)
    ds = cfg.deepspeed
    import torch

    cuda = torch.cuda.is_available()  # "auto" precision is resolved for this machine, as training would
    precision = resolve_precision(ds, cuda=cuda, bf16_ok=cuda and torch.cuda.is_bf16_supported())
    stage = resolve_stage(ds, n, world, precision, device_capacity(torch.device("cuda" if cuda else "cpu")))
    est = zero_formula_bytes(n, stage, world, precision, ds.offload_optimizer, ds.offload_param)
    gb = 1024**3
    lines = [f"model: {cfg.model.name}  parameters: {n:,} ({n / 1e6:.1f} M)  largest layer: {largest:,}",
             *(f"note: {note}" for note in config_notes(cfg)), flops_line(cfg, model),
             f"ZeRO stage {stage}{' (auto: the lowest whose states fit half the memory)' if ds.stage == 'auto' else ''}"
             f", world size {world}, precision {precision}",
             "per-rank model-state memory (ZeRO formulas, Adam):"]
    for k, v in est.items():
        if v:
            lines.append(f"  {k:<18} {v / gb:9.3f} GiB")
    total = sum(v for k, v in est.items() if k.startswith("device"))
    if cfg.ema.enabled:  # each rank keeps the EMA of its own ZeRO slice of the fp32 weights (trainer/ema.py)
        lines.append(f"  {'ema (fp32, 1/world per rank)':<18} {4 * n / world / gb:9.3f} GiB")
        total += 4 * n / world
    lines.append(f"  {'device total':<18} {total / gb:9.3f} GiB")
    if stage >= 2:
        lines += ["", "DeepSpeed's estimator (CUDA-style, all offload variants):", deepspeed_estimate(n, largest, stage, world)]
    lines.append("Activations are extra: they scale with batch size and resolution (activation checkpointing cuts them).")
    return "\n".join(lines)
