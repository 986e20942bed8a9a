"""Device, dtype and distributed-backend detection: CUDA for users, CPU here, never hard-coded."""

from __future__ import annotations

import os


def pick_device(requested: str = "auto"):
    """``auto`` -> the local CUDA device when available, else CPU."""
    import torch

    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def pick_dtype(requested: str = "auto", device=None):
    """``auto`` -> bf16 where the device supports it natively (CUDA Ampere+), else fp32."""
    import torch

    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if requested != "auto":
        return table[requested]
    device = device or pick_device()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def dist_backend() -> str:
    """gloo for CPU tensors, plus NCCL for CUDA tensors when there are GPUs (one group, both device types)."""
    import torch

    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def configure_deepspeed_accelerator() -> str:
    """Set ``DS_ACCELERATOR`` before DeepSpeed is imported: ``cuda`` on GPUs, ``cpu`` otherwise.

    DeepSpeed's own auto-detection probes for oneCCL/IPEX on CPU machines and fails without them;
    an explicit choice by detection keeps the CPU path on plain gloo.
    """
    import torch

    if "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    return os.environ["DS_ACCELERATOR"]


def cpu_peak_flops(default_tflops: float = 0.0) -> float:
    """Peak FLOP/s used for MFU on CPU: ``TESSERA_CPU_PEAK_TFLOPS`` or the configured value."""
    return float(os.environ.get("TESSERA_CPU_PEAK_TFLOPS", default_tflops)) * 1e12


# Dense bf16 peak TFLOP/s per device, for MFU. Names match torch.cuda.get_device_name substrings.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
                   "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0}


def device_peak_flops(device, cpu_tflops: float) -> float:
    """Peak FLOP/s of ``device`` from the table (CUDA) or the configured CPU peak."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tf * 1e12
        return 0.0
    return cpu_peak_flops(cpu_tflops)
