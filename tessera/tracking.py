"""Runs and tracking: a run id and directory (local or S3), ``metrics.jsonl``, logs and W&B.

A run directory holds ``run.json`` (ids), ``config.yaml`` (resolved, with its hash), ``metrics.jsonl``
and ``logs/``. When the run root is ``s3://``, files are written to a local mirror and uploaded
atomically on ``flush()``/``finish()``: W&B and file logging need a local directory anyway.
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
    """Run identity and location."""

    root: str = "runs"  # local directory or s3://bucket/prefix
    id: str | None = None  # None: a new id; set it to continue a run (same dir, same W&B run)
    local_mirror: str | None = None  # local working dir for S3 runs; default ~/.cache/tessera/runs/<id>


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

    def sync(self) -> None:
        """Upload the local mirror's logs and metrics to an S3 run directory."""
        if not storage.is_s3(self.url):
            return
        for p in sorted(self.local_dir.rglob("*")):
            if p.is_file() and "wandb" not in p.relative_to(self.local_dir).parts[:1]:
                storage.write_bytes(self.path(str(p.relative_to(self.local_dir))), p.read_bytes())

    def close(self) -> None:
        """Detach file logging and sync."""
        if self._file_handler is not None:
            logging.getLogger().removeHandler(self._file_handler)
            self._file_handler.close()
            self._file_handler = None
        self.sync()


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
