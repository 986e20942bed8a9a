"""A run directory (local or S3): ``run.json`` (ids), ``config.yaml``, ``metrics.jsonl`` and ``logs/``.

When the run root is ``s3://``, files are written to a local mirror (W&B and file logging need a local directory
anyway). A background thread uploads the growing files (``metrics.jsonl`` on rank 0, ``logs/rank<R>.log``) every
``RunConfig.sync_every_lines`` metric lines or ``sync_every_minutes``, whichever comes first, so a ``kill -9``
loses at most that window; ``Run.sync()`` and ``Run.close()`` upload the whole mirror (W&B's own files excepted).
Every upload is an atomic PUT. A run resumed on a machine without its mirror fetches ``metrics.jsonl`` first.

``run.json`` also keeps the run's W&B id, made once per directory (``tessera.tracking`` explains why).
"""

from __future__ import annotations

import json
import logging
import os
import secrets as _secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera import lineage, storage
from tessera.config import dump_yaml

log = logging.getLogger("tessera.tracking")


@dataclass(kw_only=True)
class RunConfig:
    """Run identity and location, and how often an S3 run uploads its metrics and logs."""

    root: str = "runs"  # local directory or s3://bucket/prefix
    id: str | None = None  # None: a new id; set it to continue a run (same dir, same W&B run)
    local_mirror: str | None = None  # local working dir for S3 runs; default ~/.cache/tessera/runs/<id>
    # S3 runs: upload metrics.jsonl and the logs after this many metric lines (0: no line trigger) ...
    sync_every_lines: int = 100
    # ... and at least this often while they change (0: no timer). A kill -9 loses at most this window.
    sync_every_minutes: float = 2.0

    def __post_init__(self) -> None:
        if self.sync_every_lines < 0:
            raise ValueError(f"run.sync_every_lines must be >= 0, got {self.sync_every_lines}")
        if self.sync_every_minutes < 0:
            raise ValueError(f"run.sync_every_minutes must be >= 0, got {self.sync_every_minutes}")


def new_run_id(prefix: str = "") -> str:
    """Sortable, unique run id: ``YYYYmmdd-HHMMSS-<6 hex>``."""
    return f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}-{_secrets.token_hex(3)}"


def new_wandb_id(run_id: str) -> str:
    """A W&B run id that no other run directory has: the run id (made W&B-safe) and 8 random hex digits.

    The run id alone is not enough: shipped configs name fixed runs (``tiny_dit``), and a deleted run directory
    may be made again under the same name; W&B would append both to one run."""
    return f"{lineage.slug(run_id)}-{_secrets.token_hex(4)}"


def run_wandb_id(run_root: str, run_id: str) -> tuple[str, bool]:
    """(W&B id, new) of the run ``run_root/run_id``: the id its ``run.json`` keeps, or a fresh one (``new``) that
    a caller passes on as ``tracking.id`` (``tessera submit`` fixes a job's W&B run at submit time this way)."""
    meta = lineage.read_run_meta(storage.join(run_root, run_id))
    if meta and meta.get("wandb_id"):
        return str(meta["wandb_id"]), False
    return new_wandb_id(run_id), True


