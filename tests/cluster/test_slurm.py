"""Against a real single-node Slurm: preemption -> exit 75 -> requeue -> resume with the same job id, run and W&B
run and the same final weights as an uninterrupted run; user errors are not retried and cancel their chained
jobs; crashes are retried only after progress; cancel; job arrays; no secret and no inherited SLURM_* variable
reaches the job or Slurm's state."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.cluster.conftest import (
    CANARIES, JOB_ENV, ROOT, cluster_overrides, record, submit, tessera, train_overrides, wait_for,
)  # fmt: skip
from tests.trainer import helpers as H

TINY = str(H.TINY_CONFIG)
QUICK = str(ROOT / "configs" / "eval" / "quick.yaml")
FINAL = ("COMPLETED", "FAILED", "CANCELLED")


def eval_overrides(out: Path) -> list[str]:
    """configs/eval/quick.yaml cut to one 2-step image, no FID/KID: a chained job that runs in seconds."""
    return [f"output={out}", "fid.enabled=false", "kid.enabled=false", "prompts.limit=1",
            "sampling.images_per_prompt=1", "sampling.steps=2", "tracking.mode=offline"]


def _wait_file(path: Path, lines: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while not (path.exists() and len(path.read_text().splitlines()) >= lines):
        assert time.time() < deadline, f"{path} did not reach {lines} lines in {timeout} s"
        time.sleep(0.2)


def _rank_processes(job_id: str) -> list[psutil.Process]:
    """The job's ``python -m tessera.cli`` rank processes (not srun), by the TESSERA_JOB_ID the batch script exports."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        try:
            if cmd[1:3] == ["-m", "tessera.cli"] and p.environ().get("TESSERA_JOB_ID") == job_id:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _restarts(backend_id: str) -> int:
    out = subprocess.run(["scontrol", "show", "job", "-o", backend_id], capture_output=True, text=True, timeout=30)
    return int(out.stdout.split("Restarts=")[1].split()[0])


def _weights(run_dir: Path) -> dict:
    step = (run_dir / "checkpoints" / "latest").read_text().strip()
    ck = run_dir / "checkpoints" / step
    return {kind: H.ckpt_tensors(ck, kind) for kind in ("weight", "ema")}


