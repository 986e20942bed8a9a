"""Runs and tracking: a run id and directory (local or S3), ``metrics.jsonl``, logs and W&B.

A run directory holds ``run.json`` (ids), ``config.yaml`` (resolved, with its hash), ``metrics.jsonl``
and ``logs/``. When the run root is ``s3://``, files are written to a local mirror (W&B and file logging
need a local directory anyway). A background thread uploads the growing files (``metrics.jsonl`` on rank 0,
``logs/rank<R>.log``) every ``RunConfig.sync_every_lines`` metric lines or ``sync_every_minutes``, whichever
comes first, so a ``kill -9`` loses at most that window; ``Run.sync()``, ``Tracker.finish()`` and
``Run.close()`` upload the whole mirror (W&B's own files excepted). Every upload is an atomic PUT.
W&B goes offline by itself when no API key is configured; secrets never reach any of these files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import netrc
import os
import re
import secrets as _secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tessera import storage
from tessera.config import dump_yaml, to_dict

log = logging.getLogger("tessera.tracking")

# Environment variables whose values must never be persisted, and config keys that look like secrets.
SECRET_ENV = ("WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN")
_SECRET_KEY_RE = re.compile(r"(api_?key|secret|token|password|credential)", re.I)


@dataclass(kw_only=True)
class TrackingConfig:
    """Where metrics go: always ``metrics.jsonl``; W&B unless disabled."""

    project: str = "tessera"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    name: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online iff an API key is set


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


def scrub(obj: Any) -> Any:
    """Copy of a config mapping with secret-looking keys and known secret values redacted."""
    values = {v for k in SECRET_ENV if (v := os.environ.get(k))}
    if isinstance(obj, dict):
        return {k: ("<redacted>" if _SECRET_KEY_RE.search(str(k)) else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    if isinstance(obj, str) and any(v in obj for v in values):
        return "<redacted>"
    return obj


def new_run_id(prefix: str = "") -> str:
    """Sortable, unique run id: ``YYYYmmdd-HHMMSS-<6 hex>``."""
    return f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}-{_secrets.token_hex(3)}"


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
        self.sync_failures = 0
        self._syncer = _Syncer(self, cfg.sync_every_lines, cfg.sync_every_minutes) if storage.is_s3(self.url) \
            else None

    def _load_or_create_meta(self) -> bool:
        meta_url = storage.join(self.url, "run.json")
        if storage.exists(meta_url):
            self.meta = json.loads(storage.read_text(meta_url))
            return True
        self.meta = {"id": self.id, "wandb_id": self.id.replace("/", "-"), "created": time.time()}
        if self.rank == 0:
            self.write_text("run.json", json.dumps(self.meta, indent=2))
        return False

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


def wandb_api_key_available() -> bool:
    """True when W&B could authenticate: ``WANDB_API_KEY`` or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class Tracker:
    """Writes metrics to ``metrics.jsonl`` (rank 0) and W&B; continues the same W&B run on resume."""

    def __init__(self, cfg: TrackingConfig, run: Run, config: Any = None) -> None:
        self.cfg, self.run = cfg, run
        self.enabled = run.rank == 0
        self._wandb = None
        self.wandb_dir: Path | None = None
        self.mode = self._resolve_mode()
        self._metrics_path = run.local_dir / "metrics.jsonl"
        if self.enabled and self.mode != "disabled":
            self._init_wandb(config)

    def _resolve_mode(self) -> str:
        if self.cfg.mode != "auto":
            return self.cfg.mode
        if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
            return os.environ["WANDB_MODE"]
        return "online" if wandb_api_key_available() else "offline"

    def _init_wandb(self, config: Any) -> None:
        import wandb

        cfg_dict = scrub(to_dict(config)) if dataclasses.is_dataclass(config) else scrub(config or {})
        self.wandb_dir = self.run.local_dir
        self._wandb = wandb.init(
            project=self.cfg.project, entity=self.cfg.entity, group=self.cfg.group, tags=self.cfg.tags or None,
            name=self.cfg.name or self.run.id, id=self.run.meta["wandb_id"], resume="allow", dir=str(self.wandb_dir),
            mode=self.mode, config=cfg_dict,
            # No code, no git diff, no console capture into W&B files: keeps secrets and noise out.
            settings=wandb.Settings(save_code=False, disable_git=True, console="off", silent=True,
                                    x_disable_stats=True),
        )
        log.info("W&B %s run %s (%s)", self.mode, self._wandb.id, self.run.local_dir / "wandb")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record scalar metrics at ``step`` (rank 0 only)."""
        if not self.enabled:
            return
        rec = {"step": step, "time": round(time.time(), 3)}
        rec.update({k: _plain(v) for k, v in metrics.items()})
        with open(self._metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        self.run.note_lines(1)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_images(self, name: str, images: list, captions: list[str], step: int) -> None:
        """Log PIL images with captions to W&B (rank 0 only)."""
        if self.enabled and self._wandb is not None:
            import wandb

            self._wandb.log({name: [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        """Log a W&B table; PIL images in cells become ``wandb.Image``."""
        if self.enabled and self._wandb is not None:
            import wandb
            from PIL import Image

            conv = [[wandb.Image(c) if isinstance(c, Image.Image) else c for c in r] for r in rows]
            self._wandb.log({name: wandb.Table(columns=columns, data=conv)}, step=step)

    def sync_command(self) -> str | None:
        """The ``wandb sync`` command that uploads an offline run, or None."""
        if self.mode != "offline" or self.wandb_dir is None:
            return None
        runs = sorted((self.wandb_dir / "wandb").glob(f"offline-run-*-{self.run.meta['wandb_id']}"))
        target = runs[-1] if runs else self.wandb_dir / "wandb" / f"offline-run-*-{self.run.meta['wandb_id']}"
        return f"wandb sync {target}"

    def finish(self) -> None:
        """Close W&B, print how to upload an offline run, sync an S3 run directory."""
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
            cmd = self.sync_command()
            if cmd:
                print(f"W&B offline run written; upload it with:\n  {cmd}")
        if self.enabled:
            self.run.sync()


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        try:
            return v.item()
        except (ValueError, RuntimeError):
            return str(v)
    return v
