"""``tessera jobs ls | status JOB | logs JOB [--follow] [--attempt K] | cancel JOB``, from the job records."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
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


def ls(store: JobStore, out: TextIO = sys.stdout, as_json: bool = False) -> int:
    """One line per job, newest last (``as_json``: a JSON list of the records)."""
    rows = [("JOB", "BACKEND", "BACKEND_ID", "STAGE", "STATE", "ATTEMPTS", "CREATED")]
    records, unreachable = [], 0
    for rec in store.all():
        try:
            refresh(rec, store)
        except BackendError as e:  # one unreachable scheduler must not hide the other jobs: counted, shown
            unreachable += 1
            rec.state = f"{rec.state}?"
            print(f"tessera: {rec.id}: {e}", file=sys.stderr)
        records.append(rec)
        rows.append((rec.id, rec.backend, rec.backend_id or "-", rec.stage, rec.state, str(len(rec.attempts)),
                     _when(rec.created)))
    if as_json:
        out.write(json.dumps([dataclasses.asdict(r) for r in records], indent=2) + "\n")
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
    if unreachable:
        out.write(f"({unreachable} job(s) not refreshed: their scheduler did not answer; '?' marks the last "
                  "known state)\n")
    return 0


def status(store: JobStore, ref: str, out: TextIO = sys.stdout, as_json: bool = False) -> int:
    """The job's state, backend id, run, W&B run and every attempt with its start, end and exit code
    (``as_json``: the record)."""
    rec = refresh(store.find(ref), store)
    if as_json:
        out.write(rec.to_json())
        return 0
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


def cancel(store: JobStore, ref: str, out: TextIO = sys.stdout, as_json: bool = False) -> int:
    """Stop the job for good: no requeue, no resubmission (``as_json``: ``{"id", "backend_id", "cancelled"}``;
    ``cancelled`` is false when the job had already ended)."""
    rec = store.find(ref)
    done = rec.final
    if not done:
        get_backend(rec.backend).cancel(rec, store)
    if as_json:
        out.write(json.dumps({"id": rec.id, "backend_id": rec.backend_id, "cancelled": not done,
                              "state": rec.state}) + "\n")
    elif done:
        out.write(f"job {rec.id} already ended: {rec.state}\n")
    else:
        out.write(f"cancelled job {rec.id} ({rec.backend} {rec.backend_id})\n")
    return 0