@pytest.mark.slow
def test_preempted_training_requeues_resumes_and_matches_an_uninterrupted_run(slurm, tiny, tmp_path):
    state, runs, total = tmp_path / "jobs", tmp_path / "runs", 320  # 80 steps: the signal lands mid-run under load
    job = submit("train", "--config", TINY, *train_overrides(tiny, runs, **{"train.total_samples": total, "tracking.mode": "offline"}),
                 *cluster_overrides(state))
    ev = submit("eval", "--config", QUICK, "--checkpoint", str(runs / job), "--after", job,
                *eval_overrides(tmp_path / "eval"), *cluster_overrides(state))
    follow = subprocess.Popen([sys.executable, "-m", "tessera.cli", "jobs", "logs", "--state-dir", str(state), job,
                               "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    _wait_file(runs / job / "metrics.jsonl", 3, 300)
    backend_id = record(state, job)["backend_id"]
    subprocess.run(["scancel", "--signal=USR1", "--batch", backend_id], check=True, timeout=30)
    rec = wait_for(state, job, lambda r: r["attempts"] and r["attempts"][0]["action"], 120, "the preempted attempt")
    assert (rec["attempts"][0]["exit_code"], rec["attempts"][0]["action"]) == (75, "requeue-preempted")
    # The uninterrupted reference run, here, while Slurm holds the requeued job (cred_expire, 10 s here); on a port of
    # its own (a one-process run otherwise takes the default 29500, which another run on this machine may hold).
    ref = H.run_train(H.overrides(tmp_path, "ref", tiny["ds"], tiny["enc"], **{"train.total_samples": total}),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    assert ref.returncode == 0, ref.stderr[-3000:]

    rec = wait_for(state, job, lambda r: r["state"] in FINAL, 600, "the requeued attempt to finish")
    assert rec["state"] == "COMPLETED", rec
    a0, a1 = rec["attempts"]
    assert a0["backend_id"] == a1["backend_id"] == backend_id  # requeued: the same Slurm job id
    assert (a1["n"], a1["exit_code"], a1["action"]) == (1, 0, "done") and a1["start"] > a0["end"]
    first, second = Path(a0["log"]).read_text(), Path(a1["log"]).read_text()  # both attempts' logs are kept
    assert a0["log"] != a1["log"] and "preempted: checkpoint at step" in first and "resumed from" in second
    got, want = _weights(runs / job), _weights(tmp_path / "runs" / "ref")
    for name in want:
        assert all(torch.equal(got[name][k], want[name][k]) for k in want[name]), name
    # One W&B run continued: both attempts wrote an offline run with the id fixed at submit time.
    wid = rec["wandb"]["id"]
    assert rec["run_id"] == job and wid.startswith(f"{job}-") and json.loads((runs / job / "run.json").read_text())[
        "wandb_id"] == wid
    assert len(list((runs / job / "wandb").glob(f"offline-run-*-{wid}"))) == 2

    out, _ = follow.communicate(timeout=60)  # --follow went through the requeue and ended with the job
    assert follow.returncode == 0 and "attempt 0" in out and "attempt 1" in out and "resumed from" in out
    assert "preempted" in tessera("jobs", "logs", "--state-dir", str(state), job, "--attempt", "0").stdout

    erec = wait_for(state, ev, lambda r: r["state"] in FINAL, 600, "the chained eval")
    assert erec["state"] == "COMPLETED" and erec["after"] == backend_id
    assert erec["attempts"][0]["start"] >= a1["end"] and (tmp_path / "eval" / "metrics.json").exists()


def _secrets_file(tmp_path: Path) -> Path:
    path = tmp_path / "secrets.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in CANARIES.items()))
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return path


def test_user_error_is_not_retried_cancels_its_chain_and_no_secret_or_inherited_variable_leaks(slurm, tiny,
                                                                                              tmp_path):
    state, runs = tmp_path / "jobs", tmp_path / "runs"
    # A submitting shell inside another allocation, holding secrets: none of this may reach the job.
    env = dict(os.environ, **CANARIES, SLURM_JOB_ID="424242", SBATCH_PARTITION="no-such-partition",
               SLURM_NTASKS="64")
    cl = cluster_overrides(state, **{"slurm.secrets_file": str(_secrets_file(tmp_path))})
    train = ["train", "--config", TINY, *train_overrides(tiny, runs, **{"data.path": str(tmp_path / "missing")}), *cl]
    dry = tessera("submit", *train, "--dry-run", env=env)
    assert dry.returncode == 0 and "#SBATCH" in dry.stdout, dry.stderr
    job = submit(*train, env=env)
    ev = submit("eval", "--config", QUICK, "--checkpoint", str(runs / job), "--after", job,
                *eval_overrides(tmp_path / "eval"), *cl, env=env)

    rec = wait_for(state, job, lambda r: r["state"] in FINAL, 300, "the failing training")
    assert rec["state"] == "FAILED" and len(rec["attempts"]) == 1, rec
    assert (rec["attempts"][0]["exit_code"], rec["attempts"][0]["action"]) == (2, "fail")
    assert _restarts(rec["backend_id"]) == 0  # exit 2 (config error): never requeued
    erec = wait_for(state, ev, lambda r: r["state"] in FINAL, 120, "the chained eval to be cancelled")
    assert erec["state"] == "CANCELLED" and erec["attempts"] == []
    listing = tessera("jobs", "ls", "--state-dir", str(state)).stdout.splitlines()
    assert [line.split()[4] for line in listing[1:]] == ["FAILED", "CANCELLED"] and job in listing[1]

    batch = next((state / job / "logs").glob("batch-*.out")).read_text()
    assert "secret WANDB_API_KEY: set" in batch and "secret AWS_SECRET_ACCESS_KEY: set" in batch  # by name
    # Slurm saved the job's environment: the submitting shell's allocation variables were dropped.
    saved = [p.read_bytes() for p in slurm.root.rglob("environment")]
    assert saved and all(b"SBATCH_PARTITION" not in s and b"SLURM_JOB_ID=424242" not in s for s in saved)
    assert all(b"SLURM_CONF=" in s for s in saved)
    shown = subprocess.run(["scontrol", "show", "job", "-d", rec["backend_id"]], capture_output=True, text=True)
    texts = {"dry-run": dry.stdout + dry.stderr, "scontrol": shown.stdout}
    files = [p for root in (state, slurm.root) for p in root.rglob("*") if p.is_file() and p.name != "munge.key"]
    texts.update({str(p): p.read_bytes().decode("utf-8", "replace") for p in files})
    assert len(files) > 10
    for where, text in texts.items():
        for name, value in CANARIES.items():
            assert value not in text, f"the value of {name} leaked into {where}"


def test_a_crash_is_requeued_only_after_progress_and_cancel_stops_a_job(slurm, tiny, tmp_path):
    state, runs = tmp_path / "jobs", tmp_path / "runs"
    cl = cluster_overrides(state, **{"retry.crashes": 1})
    long = {"train.total_samples": 100000}
    no_ckpt = submit("train", "--config", TINY, *train_overrides(tiny, runs, **long), *cl)
    ckpt = submit("train", "--config", TINY, *train_overrides(tiny, runs, **long, **{"train.ckpt_every_samples": 8}),
                  *cl)
    _wait_file(runs / no_ckpt / "metrics.jsonl", 2, 300)
    _wait_file(runs / ckpt / "checkpoints" / "latest", 1, 300)
    for job in (no_ckpt, ckpt):  # a crash: the rank dies by SIGKILL (no checkpoint, no exit code of its own)
        procs = _rank_processes(job)
        assert procs, f"no rank process of {job}"
        for p in procs:
            p.send_signal(signal.SIGKILL)

    rec = wait_for(state, no_ckpt, lambda r: r["state"] in FINAL, 120, "the crash without progress")
    assert rec["state"] == "FAILED" and rec["attempts"][0]["action"] == "fail"
    assert rec["attempts"][0]["exit_code"] not in (0, 1, 2, 75)
    assert "made no progress: not retried" in next((state / no_ckpt / "logs").glob("batch-*.out")).read_text()
    rec = wait_for(state, ckpt, lambda r: r["attempts"] and r["attempts"][0]["action"], 120, "the crash after progress")
    # Requeued: not final (Slurm holds it for cred_expire, 10 s here; a busy machine may see it running again).
    assert rec["attempts"][0]["action"] == "requeue-crash" and rec["state"] in ("PENDING", "RUNNING")

    out = tessera("jobs", "cancel", "--state-dir", str(state), ckpt)
    assert out.returncode == 0 and "cancelled" in out.stdout, out.stderr
    rec = wait_for(state, ckpt, lambda r: r["state"] in FINAL, 60, "the cancelled job")
    assert rec["state"] == "CANCELLED" and len(rec["attempts"]) == 1 and not _rank_processes(ckpt)


@pytest.mark.long  # make test keeps the cancel of a requeued job in the crash test above
def test_cancel_stops_a_running_job_for_good(slurm, tiny, tmp_path):
    state, runs = tmp_path / "jobs", tmp_path / "runs"
    job = submit("train", "--config", TINY, *train_overrides(tiny, runs, **{"train.total_samples": 100000}),
                 *cluster_overrides(state))
    _wait_file(runs / job / "metrics.jsonl", 1, 300)
    out = tessera("jobs", "cancel", "--state-dir", str(state), job)
    assert out.returncode == 0, out.stderr
    rec = wait_for(state, job, lambda r: r["state"] in FINAL, 120, "the cancelled job")
    assert rec["state"] == "CANCELLED" and rec["attempts"][0]["action"] in ("cancelled", None)
    assert _restarts(rec["backend_id"]) == 0
    deadline = time.time() + 30
    while _rank_processes(job) and time.time() < deadline:
        time.sleep(0.5)
    assert not _rank_processes(job)


def test_a_data_stage_fans_out_as_a_job_array(slurm, tmp_path):
    state, out = tmp_path / "jobs", tmp_path / "out"
    cfg = tmp_path / "ingest.yaml"
    cfg.write_text(f"sources: [{{name: emoji, limit: 12}}]\noutput: {out}/all\nsamples_per_shard: 8\nexecutor: local\n"
                   "process: {min_side: 32, image_format: png, buckets: {base_resolution: 32, multiple: 16}}\n")
    job = submit("data", "ingest", "--config", str(cfg), "--array", "2",
                 *cluster_overrides(state, **{"slurm.array_overrides": f"['output={out}/part{{index}}-of-{{count}}']"}))
    rec = wait_for(state, job, lambda r: r["state"] in FINAL, 300, "the array")
    assert rec["state"] == "COMPLETED" and sorted(a["task"] for a in rec["attempts"]) == ["0", "1"], rec
    for i in range(2):
        manifest = json.loads((out / f"part{i}-of-2" / "manifest.json").read_text())
        assert manifest["totals"]["input"] == 12


def _free_the_node(timeout: float = 120) -> None:
    """Cancel what earlier tests left in this test's Slurm (again while it lasts: a job being requeued comes back
    pending) until it holds no job at all."""
    deadline = time.time() + timeout
    while subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout.strip():
        assert time.time() < deadline, "earlier test jobs still hold the node"
        subprocess.run(["scancel", "--user", str(os.getuid())], capture_output=True, timeout=30)
        time.sleep(1)


def test_the_python_api_waits_on_a_plain_slurm_job_and_each_rank_gets_its_cpus(slurm, tiny, tmp_path):
    """``tessera.cluster.submit`` -> ``Job``: ``--after`` a job submitted with plain sbatch, a chained job
    cancelled, and a training job whose rank runs on the 2 CPUs it asked for (read from /proc, from outside the
    job: Slurm >= 22.05's srun would bind it to 1 CPU without its own --cpus-per-task) with 2 OMP threads."""
    from tessera.cluster import Job, submit as submit_job

    state, runs = tmp_path / "jobs", tmp_path / "runs"
    _free_the_node()  # the training job needs both of the node's CPUs
    raw = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/raw-%j.out", "--wrap", "sleep 12"],
                         capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    env = "{" + ", ".join(f"{k}: '{v}'" for k, v in JOB_ENV.items() if k != "OMP_NUM_THREADS") + "}"
    cluster = [o.removeprefix("cluster.") for o in cluster_overrides(state, env=env, **{"resources.cpus_per_task": 2})]
    job = submit_job("train", config=TINY, overrides=train_overrides(tiny, runs, **{"train.total_samples": 16}),
                     backend="slurm", cluster_overrides=cluster, after=raw)
    assert job.status() == "PENDING" and job.record.after == raw
    shown = subprocess.run(["scontrol", "show", "job", "-o", job.backend_id], capture_output=True, text=True).stdout
    assert f"afterok:{raw}" in shown, shown
    chained = submit_job("eval", config=QUICK, overrides=eval_overrides(tmp_path / "eval"), backend="slurm",
                         cluster_overrides=cluster, after=job, checkpoints=[str(runs / job.id)])
    assert chained.record.after == job.backend_id
    chained.cancel()
    assert chained.wait(timeout=60, poll_s=1) == "CANCELLED" and chained.record.attempts == []

    deadline = time.time() + 300
    while not (ranks := _rank_processes(job.id)):
        assert time.time() < deadline and not job.done(), job.record
        time.sleep(0.2)
    assert sorted(ranks[0].cpu_affinity()) == [0, 1] and ranks[0].environ()["OMP_NUM_THREADS"] == "2"
    assert job.wait(timeout=600, poll_s=1) == "COMPLETED", job.logs()
    assert Job(job.id, str(state)).status() == "COMPLETED" and (runs / job.id / "metrics.jsonl").exists()
    assert job.record.attempts[0].exit_code == 0 and "step" in job.logs()
