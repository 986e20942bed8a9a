"""Tracking a run: ``metrics.jsonl`` and W&B, with secrets scrubbed (the run directory is ``tessera.run_dir``).

W&B goes offline by itself when no API key is configured; secrets never reach any file written here.

W&B, as its users expect it:
* one W&B run per run directory, with an id made once (``<run id>-<8 hex>``) and kept in ``run.json``: a resume
  continues it, a new directory never collides with another user's or a deleted run's (same ``run.id`` or not);
* W&B's own step (``_step``) only ever grows, across resumes and rollbacks, so no logged row is ever dropped;
  charts use ``samples`` as their x axis (``define_metric``), the unit the trainer counts progress in, and the
  optimizer step is logged as ``step``;
* a job derived from a checkpoint (eval, fine-tuning) joins its training run's project and ``group``, with its
  own ``job_type``; datasets, checkpoints and exports are artifacts by reference (``tessera.lineage``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import netrc
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from tessera import lineage
from tessera.config import to_dict
from tessera.run_dir import Run, RunConfig, new_run_id, new_wandb_id, run_wandb_id

__all__ = ["Run", "RunConfig", "Tracker", "TrackingConfig", "new_run_id", "new_wandb_id", "run_wandb_id", "scrub",
           "wandb_api_key_available"]

log = logging.getLogger("tessera.tracking")

# Environment variables whose values must never be persisted, and config keys that look like secrets.
SECRET_ENV = ("WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN")
_SECRET_KEY_RE = re.compile(r"(api_?key|secret|token|password|credential)", re.I)


@dataclass(kw_only=True)
class TrackingConfig:
    """Where metrics go: always ``metrics.jsonl``; W&B unless disabled."""

    project: str | None = "tessera"  # None: the project of the run the job's checkpoint comes from, else "tessera"
    entity: str | None = None
    # W&B group; None: a training run is its own group (its W&B id), and a job on a checkpoint (eval, fine-tuning)
    # joins the group of the run that wrote the checkpoint
    group: str | None = None
    job_type: str = "train"  # W&B job_type: train | finetune | eval | ...
    tags: list[str] = field(default_factory=list)
    name: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online iff an API key is set
    # W&B run id for a NEW run directory (None: ``<run id>-<8 hex>``, unique). A run directory keeps the id it was
    # made with (run.json), whatever this says later. ``tessera submit`` sets it so that it can print the W&B URL.
    id: str | None = None

    def __post_init__(self) -> None:
        if self.id is not None and (not self.id or lineage.slug(self.id, 64) != self.id):
            raise ValueError(f"tracking.id {self.id!r}: W&B run ids are up to 64 letters, digits, '_', '.', '-'")


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
    """Writes metrics to ``metrics.jsonl`` (rank 0) and W&B; continues the same W&B run on resume.

    ``source``: the checkpoint, run or export the job starts from (eval, fine-tuning): the W&B run joins the
    project and group of the run that wrote it."""

    def __init__(self, cfg: TrackingConfig, run: Run, config: Any = None, *, source: str | None = None) -> None:
        self.cfg, self.run = cfg, run
        self.enabled = run.rank == 0
        self._wandb = None
        self.wandb_dir: Path | None = None
        self.mode = self._resolve_mode()
        self._metrics_path = run.local_dir / "metrics.jsonl"
        self._step = -1  # the last W&B step (row) used; only ever grows
        self._row_open = False  # a row was started by this process, so media may join it
        self._samples: int | None = None  # the last samples count seen (the charts' x axis)
        self._finish_outputs: list[Callable[[], list[lineage.ArtifactRef]]] = []
        if self.enabled and self.mode != "disabled":
            self._init_wandb(config, source)

    def _resolve_mode(self) -> str:
        if self.cfg.mode != "auto":
            return self.cfg.mode
        if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
            return os.environ["WANDB_MODE"]
        return "online" if wandb_api_key_available() else "offline"

    def _identity(self, source: str | None) -> dict[str, Any]:
        """W&B id, project, entity, group and job type of this run; recorded in ``run.json``."""
        meta = self.run.meta
        if self.cfg.id and (not self.run.resumed or "wandb" not in meta):  # no W&B run opened here yet
            meta["wandb_id"] = self.cfg.id
        found = lineage.producing_run(source) if source else None
        # The producing run's W&B identity; a run that had W&B disabled still has its id (its group by default).
        origin = (found[1].get("wandb") or {"group": found[1]["wandb_id"]}) if found else {}
        if source and not found:
            log.info("W&B: no run.json found for %s: this run is not grouped with a training run", source)
        known = meta.get("wandb", {})  # a resumed run keeps where it logged first
        ident = {"id": meta["wandb_id"],
                 "project": known.get("project") or self.cfg.project or origin.get("project") or "tessera",
                 "entity": known.get("entity") or self.cfg.entity or origin.get("entity"),
                 "group": known.get("group") or self.cfg.group or origin.get("group")
                 or (meta["wandb_id"] if not source else None),
                 "job_type": self.cfg.job_type}
        self.run.update_meta(wandb=ident)
        return ident

    def _init_wandb(self, config: Any, source: str | None) -> None:
        import wandb

        cfg_dict = scrub(to_dict(config)) if dataclasses.is_dataclass(config) else scrub(config or {})
        ident = self._identity(source)
        self.wandb_dir = self.run.local_dir
        self._wandb = wandb.init(
            project=ident["project"], entity=ident["entity"], group=ident["group"], job_type=ident["job_type"],
            tags=self.cfg.tags or None, name=self.cfg.name or self.run.id, id=ident["id"], resume="allow",
            dir=str(self.wandb_dir), mode=self.mode, config=cfg_dict,
            # No code, no git diff, no console capture into W&B files: keeps secrets and noise out.
            settings=wandb.Settings(save_code=False, disable_git=True, console="off", silent=True,
                                    x_disable_stats=True),
        )
        # Progress is counted in samples (as the README and the trainer's schedules do): every chart's x axis.
        self._wandb.define_metric("samples")
        self._wandb.define_metric("*", step_metric="samples")
        last_step, self._samples = _last_logged(self._metrics_path)
        # W&B's step goes on after the last row of any earlier process: from metrics.jsonl, or from the server
        # for an online run resumed on a machine without the run directory's history.
        self._step = max(last_step, int(getattr(self._wandb, "step", 0) or 0) - 1)
        if source:
            self.use_artifact(lineage.model_input(source))
        log.info("W&B %s run %s (%s)", self.mode, self._wandb.id, self.run.local_dir / "wandb")

    def _row(self, step: int, samples: int | None, media: str | None = None) -> dict[str, Any]:
        """Start a W&B row: the next W&B step, recorded with the metrics.jsonl line that opens it."""
        self._step += 1
        self._row_open = True
        if samples is not None:
            self._samples = int(samples)
        row: dict[str, Any] = {"step": step}
        if self._samples is not None:
            row["samples"] = self._samples
        return row

    def log(self, metrics: dict[str, Any], step: int, samples: int | None = None) -> None:
        """Record scalar metrics at optimizer step ``step`` (rank 0 only); ``samples`` (or ``metrics['samples']``)
        places them on the charts' x axis, else the last samples count logged."""
        if not self.enabled:
            return
        rec = {"step": step, "time": round(time.time(), 3)}
        rec.update({k: _plain(v) for k, v in metrics.items()})
        row = None
        if self._wandb is not None:
            row = self._row(step, samples if samples is not None else metrics.get("samples"))
            rec["wandb_step"] = self._step
        self._append(rec)
        if row is not None:
            self._wandb.log({**metrics, **row}, step=self._step)

    def _append(self, rec: dict[str, Any]) -> None:
        with open(self._metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        self.run.note_lines(1)

    def _media_step(self, name: str, step: int) -> tuple[int, dict[str, Any]]:
        """The W&B step for images or a table: the row this process opened last, or a new one (recorded in
        metrics.jsonl) when there is none yet, so a resumed process never writes into an earlier process's row."""
        if self._row_open:
            return self._step, {}
        row = self._row(step, None)
        self._append({"step": step, "time": round(time.time(), 3), "wandb_step": self._step, "media": name})
        return self._step, row

    def log_images(self, name: str, images: list, captions: list[str], step: int) -> None:
        """Log PIL images with captions to W&B (rank 0 only)."""
        if self.enabled and self._wandb is not None:
            import wandb

            at, row = self._media_step(name, step)
            self._wandb.log({name: [wandb.Image(im, caption=c) for im, c in zip(images, captions)], **row}, step=at)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        """Log a W&B table; PIL images in cells become ``wandb.Image``."""
        if self.enabled and self._wandb is not None:
            import wandb
            from PIL import Image

            conv = [[wandb.Image(c) if isinstance(c, Image.Image) else c for c in r] for r in rows]
            at, row = self._media_step(name, step if step is not None else -1)
            self._wandb.log({name: wandb.Table(columns=columns, data=conv), **row}, step=at)

    # ------------------------------------------------------------------ artifacts (by reference)

    def _artifact(self, ref: lineage.ArtifactRef):
        """A W&B artifact by reference, or None (logged) when a local reference is gone."""
        import wandb

        art = wandb.Artifact(ref.name, type=ref.type, metadata=scrub(dict(ref.metadata)))
        # checksum=False: W&B records the URI and never hashes or uploads what is behind it (an s3:// URI is one
        # manifest line; a local directory is listed, its file names and sizes only).
        try:
            art.add_reference(ref.uri, name=ref.type, checksum=False)
        except ValueError as exc:  # a local path that no longer exists (a pruned checkpoint)
            log.warning("W&B: artifact %s not recorded: %s", ref.name, exc)
            return None
        return art

    def use_artifact(self, ref: lineage.ArtifactRef) -> None:
        """Declare a dataset, checkpoint or export (by reference) as an input of this run."""
        art = self._artifact(ref) if self._wandb is not None else None
        if art is None:
            return
        if self.mode != "offline":
            self._wandb.use_artifact(art, aliases=list(ref.aliases))
            return
        # W&B refuses use_artifact offline; what it does for a new artifact online is to log it with
        # use_after_commit, which `wandb sync` then commits and marks as used by this run. Same record, offline.
        log_used = getattr(self._wandb, "_log_artifact", None)
        if log_used is None:
            log.warning("W&B offline: this wandb version cannot record %s as an input; it is in the config only",
                        ref.name)
            self._wandb.config.update({f"inputs/{ref.name}": ref.uri}, allow_val_change=True)
            return
        log_used(art, aliases=list(ref.aliases), is_user_created=True, use_after_commit=True)

    def log_artifact(self, ref: lineage.ArtifactRef) -> None:
        """Record a checkpoint or export (by reference) as an output of this run."""
        art = self._artifact(ref) if self._wandb is not None else None
        if art is not None:
            self._wandb.log_artifact(art, aliases=list(ref.aliases))

    def outputs_at_finish(self, outputs: Callable[[], list[lineage.ArtifactRef]]) -> None:
        """Log ``outputs()`` as this run's artifacts when it finishes (e.g. the checkpoints committed by then)."""
        self._finish_outputs.append(outputs)

    def sync_command(self) -> str | None:
        """The ``wandb sync`` command that uploads an offline run (every process's part, oldest first), or None."""
        if self.mode != "offline" or self.wandb_dir is None:
            return None
        pattern = f"offline-run-*-{self.run.meta['wandb_id']}"
        runs = sorted((self.wandb_dir / "wandb").glob(pattern))
        return "wandb sync " + " ".join(str(r) for r in runs or [self.wandb_dir / "wandb" / pattern])

    def finish(self) -> None:
        """Log the outputs, close W&B, print how to upload an offline run, sync an S3 run directory."""
        if self._wandb is not None:
            for outputs in self._finish_outputs:
                try:
                    refs = outputs()
                except Exception:  # a listing failure must not lose the run's metrics; it is logged
                    log.exception("W&B: could not list this run's output artifacts")
                    refs = []
                for ref in refs:
                    self.log_artifact(ref)
            self._wandb.finish()
            self._wandb = None
            cmd = self.sync_command()
            if cmd:
                print(f"W&B offline run written; upload it with:\n  {cmd}")
        if self.enabled:
            self.run.sync()


def _last_logged(path: Path) -> tuple[int, int | None]:
    """(last W&B step, last samples count) in a metrics.jsonl, or (-1, None); lines of runs logged before W&B
    steps were recorded count one step each."""
    if not path.exists():
        return -1, None
    last, samples = -1, None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a half-written last line of a killed process
        last = max(last, int(rec.get("wandb_step", n)))
        samples = rec.get("samples", samples)
    return last, samples


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        try:
            return v.item()
        except (ValueError, RuntimeError):
            return str(v)
    return v
