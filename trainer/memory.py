"""``tessera train --estimate-memory``: per-rank model-state memory from the ZeRO formulas and DeepSpeed's estimators."""

from __future__ import annotations

import contextlib
import io


def count_params(model_cfg) -> tuple[int, int]:
    """(total trainable parameters, largest single layer's parameters), built on the meta device (no allocation)."""
    import torch

    with torch.device("meta"):
        model = model_cfg.build()
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, largest


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
    from tessera.trainer.ds_config import resolve_precision

    n, largest = count_params(cfg.model)
    ds = cfg.deepspeed
    import torch

    cuda = torch.cuda.is_available()  # "auto" precision is resolved for this machine, as training would
    precision = resolve_precision(ds, cuda=cuda, bf16_ok=cuda and torch.cuda.is_bf16_supported())
    est = zero_formula_bytes(n, ds.stage, world, precision, ds.offload_optimizer, ds.offload_param)
    gb = 1024**3
    lines = [f"model: {cfg.model.name}  parameters: {n:,} ({n / 1e6:.1f} M)  largest layer: {largest:,}",
             f"ZeRO stage {ds.stage}, world size {world}, precision {precision}",
             "per-rank model-state memory (ZeRO formulas, Adam):"]
    for k, v in est.items():
        if v:
            lines.append(f"  {k:<18} {v / gb:9.3f} GiB")
    total = sum(v for k, v in est.items() if k.startswith("device"))
    if cfg.ema.enabled:  # each rank keeps the EMA of its own ZeRO slice of the fp32 weights (trainer/ema.py)
        lines.append(f"  {'ema (fp32, 1/world per rank)':<18} {4 * n / world / gb:9.3f} GiB")
        total += 4 * n / world
    lines.append(f"  {'device total':<18} {total / gb:9.3f} GiB")
    if ds.stage >= 2:
        lines += ["", "DeepSpeed's estimator (CUDA-style, all offload variants):", deepspeed_estimate(n, largest, ds.stage, world)]
    lines.append("Activations are extra: they scale with batch size and resolution (activation checkpointing cuts them).")
    return "\n".join(lines)
