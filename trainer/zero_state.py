"""Each rank's piece of the fp32 master weights and Adam moments under ZeRO 1/2/3: the one module that
reads DeepSpeed's partitioning.

A ``Fragment`` says which slice of a flattened parameter this rank owns (``start``, ``numel``) and gives a
view of it in the fp32 master weights or in an Adam moment, on the device DeepSpeed keeps it:

* ZeRO-1/2 and DeepSpeed's bf16 optimizer: ``param._hp_mapping`` (``lp_fragment_address``: where the slice
  sits in the parameter; ``get_hp_fragment(key)``: the view). A rank owns no slice of some parameters.
* ZeRO-3: ``safe_get_local_fp32_param`` / ``safe_get_local_optimizer_state``: rank r owns elements
  ``[r * n, (r + 1) * n)`` of the flattened parameter padded to ``world * n`` (``n = param.partition_numel()``).
  With the optimizer offloaded to the CPU those getters return a copy on the accelerator, so a restore writes
  through DeepSpeed's setters (``safe_set_local_*``) into the real partitions.

With fragments the EMA lives on each rank's own slice (no per-step gather), and each rank checkpoints its own
slices (``trainer/shards.py``). ``gather_to_rank0`` remains for sampling on rank 0 (the fine-tuning guard), and
``gather_to_all`` gives every rank the whole weights for sharded sampling (grids, in-training evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from tessera.trainer.distributed import world_size

MOMENTS = ("exp_avg", "exp_avg_sq")
_BUCKET = 1 << 24  # elements per reduce when gathering (64 MB of fp32)


@dataclass
class Fragment:
    """This rank's slice of one parameter."""

    name: str
    shape: torch.Size
    start: int  # offset of the slice in the flattened parameter
    numel: int  # elements of the slice; 0 when this rank owns none
    _view: Callable[[str | None], torch.Tensor]
    _set: Callable[[str | None, torch.Tensor], None] | None = None  # None: write through view()

    def view(self, key: str | None = None) -> torch.Tensor:
        """The slice (1-D, fp32) in the master weights (``key=None``) or in Adam's ``key`` moment."""
        return self._view(key)[: self.numel] if self.numel else torch.empty(0)

    def set(self, key: str | None, value: torch.Tensor) -> None:
        """Overwrite the slice (``numel`` elements) in DeepSpeed's own storage."""
        if not self.numel:
            return
        if self._set is not None:
            self._set(key, value)
        else:
            self.view(key).copy_(value)

    @property
    def full_numel(self) -> int:
        """Elements of the whole parameter."""
        return int(torch.Size(self.shape).numel())


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO/bf16 wrapper."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def fragments(engine) -> list[Fragment]:
    """This rank's slices of every trainable parameter, in ``named_parameters`` order."""
    if engine.zero_optimization_stage() < 1:
        raise ValueError("Tessera trains with ZeRO stage 1, 2 or 3")
    out = []
    rank = dist.get_rank() if dist.is_initialized() else 0
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):  # ZeRO-3
            n = p.partition_numel()
            start = rank * n
            valid = max(0, min(n, p.ds_numel - start))
            out.append(Fragment(name, p.ds_shape, start, valid, lambda key, p=p: _z3_get(p, key),
                                lambda key, value, p=p, n=n: _z3_set(p, n, key, value)))
        else:  # ZeRO-1/2, bf16 optimizer
            m = p._hp_mapping
            if m is None:
                out.append(Fragment(name, p.shape, 0, 0, lambda key: torch.empty(0)))
            else:
                addr = m.lp_fragment_address
                out.append(Fragment(name, p.shape, addr.start, addr.numel, lambda key, m=m: m.get_hp_fragment(key)))
    return out


def _z3_get(p, key: str | None) -> torch.Tensor:
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    return safe_get_local_fp32_param(p) if key is None else safe_get_local_optimizer_state(p, key)


def _z3_set(p, n: int, key: str | None, value: torch.Tensor) -> None:
    """Write a ZeRO-3 partition through DeepSpeed's setter: under CPU offload the getter hands back a copy on the
    accelerator (``partition.to(device)``), and writing into that copy would be lost."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    full = torch.zeros(n, dtype=torch.float32)  # the partition's padding past the parameter's end stays zero
    full[: value.numel()] = value
    if key is None:
        safe_set_local_fp32_param(p, full)
    else:
        safe_set_local_optimizer_state(p, full, key)


def _buckets(frags: list[Fragment], read: Callable[[Fragment], torch.Tensor]):
    """Yield ``(bucket, buf)``: consecutive fragments of at most ``_BUCKET`` elements as [(fragment, offset)] and a
    flat fp32 buffer holding this rank's slices at their places (zeros elsewhere), on the slices' device."""
    device = next((read(f).device for f in frags if f.numel), torch.device("cpu"))
    i = 0
    while i < len(frags):
        bucket, total = [], 0
        while i < len(frags) and (not bucket or total + frags[i].full_numel <= _BUCKET):
            bucket.append((frags[i], total))
            total += frags[i].full_numel
            i += 1
        # When this rank owns every element no zero fill is needed, and with one rank no reduce; a CPU buffer is
        # handed over as is (it is fresh), so a one-rank CPU gather copies each tensor once.
        covered = all(f.numel == f.full_numel for f, _ in bucket)
        buf = (torch.empty if covered else torch.zeros)(total, dtype=torch.float32, device=device)
        for f, off in bucket:
            if f.numel:
                buf[off + f.start: off + f.start + f.numel].copy_(read(f))
        yield bucket, buf


def _unpack(bucket, buf: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    """The bucket's tensors, on the CPU, into ``out``."""
    host = buf if buf.device.type == "cpu" else buf.to("cpu")
    for f, off in bucket:
        out[f.name] = host[off: off + f.full_numel].view(f.shape)


