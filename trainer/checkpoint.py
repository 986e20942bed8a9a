"""Checkpoint directories on disk or S3: atomic commits, a ``latest`` pointer, keep-last-K, a background writer
per rank, and the small files (JSON, RNG states) every checkpoint holds.

Layout of ``<root>/step_000000123/`` (``docs/checkpoints.md``)::

    shards/rank<R>.safetensors  each rank's slices of weights, Adam moments and EMA (``trainer/shards.py``)
    loader/rank<R>.json         each rank's data-loader state
    rng/rank<R>.json            each rank's python / numpy / torch / cuda RNG states
    config.yaml                 the resolved config (rank 0)
    index.json                  every shard's tensors, element ranges and byte offsets (rank 0, at commit)
    trainer_state.json          counters, Adam's step, world size, ZeRO stage, how long the save took (rank 0)
    COMPLETE                    written last, by rank 0, once every rank has reported its files written

Every rank writes its own files on its own background thread (``AsyncWriter``); rank 0 writes the metadata and
``COMPLETE`` only after all ranks reported success (``train_state.Checkpointer``). A directory without
``COMPLETE`` is never read, and pruning removes it. Locally a checkpoint is assembled in ``step_X.partial`` and
renamed after ``COMPLETE``; S3 has no rename, so there ``COMPLETE`` is the last object written under the prefix.
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
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
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


def write_files(root: str, files: dict[str, Any], meta: dict[str, str] | None = None) -> None:
    """Files under ``root`` from ``{relative name: text or tensors}`` (tensors as safetensors with ``meta``): a
    LoRA checkpoint's extra files, an export's adapter folder."""
    for name, content in files.items():
        if isinstance(content, str):
            storage.write_text(storage.join(root, name), content)
        else:
            write_tensors(storage.join(root, name), content, meta)


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
        """Clear a stale half-written staging dir of ``step`` (on S3 also a complete one being retaken, marker
        first); returns the staging url."""
        url = self.staging_url(step)
        if storage.is_s3(url):
            _delete_prefix(url)
        else:
            shutil.rmtree(storage.local_path(url), ignore_errors=True)
            storage.local_path(url).mkdir(parents=True)
        return url

    def commit(self, step: int) -> str:
        """After every file of ``step`` is written (every rank's, and the metadata): ``COMPLETE``, the rename,
        ``latest``, and pruning."""
        staging = self.staging_url(step)
        storage.write_text(storage.join(staging, COMPLETE), "ok\n")  # last: only this makes the dir count
        final = storage.join(self.root, step_dirname(step))
        if not storage.is_s3(self.root):
            dst = storage.local_path(final)
            if dst.exists():  # a retake of the same step (e.g. after a rollback) replaces the old one
                _remove_local(dst)
            storage.local_path(staging).rename(dst)
            _fsync_dir(dst.parent)
        storage.write_text(storage.join(self.root, "latest"), step_dirname(step) + "\n")
        self._prune(step)
        log.info("checkpoint %s written", final)
        return final

    def _prune(self, committed: int) -> None:
        """Drop complete checkpoints beyond ``keep_last`` and any incomplete one older than ``committed`` (a save
        killed half-way: never read, and no save of that step is in flight any more)."""
        complete, seen = self._scan()
        drop = set(complete[:-self.keep_last] if self.keep_last > 0 else [])
        drop |= {s for s in seen if s < committed and s not in complete}
        for s in sorted(drop):
            name = step_dirname(s)
            if storage.is_s3(self.root):
                _delete_prefix(storage.join(self.root, name))
            else:
                for d in (name, name + ".partial"):
                    _remove_local(storage.local_path(storage.join(self.root, d)))

    def _scan(self) -> tuple[list[int], set[int]]:
        """(steps of complete checkpoints ascending, steps of every checkpoint dir or prefix, complete or not)."""
        if not storage.is_s3(self.root) and not storage.exists(self.root):
            return [], set()
        complete, seen = set(), set()
        for u in storage.list_prefix(self.root.rstrip("/") + "/"):
            rel = u[len(self.root.rstrip("/")) + 1:].split("/")
            m = _STEP_RE.match(rel[0].removesuffix(".partial")) if len(rel) >= 2 else None
            if m:
                seen.add(int(m.group(1)))
                if len(rel) == 2 and rel[1] == COMPLETE and not rel[0].endswith(".partial"):
                    complete.add(int(m.group(1)))
        return sorted(complete), seen

    def complete_steps(self) -> list[int]:
        """Steps of every complete checkpoint, ascending; half-written ones are ignored."""
        return self._scan()[0]

    def resolve(self, resume: str) -> str | None:
        """``none`` -> None; ``auto`` -> newest complete checkpoint or None; else the given dir (must be complete)."""
        if resume == "none":
            return None
        if resume != "auto":
            if not is_checkpoint_dir(resume):
                raise FileNotFoundError(f"not a complete checkpoint (no {COMPLETE} marker): {resume}")
            return resume
        latest = storage.join(self.root, "latest")
        if storage.exists(latest):
            name = storage.read_text(latest).strip()
            if is_checkpoint_dir(storage.join(self.root, name)):
                return storage.join(self.root, name)
            log.warning("'latest' points at incomplete %s; scanning for the newest complete checkpoint", name)
        steps = self.complete_steps()
        return storage.join(self.root, step_dirname(steps[-1])) if steps else None


def _delete_prefix(url: str) -> None:
    """Delete every object under an S3 prefix, its ``COMPLETE`` marker first (it never marks a partial set)."""
    marker = storage.join(url, COMPLETE)
    storage.delete(marker)
    for u in storage.list_prefix(url + "/"):
        storage.delete(u)


def _remove_local(path: Path) -> None:
    """Remove a checkpoint dir, its ``COMPLETE`` marker first (a crash half-way leaves it incomplete)."""
    (path / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AsyncWriter:
    """This rank's background write: one job at a time on its own thread. ``code()`` is the state the ranks
    exchange in the step's all-reduce: 0 while running (or before any job), -1 after a failure, 1 + the job's
    seconds once done. The thread is a daemon: a rank that fails stops without waiting for a write that can no
    longer be committed."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._code, self.error = 0.0, None
        self.last_step: int | None = None

    def submit(self, step: int, job: Callable[[], None]) -> None:
        """Run ``job`` (writing checkpoint ``step``) in the background, after the previous job has ended."""
        self.join()
        self._code, self.error, self.last_step = 0.0, None, step

        def run() -> None:
            t0 = time.perf_counter()
            try:
                job()
            except BaseException as e:  # reported through code(); the loop raises it on every rank
                log.exception("writing checkpoint step %d failed", step)
                self.error, self._code = f"{type(e).__name__}: {e}", -1.0
                return
            self._code = 1.0 + time.perf_counter() - t0

        self._thread = threading.Thread(target=run, name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def code(self) -> float:
        """0 running or idle, -1 failed, 1 + seconds when done."""
        return self._code

    def join(self) -> None:
        """Block until the current job has ended (successfully or not)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self) -> None:
        """Block until the current job has ended; raise if it failed (a one-process caller's check)."""
        self.join()
        if self.error is not None:
            err, self.error = self.error, None
            raise RuntimeError(f"writing checkpoint step {self.last_step} failed: {err}")