class Run:
    """A run directory (local or S3) with a local working mirror."""

    def __init__(self, cfg: RunConfig, rank: int = 0) -> None:
        self.id = cfg.id or new_run_id()
        self.rank = rank
        self.url = storage.join(cfg.root, self.id)
        if storage.is_s3(self.url):
            mirror = cfg.local_mirror or os.path.join(Path.home(), ".cache", "tessera", "runs", self.id)
            self.local_dir = Path(mirror)
        else:
            self.local_dir = Path(self.url)
        (self.local_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.resumed = self._load_or_create_meta()
        self._file_handler: logging.Handler | None = None
        self._upload_lock = threading.Lock()  # one upload at a time: an older snapshot never lands last
        self._uploaded: dict[str, int] = {}  # bytes of each live file already on S3
        if self.resumed and rank == 0 and storage.is_s3(self.url):
            self._fetch_metrics()
        self.sync_failures = 0
        self._syncer = _Syncer(self, cfg.sync_every_lines, cfg.sync_every_minutes) if storage.is_s3(self.url) \
            else None

    def _load_or_create_meta(self) -> bool:
        meta_url = storage.join(self.url, "run.json")
        if storage.exists(meta_url):
            self.meta = json.loads(storage.read_text(meta_url))
            return True
        self.meta = {"id": self.id, "wandb_id": new_wandb_id(self.id), "created": time.time()}
        if self.rank == 0:
            self.write_text("run.json", json.dumps(self.meta, indent=2))
        return False

    def _fetch_metrics(self) -> None:
        """A resumed S3 run on a machine without its mirror: fetch ``metrics.jsonl`` first, so the next upload of
        the growing file carries the earlier lines too (and W&B's step goes on from the last one logged)."""
        local = self.local_dir / "metrics.jsonl"
        remote = self.path("metrics.jsonl")
        if not local.exists() and storage.exists(remote):
            data = storage.read_bytes(remote)
            local.write_bytes(data)
            self._uploaded["metrics.jsonl"] = len(data)

    def update_meta(self, **fields: Any) -> None:
        """Add fields to ``run.json`` (rank 0 writes it)."""
        self.meta.update(fields)
        if self.rank == 0:
            self.write_text("run.json", json.dumps(self.meta, indent=2))

    def path(self, *parts: str) -> str:
        """URL of a file inside the run directory."""
        return storage.join(self.url, *parts)

    def write_text(self, name: str, text: str) -> None:
        """Write a small file into the run directory atomically (and into the local mirror for S3 runs)."""
        if storage.is_s3(self.url):
            (self.local_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (self.local_dir / name).write_text(text)
        storage.write_text(self.path(name), text)

    def write_config(self, cfg: Any) -> str:
        """Write the resolved config as ``config.yaml`` (headed by its content hash); returns the hash."""
        text = dump_yaml(cfg)
        if self.rank == 0:
            self.write_text("config.yaml", text)
        return text.split("\n", 1)[0].split(": ", 1)[1]

    def attach_file_logging(self) -> None:
        """Mirror this process's log records into ``logs/rank<R>.log``."""
        if self._file_handler is not None:
            return
        h = logging.FileHandler(self.local_dir / "logs" / f"rank{self.rank}.log")
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(h)
        self._file_handler = h

    def note_lines(self, n: int = 1) -> None:
        """Count ``n`` new metric lines; an S3 run uploads its live files every ``sync_every_lines``."""
        if self._syncer is not None:
            self._syncer.note(n)

    def live_files(self) -> list[str]:
        """Mirror-relative names of the files this rank appends to during the run."""
        return (["metrics.jsonl"] if self.rank == 0 else []) + [f"logs/rank{self.rank}.log"]

    def sync_live(self) -> None:
        """Upload the live files that grew since their last upload (complete lines only); failures are counted."""
        with self._upload_lock:
            for name in self.live_files():
                path = self.local_dir / name
                if not path.exists() or path.stat().st_size == self._uploaded.get(name):
                    continue
                data = path.read_bytes()
                data = data[: data.rfind(b"\n") + 1]  # the last line may be half-appended right now
                try:
                    storage.write_bytes(self.path(name), data)
                except OSError as exc:  # the next cadence retries; a failed upload never stops training
                    self.sync_failures += 1
                    log.warning("could not upload %s (%d failed uploads so far): %s", name, self.sync_failures, exc)
                    continue
                self._uploaded[name] = len(data)

    def sync(self) -> None:
        """Upload the whole local mirror (W&B's files excepted) to an S3 run directory."""
        if not storage.is_s3(self.url):
            return
        with self._upload_lock:
            for p in sorted(self.local_dir.rglob("*")):
                if p.is_file() and "wandb" not in p.relative_to(self.local_dir).parts[:1]:
                    storage.write_bytes(self.path(str(p.relative_to(self.local_dir))), p.read_bytes())

    def close(self) -> None:
        """Detach file logging, stop the background uploads and sync everything."""
        if self._file_handler is not None:
            logging.getLogger().removeHandler(self._file_handler)
            self._file_handler.close()
            self._file_handler = None
        if self._syncer is not None:
            self._syncer.stop()
            self._syncer = None
        self.sync()


class _Syncer:
    """Calls ``run.sync_live()`` on a daemon thread every N noted lines or M minutes, off the training step."""

    def __init__(self, run: Run, every_lines: int, every_minutes: float) -> None:
        self._run, self._every_lines = run, every_lines
        self._period = every_minutes * 60 if every_minutes > 0 else None  # None: wait for line triggers only
        self._pending = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"tessera-run-sync-rank{run.rank}", daemon=True)
        self._thread.start()

    def note(self, lines: int) -> None:
        """Count new lines; wake the uploader once ``every_lines`` have accumulated."""
        with self._lock:
            self._pending += lines
            if self._every_lines and self._pending >= self._every_lines:
                self._pending = 0
                self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self._period)
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._run.sync_live()
            except Exception:  # counted and logged; the thread must outlive any one bad upload
                self._run.sync_failures += 1
                log.exception("background upload of run %s failed", self._run.id)

    def stop(self) -> None:
        """Finish the upload in flight, then end the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