def gather_to_rank0(frags: list[Fragment], read: Callable[[Fragment], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full fp32 tensors on rank 0 (CPU) from every rank's slices ``read(fragment)``; {} on other ranks.

    Collective: every rank calls it with the same fragments. Slices are disjoint, so a SUM-reduce of
    zero-filled buckets assembles each tensor exactly.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    out: dict[str, torch.Tensor] = {}
    for bucket, buf in _buckets(frags, read):
        if world_size() > 1:
            dist.reduce(buf, dst=0)
        if rank == 0:
            _unpack(bucket, buf, out)
    return out


def gather_to_all(frags: list[Fragment], read: Callable[[Fragment], torch.Tensor],
                  on_device: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 tensors on every rank, as ``gather_to_rank0`` assembles them, by an all-reduce per bucket.

    For sampling on every rank (sharded grids and in-training evaluation): on the CPU, each bucket leaving the
    device as soon as it is reduced, so the device holds one bucket (64 MB) beyond what training holds and the
    host one copy of the weights per rank until the caller has built its model. ``on_device``: the tensors stay
    where the slices are (distillation's target network and teacher, refreshed on every rank)."""
    out: dict[str, torch.Tensor] = {}
    for bucket, buf in _buckets(frags, read):
        if world_size() > 1:
            dist.all_reduce(buf)
        if on_device:
            out.update((f.name, buf[off: off + f.full_numel].view(f.shape)) for f, off in bucket)
        else:
            _unpack(bucket, buf, out)
    return out


def ensure_optimizer_state(engine) -> None:
    """Create Adam's state (zeros, step 0) as torch's first step would, and let ZeRO link its fragments.

    Optimizer state is created lazily at the first step; a checkpoint is loaded before that step.
    """
    opt = base_optimizer(engine)
    params = [p for group in opt.param_groups for p in group["params"]]
    # ZeRO-3 swaps its flat fp32 partitions into param_groups only for the duration of a step.
    params += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
    for p in params:
        st = opt.state[p]
        st.setdefault("step", torch.tensor(0.0))
        for key in MOMENTS:
            if key not in st:
                st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    zopt = engine.optimizer
    if hasattr(zopt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 link moment views on first use
        zopt._hp_optimizer_states_linked = False
        zopt._lazy_init_hp_params_optimizer_state()


def adam_step(engine) -> int:
    """The optimizer's own step count (DeepSpeed's global_steps also counts skipped steps)."""
    for st in base_optimizer(engine).state.values():
        if "step" in st:
            return int(torch.as_tensor(st["step"]).item())
    return 0


def set_adam_step(engine, step: int) -> None:
    """Set Adam's step count (bias correction) on every parameter group's state."""
    for st in base_optimizer(engine).state.values():
        if "step" in st:
            st["step"] = torch.full_like(torch.as_tensor(st["step"], dtype=torch.float32), float(step))


@torch.no_grad()
def restore(engine, frags: list[Fragment], slices: dict[str, dict[str, torch.Tensor]], adam_steps: int) -> None:
    """Write this rank's slices (``slices[kind][name]``, kinds ``weight`` and the Adam moments, each ``numel``
    elements from ``start``) into DeepSpeed's fp32 partitions, then refresh the working weights the forward uses.

    Collective under ZeRO-1/2: each rank restored only its own partition, and ``update_lp_params`` all-gathers
    the working (bf16 or fp32) module weights from the partitions, exactly as DeepSpeed does after a step."""
    ensure_optimizer_state(engine)
    for f in frags:
        if not f.numel:
            continue
        f.set(None, slices["weight"][f.name])
        for key in MOMENTS:
            if f.name in slices.get(key, {}):
                f.set(key, slices[key][f.name])
    zopt = engine.optimizer
    if hasattr(zopt, "fp32_partitioned_groups_flat"):  # ZeRO-3: working bit16 partitions <- restored fp32
        for bit16, fp32 in zip(zopt.fp16_partitioned_groups_flat, zopt.fp32_partitioned_groups_flat):
            bit16.data.copy_(fp32.data)
    else:  # ZeRO-1/2 and the bf16 optimizer: module weights <- partitions, all-gathered
        zopt.update_lp_params()
    set_adam_step(engine, adam_steps)
