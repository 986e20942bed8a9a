"""Checkpoints: consolidated safetensors + JSON, atomic directories, a ``latest`` pointer, keep-last-K.

Layout of ``<root>/step_000000123/``::

    model.safetensors      full fp32 master weights (gathered from ZeRO partitions)
    optimizer.safetensors  Adam moments per parameter: exp_avg/<name>, exp_avg_sq/<name>
    ema.safetensors        EMA weights
    trainer_state.json     counters, LR-scheduler state, world size, ZeRO stage, config hash
    loader/rank<R>.json    each rank's data-loader state
    rng/rank<R>.json       python / numpy / torch / cuda RNG states
    config.yaml            the resolved config
    COMPLETE               written last: a directory without it is ignored

Why our own format instead of ``engine.save_checkpoint``: DeepSpeed's files are pickles loaded with
``weights_only=False``, and they are tied to the world size. Gathering full fp32 weights and Adam moments
through DeepSpeed's ``safe_get_full_*`` API gives safetensors only (no unpickling, ever) that load back
bit-exactly onto ANY world size and ZeRO stage via ``safe_set_full_*``. The cost is one all-reduce per
parameter at save time, paid every N samples, not every step.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tessera import storage

log = logging.getLogger("tessera.checkpoint")

COMPLETE = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d{9})$")


# --------------------------------------------------------------------------- DeepSpeed state


def _uses_hp_mapping(engine) -> bool:
    return engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled()


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO/bf16 wrapper."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _module_holds_master(engine) -> bool:
    """True when the module's own parameters are the full fp32 master weights, bit for bit: ZeRO-0/1/2 in fp32,
    where DeepSpeed copies each updated fp32 partition into the (same-dtype) module buffer and all-gathers it
    after every step (tests/trainer/test_master_weights.py checks it on 2 ranks). Reading them then needs no
    collective: the EMA update per step drops from one all-reduce per parameter to none (~20% of a small
    model's CPU step time)."""
    dtype_ok = not engine.bfloat16_enabled() and not engine.fp16_enabled()
    return dtype_ok and engine.zero_optimization_stage() in (0, 1, 2)


def full_fp32_params(engine) -> dict[str, torch.Tensor]:
    """Full fp32 master weights by name; a collective call on every rank under ZeRO-3 or bf16."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    gather = _uses_hp_mapping(engine) and not _module_holds_master(engine)
    for name, p in engine.module.named_parameters():
        if gather:
            out[name] = safe_get_full_fp32_param(p).detach().to("cpu", torch.float32).clone()
        else:
            out[name] = p.detach().to("cpu", torch.float32).clone()
    return out


def gather_state(engine) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, optimizer moments), full and fp32; collective on every rank."""
    from deepspeed.utils import safe_get_full_optimizer_state

    weights = full_fp32_params(engine)
    for name, b in engine.module.named_buffers():
        weights[f"buffer/{name}"] = b.detach().cpu().clone()
    moments: dict[str, torch.Tensor] = {}
    opt = base_optimizer(engine)
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            if _uses_hp_mapping(engine):
                t = safe_get_full_optimizer_state(p, key)
            else:
                t = opt.state.get(p, {}).get(key)
            if t is not None:
                moments[f"{key}/{name}"] = t.detach().to("cpu", torch.float32).clone()
    return weights, moments


def adam_step(engine) -> int:
    """The optimizer's own step count (DeepSpeed's global_steps also counts skipped steps)."""
    for st in base_optimizer(engine).state.values():
        if "step" in st:
            return int(torch.as_tensor(st["step"]).item())
    return 0


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
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in st:
                st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    zopt = engine.optimizer
    if hasattr(zopt, "_lazy_init_hp_params_optimizer_state"):
        zopt._hp_optimizer_states_linked = False
        zopt._lazy_init_hp_params_optimizer_state()


def restore_state(engine, weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], opt_steps: int) -> None:
    """Load gathered weights and Adam moments into a DeepSpeed engine of any world size / ZeRO stage."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    ensure_optimizer_state(engine)
    opt = base_optimizer(engine)
    missing = [n for n, _ in engine.module.named_parameters() if n not in weights]
    if missing:
        raise KeyError(f"checkpoint lacks parameters: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, p in engine.module.named_parameters():
        w = weights[name]
        if _uses_hp_mapping(engine):
            safe_set_full_fp32_param(p, w.to(p.device))
            if not hasattr(p, "ds_id"):  # ZeRO-1/2 and bf16 keep a full low-precision copy in the module
                with torch.no_grad():
                    p.data.copy_(w.to(p.dtype))
        else:
            with torch.no_grad():
                p.data.copy_(w)
        for key in ("exp_avg", "exp_avg_sq"):
            t = moments.get(f"{key}/{name}")
            if t is None:
                continue
            if _uses_hp_mapping(engine):
                safe_set_full_optimizer_state(p, t.to(p.device), key)
            else:
                st = opt.state.setdefault(p, {})
                st[key] = t.to(p.device).clone()
                st.setdefault("step", torch.tensor(0.0))
    for name, b in engine.module.named_buffers():
        if f"buffer/{name}" in weights:
            b.data.copy_(weights[f"buffer/{name}"])
    # ZeRO-3 keeps the partitioned fp16/bf16 copies in sync from the fp32 master at the next step;
    # for exactness we also refresh them now.
    zopt = engine.optimizer
    if hasattr(zopt, "_restore_from_bit16_weights") and hasattr(zopt, "fp32_partitioned_groups_flat"):
        for fp16_part, fp32_part in zip(zopt.fp16_partitioned_groups_flat, zopt.fp32_partitioned_groups_flat):
            fp16_part.data.copy_(fp32_part.data)
    for st in opt.state.values():
        if "step" in st:
            st["step"] = torch.full_like(torch.as_tensor(st["step"], dtype=torch.float32), float(opt_steps))


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as JSON."""
    ver, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": [ver, list(internal), gauss],
             "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
             "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    ver, internal, gauss = state["python"]
    random.setstate((ver, tuple(internal), gauss))
    name, keys, pos, has_gauss, g = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, g))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


