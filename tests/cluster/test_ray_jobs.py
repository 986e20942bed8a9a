"""Against a real Ray head (``ray start --head`` on 127.0.0.1, token authentication): a data stage joins the
cluster and its logs are followed; a preempted training (exit 75) is resubmitted by ``tessera jobs`` and resumes;
a job is stopped; no secret reaches the job request Ray stores; the head listens on loopback only."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil

from tests.cluster.conftest import (
    CANARIES, cluster_overrides, record, submit, tessera, train_overrides, wait_for,
)  # fmt: skip
from tests.trainer import helpers as H

FINAL = ("COMPLETED", "FAILED", "CANCELLED")


def _ingest_config(tmp_path, limit: int, executor: str = "ray"):
    cfg = tmp_path / f"ingest-{limit}.yaml"
    cfg.write_text(f"sources: [{{name: emoji, limit: {limit}}}]\noutput: {tmp_path / f'out-{limit}'}\n"
                   f"samples_per_shard: 8\nexecutor: {executor}\n"
                   "process: {min_side: 32, image_format: png, buckets: {base_resolution: 32, multiple: 16}}\n")
    return cfg


def _ray(head, state, **extra) -> list[str]:
    return ["--backend", "ray", *cluster_overrides(state, **{"ray.address": head.address, **extra})]


def test_a_data_stage_joins_the_cluster_and_its_logs_follow_without_secrets(ray_head, tmp_path):
    from tessera.cluster.ray_jobs import client

    state = tmp_path / "jobs"
    env = dict(os.environ, **CANARIES)
    job = submit("data", "ingest", "--config", str(_ingest_config(tmp_path, 16)), *_ray(ray_head, state), env=env)
    out = tessera("jobs", "logs", "--state-dir", str(state), job, "--follow", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ray: joined auto" in out.stdout and "ingested 16 inputs" in out.stdout, out.stdout[-3000:]
    rec = record(state, job)
    assert rec["state"] == "COMPLETED" and rec["attempts"][0]["exit_code"] == 0, rec
    assert json.loads((tmp_path / "out-16" / "manifest.json").read_text())["totals"]["input"] == 16
    # What Ray stores and serves to anyone at /api/jobs/: the request, with no secret value in it.
    (info,) = [j for j in client(ray_head.address).list_jobs() if j.submission_id == f"{job}-a0"]
    stored = json.dumps({"entrypoint": info.entrypoint, "runtime_env": info.runtime_env, "metadata": info.metadata})
    assert all(v not in stored for v in CANARIES.values()) and "TESSERA_JOB_ID" in stored
    for p in (state / job).rglob("*"):
        assert not p.is_file() or all(v not in p.read_text() for v in CANARIES.values()), p


def _driver(job_id: str) -> psutil.Process | None:
    for p in psutil.process_iter(["cmdline"]):
        try:
            if (p.info["cmdline"] or [])[1:4] == ["-m", "tessera.cli", "train"] and \
                    p.environ().get("TESSERA_JOB_ID") == job_id:
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return None


def test_a_preempted_training_is_resubmitted_and_resumes(ray_head, tiny, tmp_path):
    state, runs = tmp_path / "jobs", tmp_path / "runs"
    job = submit("train", "--config", str(H.TINY_CONFIG), *train_overrides(tiny, runs, **{"train.total_samples": 96, "tracking.mode": "offline"}),
                 *_ray(ray_head, state, **{"ray.train_launcher": "process"}))
    metrics = runs / job / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline, record(state, job)
        time.sleep(0.2)
    _driver(job).send_signal(signal.SIGTERM)  # the node is being preempted: checkpoint, exit 75
    rec = wait_for(state, job, lambda r: r["state"] in FINAL, 400, "the resubmitted training")
    assert rec["state"] == "COMPLETED", rec
    a0, a1 = rec["attempts"]
    assert (a0["exit_code"], a0["action"]) == (75, "requeue-preempted") and a1["backend_id"] == f"{job}-a1"
    assert (a1["exit_code"], a1["action"]) == (0, "done")
    logs = tessera("jobs", "logs", "--state-dir", str(state), job).stdout  # the latest attempt's driver log
    assert "resumed from" in logs
    wid = rec["wandb"]["id"]  # fixed at submit time, so both attempts log to one W&B run
    assert len(list((runs / job / "wandb").glob(f"offline-run-*-{wid}"))) == 2  # one W&B run, two attempts


def test_stop_a_running_job(ray_head, tmp_path):
    state = tmp_path / "jobs"
    job = submit("data", "ingest", "--config", str(_ingest_config(tmp_path, 3000, "local")), *_ray(ray_head, state))
    wait_for(state, job, lambda r: r["state"] == "RUNNING", 120, "the job to run")
    out = tessera("jobs", "cancel", "--state-dir", str(state), job)
    assert out.returncode == 0, out.stderr
    rec = wait_for(state, job, lambda r: r["state"] in FINAL, 120, "the stopped job")
    assert rec["state"] == "CANCELLED" and len(rec["attempts"]) == 1 and rec["attempts"][0]["action"] == "cancelled"


def test_the_head_listens_on_loopback_only(ray_head):
    seen = []
    for p in ray_head.processes():
        try:
            seen += [c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    assert seen and all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip in seen), seen
