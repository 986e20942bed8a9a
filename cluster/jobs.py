"""``tessera jobs ls | status JOB | logs JOB [--follow] [--attempt K] | cancel JOB``, from the job records."""

from __future__ import annotations

import datetime as dt
import sys
from typing import TextIO

from tessera.cluster.backend import BackendError, get_backend
from tessera.cluster.records import JobRecord, JobStore


def refresh(record: JobRecord, store: JobStore) -> JobRecord:
    """Bring a record up to date with its scheduler (a final record stays as it is)."""
    if not record.final:
        get_backend(record.backend).refresh(record, store)
    return record


def _when(t: float | None) -> str:
    return dt.datetime.fromtimestamp(float(t)).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def ls(store: JobStore, out: TextIO = sys.stdout) -> int:
    """One line per job, newest last."""
    rows = [("JOB", "BACKEND", "BACKEND_ID", "STAGE", "STATE", "ATTEMPTS", "CREATED")]
    unreachable = 0
    for rec in store.all():
        try:
            refresh(rec, store)
        except BackendError as e:  # one unreachable scheduler must not hide the other jobs: counted, shown
            unreachable += 1
            rec.state = f"{rec.state}?"
            print(f"tessera: {rec.id}: {e}", file=sys.stderr)
        rows.append((rec.id, rec.backend, rec.backend_id or "-", rec.stage, rec.state, str(len(rec.attempts)),
                     _when(rec.created)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
    if unreachable:
        out.write(f"({unreachable} job(s) not refreshed: their scheduler did not answer; '?' marks the last "
                  "known state)\n")
    return 0


def status(store: JobStore, ref: str, out: TextIO = sys.stdout) -> int:
    """The job's state, backend id, run, W&B run and every attempt with its start, end and exit code."""
    rec = refresh(store.find(ref), store)
    reason = f" ({rec.reason})" if rec.reason else ""
    out.write(f"job {rec.id}: {rec.state}{reason}\n  stage:   {rec.stage}\n  backend: {rec.backend} {rec.backend_id}\n")
    if rec.after:
        out.write(f"  after:   {rec.after} (afterok)\n")
    if rec.run_id:
        out.write(f"  run:     {rec.run_id}\n")
    if rec.wandb:
        out.write(f"  W&B:     {rec.wandb['url']}\n")
    out.write(f"  config:  {rec.config}\n  logs:    {rec.log_dir}\n  attempts: {len(rec.attempts)}\n")
    for a in rec.attempts:
        task = f" task {a.task}" if rec.array else ""
        code = "-" if a.exit_code is None else a.exit_code
        out.write(f"    #{a.n}{task} {a.backend_id}: start {_when(a.start)}  end {_when(a.end)}  exit {code}"
                  f"  {a.action or 'running'}\n")
    return 0


def logs(store: JobStore, ref: str, attempt: int | None, follow: bool, out: TextIO = sys.stdout) -> int:
    """Print (or follow) the log of the latest attempt, or of ``attempt``."""
    rec = store.find(ref)
    get_backend(rec.backend).logs(rec, store, attempt, follow, out)
    return 0


def cancel(store: JobStore, ref: str, out: TextIO = sys.stdout) -> int:
    """Stop the job for good: no requeue, no resubmission."""
    rec = store.find(ref)
    if rec.final:
        out.write(f"job {rec.id} already ended: {rec.state}\n")
        return 0
    get_backend(rec.backend).cancel(rec, store)
    out.write(f"cancelled job {rec.id} ({rec.backend} {rec.backend_id})\n")
    return 0