# --------------------------------------------------------------------------- directory management


def step_dirname(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step_{step:09d}"


class CheckpointManager:
    """Writes and finds checkpoints under a local or ``s3://`` root."""

    def __init__(self, root: str, keep_last: int = 3, rank: int = 0) -> None:
        self.root, self.keep_last, self.rank = root, keep_last, rank

    # -- writing ------------------------------------------------------------------------------
    def staging_url(self, step: int) -> str:
        """Where a checkpoint is assembled: a ``.partial`` dir locally, the final prefix on S3."""
        name = step_dirname(step)
        return storage.join(self.root, name if storage.is_s3(self.root) else name + ".partial")

    def prepare(self, step: int) -> str:
        """Rank 0: clear a stale half-written staging dir; returns the staging url (call before a barrier)."""
        url = self.staging_url(step)
        if self.rank == 0:
            if storage.is_s3(url):
                for u in storage.list_prefix(url + "/"):
                    storage.delete(u)
            else:
                shutil.rmtree(storage.local_path(url), ignore_errors=True)
                storage.local_path(url).mkdir(parents=True)
        return url

    @staticmethod
    def write_tensors(url: str, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
        """One safetensors file, atomically."""
        storage.write_bytes(url, st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta or {}))

    @staticmethod
    def write_json(url: str, obj: Any) -> None:
        """One JSON file, atomically."""
        storage.write_text(url, json.dumps(obj, indent=1, sort_keys=True))

    def commit(self, step: int) -> str:
        """Rank 0, after every rank wrote its files: mark complete, rename, move ``latest``, prune."""
        staging = self.staging_url(step)
        storage.write_text(storage.join(staging, COMPLETE), "ok\n")
        final = storage.join(self.root, step_dirname(step))
        if not storage.is_s3(self.root):
            dst = storage.local_path(final)
            if dst.exists():  # a retake of the same step (e.g. after a rollback) replaces the old one
                shutil.rmtree(dst)
            storage.local_path(staging).rename(dst)
        storage.write_text(storage.join(self.root, "latest"), step_dirname(step) + "\n")
        self._prune()
        log.info("checkpoint %s written", final)
        return final

    def _prune(self) -> None:
        steps = self.complete_steps()
        for s in steps[:-self.keep_last] if self.keep_last > 0 else []:
            self._delete(storage.join(self.root, step_dirname(s)))

    def _delete(self, url: str) -> None:
        if storage.is_s3(url):
            for u in storage.list_prefix(url + "/"):
                storage.delete(u)
        else:
            shutil.rmtree(storage.local_path(url), ignore_errors=True)

    # -- finding ------------------------------------------------------------------------------
    def complete_steps(self) -> list[int]:
        """Steps of every complete checkpoint, ascending; half-written ones are ignored."""
        steps = set()
        for u in storage.list_prefix(self.root.rstrip("/") + "/") if storage.exists(self.root) or storage.is_s3(self.root) else []:
            rel = u[len(self.root.rstrip("/")) + 1:].split("/")
            if len(rel) == 2 and rel[1] == COMPLETE and _STEP_RE.match(rel[0]):
                steps.add(int(_STEP_RE.match(rel[0]).group(1)))
        return sorted(steps)

    def resolve(self, resume: str) -> str | None:
        """``none`` -> None; ``auto`` -> newest complete checkpoint or None; else the given dir (must be complete)."""
        if resume == "none":
            return None
        if resume != "auto":
            if not storage.exists(storage.join(resume, COMPLETE)):
                raise FileNotFoundError(f"not a complete checkpoint (no {COMPLETE} marker): {resume}")
            return resume
        latest = storage.join(self.root, "latest")
        if storage.exists(latest):
            name = storage.read_text(latest).strip()
            if storage.exists(storage.join(self.root, name, COMPLETE)):
                return storage.join(self.root, name)
            log.warning("'latest' points at incomplete %s; scanning for the newest complete checkpoint", name)
        steps = self.complete_steps()
        return storage.join(self.root, step_dirname(steps[-1])) if steps else None


def read_tensors(url: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file (local or S3) onto the CPU."""
    return st_load(storage.read_bytes(url))


def read_json(url: str) -> Any:
    """Load a JSON file (local or S3)."""
    return json.loads(storage.read_text(url))


def is_checkpoint_dir(url: str) -> bool:
    """True for a complete training checkpoint directory."""
    return storage.exists(storage.join(url, COMPLETE))


def local_dir(url: str) -> Path:
    """A local checkpoint directory as a Path."""
    return storage.local_path(url)
