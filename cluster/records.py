"""The job record: one JSON file per submitted job, so ``tessera jobs`` works without Slurm accounting.

``<state_dir>/<job id>/`` holds ``record.json`` (written by the submitter and ``tessera jobs``), the staged
``config.yaml``, the rendered artefacts, ``logs/`` and, for Slurm, ``events.jsonl``: one line per attempt
start and end, appended by the batch script itself on the compute node.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tessera.config import ConfigError

# WRITTEN: Kubernetes manifests written but not applied (no kubectl, or cluster.k8s.apply=never).
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "WRITTEN")
RECORD = "record.json"
EVENTS = "events.jsonl"
CANCEL_MARKER = "CANCELLED"


@dataclass(kw_only=True)
class Attempt:
    """One run of the job: a Slurm (re)start or a Ray submission."""

    n: int
    backend_id: str
    start: float | None = None
    end: float | None = None
    exit_code: int | None = None
    action: str | None = None  # done | fail | requeue-preempted | requeue-crash | cancelled
    log: str | None = None
    task: str | None = None  # Slurm array task index


@dataclass(kw_only=True)
class JobRecord:
    """What was submitted, where it runs, and what happened to it."""

    id: str
    backend: str
    stage: str
    created: float = field(default_factory=time.time)
    backend_id: str | None = None
    endpoint: str | None = None  # Ray: the Jobs API address; Kubernetes: the namespace
    state: str = "SUBMITTED"
    reason: str | None = None
    run_id: str | None = None
    wandb: dict[str, Any] | None = None
    job_dir: str = ""
    log_dir: str = ""
    config: str = ""
    artefacts: list[str] = field(default_factory=list)
    after: str | None = None
    array: int | None = None
    retry: dict[str, int] = field(default_factory=dict)
    cancelled: bool = False
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def final(self) -> bool:
        """True once the job will not run again."""
        return self.state in FINAL_STATES

    def to_json(self) -> str:
        """The record as indented JSON."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> "JobRecord":
        """Parse a record written by ``to_json``."""
        try:
            data = json.loads(text)
            data["attempts"] = [Attempt(**a) for a in data.get("attempts", [])]
            return cls(**data)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{source}: not a tessera job record ({e})") from None


class JobStore:
    """Job records under one state directory (private to the user: 0700 directories, 0600 files)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def job_dir(self, job_id: str) -> Path:
        """``<root>/<job id>``."""
        return self.root / job_id

    def create(self, record: JobRecord, files: dict[str, str]) -> Path:
        """Make the job directory, write ``files`` (name -> text) and the record; returns the directory."""
        d = self.job_dir(record.id)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        d.mkdir(mode=0o700)
        (d / "logs").mkdir(mode=0o700)
        for name, text in files.items():
            _write_private(d / name, text)
        self.save(record)
        return d

    def save(self, record: JobRecord) -> None:
        """Write ``record.json`` atomically."""
        _write_private(self.job_dir(record.id) / RECORD, record.to_json())

    def load(self, job_id: str) -> JobRecord:
        """The record of ``job_id``."""
        path = self.job_dir(job_id) / RECORD
        return JobRecord.from_json(path.read_text(encoding="utf-8"), str(path))

    def all(self) -> list[JobRecord]:
        """Every record, oldest first."""
        if not self.root.is_dir():
            return []
        recs = [self.load(p.parent.name) for p in self.root.glob(f"*/{RECORD}")]
        return sorted(recs, key=lambda r: r.created)

    def find(self, ref: str) -> JobRecord:
        """A record by tessera id, backend id (``12345``, a Ray submission id) or a unique id prefix."""
        if (self.job_dir(ref) / RECORD).is_file():
            return self.load(ref)
        recs = self.all()
        hits = [r for r in recs if r.backend_id == ref or any(a.backend_id == ref for a in r.attempts)]
        hits = hits or [r for r in recs if r.id.startswith(ref)]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise ConfigError(f"no job {ref!r} in {self.root} (tessera jobs ls lists them)")
        raise ConfigError(f"job {ref!r} is ambiguous: {', '.join(r.id for r in hits)}")

    def events(self, job_id: str) -> tuple[list[dict], int]:
        """The batch script's event lines and the number of unreadable lines (a line cut by a crash)."""
        path = self.job_dir(job_id) / EVENTS
        out, bad = [], 0
        for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
            try:
                out.append(json.loads(line))
            except ValueError:
                bad += 1
        return out, bad


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
