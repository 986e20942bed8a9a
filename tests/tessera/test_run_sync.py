"""S3 runs upload metrics.jsonl and logs during the run (every N lines or M minutes), not only at close."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tessera import storage
from tessera.tracking import Run, RunConfig, Tracker, TrackingConfig

KILLED = textwrap.dedent("""
    import logging, sys, time
    from tessera.tracking import Run, RunConfig, Tracker, TrackingConfig

    root, mirror = sys.argv[1], sys.argv[2]
    run = Run(RunConfig(root=root, id="killed", local_mirror=mirror, sync_every_lines=5, sync_every_minutes=0))
    run.attach_file_logging()
    logging.getLogger("tessera.test").warning("hello from the run")
    tracker = Tracker(TrackingConfig(mode="disabled"), run)
    for step in range(23):
        tracker.log({"loss": 1.0 / (step + 1)}, step=step)
    print("WROTE", flush=True)
    time.sleep(600)  # never closes: the test kills it
""")


def _lines(url: str) -> list[bytes]:
    return storage.read_bytes(url).splitlines(keepends=True) if storage.exists(url) else []


def _wait_for(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.s3
def test_kill_9_loses_at_most_the_last_window(s3_bucket, tmp_path) -> None:
    """SIGKILL after 23 metric lines with an upload every 5: S3 holds at least the first 20, and the log."""
    root, mirror = f"{s3_bucket}/runs", tmp_path / "mirror"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, root, str(mirror)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WROTE", proc.stderr.read()[-3000:]
        metrics_url = f"{root}/killed/metrics.jsonl"
        # The 4th upload is triggered at line 20; it reads the file when it runs, so it may hold up to 23.
        _wait_for(lambda: len(_lines(metrics_url)) >= 20, "the upload triggered at line 20")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    local = (mirror / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    uploaded = _lines(metrics_url)
    assert len(local) == 23 and 20 <= len(uploaded) <= 23
    assert uploaded == local[: len(uploaded)]  # every line up to the last sync, byte for byte, none torn
    assert b"hello from the run" in storage.read_bytes(f"{root}/killed/logs/rank0.log")


@pytest.mark.s3
def test_timer_uploads_without_enough_lines(s3_bucket, tmp_path) -> None:
    run = Run(RunConfig(root=s3_bucket, id="timed", local_mirror=str(tmp_path), sync_every_lines=0,
                        sync_every_minutes=0.005))
    tracker = Tracker(TrackingConfig(mode="disabled"), run)
    for step in range(3):
        tracker.log({"loss": float(step)}, step=step)
    _wait_for(lambda: len(_lines(run.path("metrics.jsonl"))) == 3, "the timed upload")
    run.close()
    assert run.sync_failures == 0


@pytest.mark.s3
def test_uploads_run_off_the_logging_thread(s3_bucket, tmp_path, monkeypatch) -> None:
    """While an upload is stuck, tracker.log() keeps returning: the step never waits for S3."""
    run = Run(RunConfig(root=s3_bucket, id="async", local_mirror=str(tmp_path), sync_every_lines=1,
                        sync_every_minutes=0))
    tracker = Tracker(TrackingConfig(mode="disabled"), run)
    entered, release, real_write = threading.Event(), threading.Event(), storage.write_bytes
    callers: set[str] = set()

    def slow_write(url, data, **kw):
        callers.add(threading.current_thread().name)
        entered.set()
        assert release.wait(30), "upload was never released"
        real_write(url, data, **kw)

    monkeypatch.setattr(storage, "write_bytes", slow_write)
    tracker.log({"loss": 1.0}, step=0)
    assert entered.wait(30), "no background upload started"
    for step in range(1, 10):  # would block here if uploads ran on this thread
        tracker.log({"loss": 1.0}, step=step)
    release.set()
    run.close()
    assert threading.current_thread().name in callers  # close() syncs in the caller, as documented
    assert "tessera-run-sync-rank0" in callers
    assert len(_lines(run.path("metrics.jsonl"))) == 10


def test_local_runs_start_no_uploader(tmp_path) -> None:
    run = Run(RunConfig(root=str(tmp_path), id="local"))
    assert run._syncer is None
    Tracker(TrackingConfig(mode="disabled"), run).log({"loss": 0.5}, step=0)
    run.close()
    assert (tmp_path / "local" / "metrics.jsonl").read_text().count("\n") == 1


def test_sync_cadence_is_validated() -> None:
    with pytest.raises(ValueError, match="sync_every_lines"):
        RunConfig(sync_every_lines=-1)
    with pytest.raises(ValueError, match="sync_every_minutes"):
        RunConfig(sync_every_minutes=-0.5)


@pytest.mark.s3
def test_resume_on_another_machine_keeps_the_earlier_metric_lines(s3_bucket, tmp_path) -> None:
    """A resumed S3 run whose local mirror is gone (another node) fetches metrics.jsonl first: its next upload of
    the growing file carries the first process's lines too, instead of replacing them."""
    for n, mirror in enumerate(("node-a", "node-b")):
        run = Run(RunConfig(root=s3_bucket, id="moved", local_mirror=str(tmp_path / mirror), sync_every_lines=1))
        tracker = Tracker(TrackingConfig(mode="disabled"), run)
        for step in range(3 * n, 3 * n + 3):
            tracker.log({"loss": float(step)}, step=step)
        run.close()
    steps = [int(line.split(b'"step": ')[1].split(b",")[0]) for line in _lines(run.path("metrics.jsonl"))]
    assert steps == [0, 1, 2, 3, 4, 5]
