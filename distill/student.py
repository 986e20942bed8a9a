"""The student: built from the teacher (a full copy, or LoRA adapters on it), the training config its checkpoints
carry (so ``tessera sample/export/eval`` sample it with its own sampler), and its whole weights on every rank."""

from __future__ import annotations

import copy
import dataclasses
import hashlib

import torch

from tessera import storage
from tessera.trainer import consolidate
from tessera.trainer.diffusion.sampling import SamplerConfig
from tessera.trainer.inference import resolve_checkpoint, sampling_weights
from tessera.trainer.zero_state import gather_to_all

from tessera.finetune.policy import Base, Reference, checkpoint_job, wrap_lora


def build_student(base: Base, lora) -> tuple[torch.nn.Module, Reference]:
    """(student, teacher source): a trainable copy of the teacher with a frozen copy as the teacher, or (LCM-LoRA)
    the teacher with LoRA adapters, whose adapters-off network is the teacher (no second copy)."""
    if lora.enabled:
        student = wrap_lora(base.model, lora)
        return student, Reference(student)
    student = copy.deepcopy(base.model).train().requires_grad_(True)
    return student, Reference(student)  # Reference keeps a frozen copy of a full model


def student_job(base: Base, run_cfg, objective, sampler: SamplerConfig):
    """The training config a student checkpoint carries: the teacher's model and encoders, the student's objective
    (a progressive eps teacher's student predicts v) and its own sampler."""
    job = checkpoint_job(base, run_cfg)
    return dataclasses.replace(job, objective=objective, samples=dataclasses.replace(job.samples, sampler=sampler))


@torch.no_grad()
def gather_all(frags, read) -> dict[str, torch.Tensor]:
    """Full fp32 tensors on every rank, on the slices' device (collective): the target network and a progressive
    round's teacher are needed on every rank."""
    return gather_to_all(frags, read, on_device=True)


def teacher_digest(checkpoint: str, use_ema: bool) -> str:
    """sha256 of the teacher's weights (the assembled tensors of a sharded checkpoint, or an export's file): what
    a reflow pair cache is fingerprinted with."""
    kind, url = resolve_checkpoint(checkpoint)
    name = sampling_weights(kind, url, use_ema)
    if kind == "checkpoint":
        return consolidate.weights_sha256(url, name)
    h = hashlib.sha256()
    with storage.open_read(storage.join(url, name)) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def load_params(module: torch.nn.Module, weights: dict[str, torch.Tensor], complete: bool = True) -> None:
    """Copy full weights into the parameters of ``module`` (buffers are left alone): into every one, or with
    ``complete=False`` into those named (a LoRA student's adapters). An unknown name, or a missing one when
    ``complete``, is an error, never a silent partial load."""
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(weights)) if complete else []
    unknown = sorted(set(weights) - set(params))
    if missing or unknown:
        raise KeyError(f"weights do not fit the network: missing {missing[:5]}, unknown {unknown[:5]}")
    for name, t in weights.items():
        params[name].copy_(t.to(params[name].device, params[name].dtype).view_as(params[name]))
