"""Checkpoints on disk or S3: safetensors + JSON, atomic directories, a ``latest`` pointer, keep-last-K, and a
background writer.

Layout of ``<root>/step_000000123/``::

    model.safetensors      full fp32 master weights (gathered on rank 0 from the ZeRO slices)
    optimizer.safetensors  Adam moments per parameter: exp_avg/<name>, exp_avg_sq/<name>
    ema.safetensors        EMA weights
    trainer_state.json     counters, Adam's step, world size, ZeRO stage, config hash
    loader/rank<R>.json    each rank's data-loader state
    rng/rank<R>.json       python / numpy / torch / cuda RNG states of each rank
    config.yaml            the resolved config
    COMPLETE               written last: a directory without it is ignored

Why our own format instead of ``engine.save_checkpoint``: DeepSpeed's files are pickles loaded with
``weights_only=False``, and they are tied to the world size. Full fp32 tensors in safetensors load onto ANY
world size and ZeRO stage (each rank reads just its slices), and nothing is ever unpickled.

Rank 0 writes the whole directory on a background thread (``AsyncWriter``): the training loop is blocked only
while the state is gathered and copied to host memory; the files, fsyncs, the ``COMPLETE`` marker, the rename
and ``latest`` follow while training goes on, and the next save first waits for the previous one.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from tessera import storage

log = logging.getLogger("tessera.checkpoint")

COMPLETE = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d{9})$")


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


# --------------------------------------------------------------------------- files


def write_tensors(url: str, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    """One safetensors file, fsynced; streamed from a local temp file to S3 (no second copy in memory)."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if not storage.is_s3(url):
        path = storage.local_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)  # e.g. a fine-tuning checkpoint's lora/ folder
        save_file(tensors, str(path), metadata=meta or {})
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.safetensors"
        save_file(tensors, str(path), metadata=meta or {})
        with open(path, "rb") as src, storage.atomic_write(url) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)


def write_json(url: str, obj: Any) -> None:
    """One JSON file, atomically."""
    storage.write_text(url, json.dumps(obj, indent=1, sort_keys=True))


def read_tensors(url: str) -> dict[str, torch.Tensor]:
    """Load a whole safetensors file (local or S3) onto the CPU."""
    return st_load(storage.read_bytes(url))


def read_json(url: str) -> Any:
    """Load a JSON file (local or S3)."""
    return json.loads(storage.read_text(url))


class TensorFile:
    """Tensors of one safetensors file read one at a time by name (an S3 object is copied to a temp file
    first), so a rank restoring its slices never holds the whole file in memory."""

    def __init__(self, url: str) -> None:
        self._tmp = None
        if storage.is_s3(url):
            self._tmp = tempfile.NamedTemporaryFile(suffix=".safetensors")
            with storage.open_read(url) as src:
                shutil.copyfileobj(src, self._tmp, 8 << 20)
            self._tmp.flush()
            path = self._tmp.name
        else:
            path = str(storage.local_path(url))
        self._f = safe_open(path, framework="pt", device="cpu")
        self.url = url
        self.names = set(self._f.keys())

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``; KeyError naming the file when absent."""
        if name not in self.names:
            raise KeyError(f"{self.url} has no tensor {name!r}")
        return self._f.get_tensor(name)

    def maybe(self, name: str) -> torch.Tensor | None:
        """The tensor ``name``, or None when absent."""
        return self._f.get_tensor(name) if name in self.names else None

    def close(self) -> None:
        """Release the file (and the temp copy of an S3 object)."""
        self._f = None
        if self._tmp is not None:
            self._tmp.close()


def is_checkpoint_dir(url: str) -> bool:
    """True for a complete training checkpoint directory."""
    return storage.exists(storage.join(url, COMPLETE))


def step_dirname(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step_{step:09d}"


# --------------------------------------------------------------------------- directories


class CheckpointManager:
    """Writes and finds checkpoints under a local or ``s3://`` root."""

    write_tensors = staticmethod(write_tensors)  # the file writers, for code that assembles a checkpoint by hand
    write_json = staticmethod(write_json)

    def __init__(self, root: str, keep_last: int = 3) -> None:
        self.root, self.keep_last = root, keep_last

    def staging_url(self, step: int) -> str:
        """Where a checkpoint is assembled: a ``.partial`` dir locally, the final prefix on S3 (whose
        ``COMPLETE`` marker is written last)."""
        name = step_dirname(step)
        return storage.join(self.root, name if storage.is_s3(self.root) else name + ".partial")

    def prepare(self, step: int) -> str:
        """Clear a stale half-written staging dir of ``step``; returns the staging url."""
        url = self.staging_url(step)
        if storage.is_s3(url):
            for u in storage.list_prefix(url + "/"):
                storage.delete(u)
        else:
            shutil.rmtree(storage.local_path(url), ignore_errors=True)
            storage.local_path(url).mkdir(parents=True)
        return url

    def commit(self, step: int) -> str:
        """After every file of ``step`` is written: mark complete, rename, move ``latest``, prune."""
        staging = self.staging_url(step)
        storage.write_text(storage.join(staging, COMPLETE), "ok\n")
        final = storage.join(self.root, step_dirname(step))
        if not storage.is_s3(self.root):
            dst = storage.local_path(final)
            if dst.exists():  # a retake of the same step (e.g. after a rollback) replaces the old one
                shutil.rmtree(dst)
            storage.local_path(staging).rename(dst)
            _fsync_dir(dst.parent)
        storage.write_text(storage.join(self.root, "latest"), step_dirname(step) + "\n")
        self._prune()
        log.info("checkpoint %s written", final)
        return final

    def _prune(self) -> None:
        steps = self.complete_steps()
        for s in steps[:-self.keep_last] if self.keep_last > 0 else []:
            url = storage.join(self.root, step_dirname(s))
            if storage.is_s3(url):
                for u in storage.list_prefix(url + "/"):
                    storage.delete(u)
            else:
                shutil.rmtree(storage.local_path(url), ignore_errors=True)

    def complete_steps(self) -> list[int]:
        """Steps of every complete checkpoint, ascending; half-written ones are ignored."""
        if not storage.is_s3(self.root) and not storage.exists(self.root):
            return []
        steps = set()
        for u in storage.list_prefix(self.root.rstrip("/") + "/"):
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AsyncWriter:
    """One background write at a time: ``submit`` waits for the previous write (re-raising its error), then
    runs ``job`` on a new thread; ``wait`` blocks until the last write is done."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_step: int | None = None

    def submit(self, step: int, job: Callable[[], None]) -> None:
        """Start writing checkpoint ``step`` in the background."""
        self.wait()

        def run() -> None:
            try:
                job()
            except BaseException as e:  # re-raised in the training thread by the next submit/wait
                self._error = e

        self._thread = threading.Thread(target=run, name=f"checkpoint-{step}", daemon=False)
        self._thread.start()
        self.last_step = step

    def wait(self) -> None:
        """Block until the pending write is committed; raise if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"writing checkpoint step {self.last_step} failed: {err}") from err
