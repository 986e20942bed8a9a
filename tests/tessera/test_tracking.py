"""Runs and tracking: run dir, config.yaml with hash, metrics.jsonl, W&B offline + resume, secrets."""

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tessera import storage
from tessera.config import config_hash
from tessera.tracking import Run, RunConfig, scrub
from tests import wandb_records


SCRIPT = textwrap.dedent("""
    import sys
    from dataclasses import dataclass, field
    from tessera.tracking import Run, RunConfig, Tracker, TrackingConfig

    @dataclass(kw_only=True)
    class Job:
        lr: float = 0.1
        run: RunConfig = field(default_factory=RunConfig)

    root, run_id, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = Job(run=RunConfig(root=root, id=run_id))
    run = Run(cfg.run)
    run.attach_file_logging()
    import logging; logging.getLogger("tessera.test").warning("hello from the run")
    run.write_config(cfg)
    tr = Tracker(TrackingConfig(project="p", group="g", tags=["t1"], mode="offline"), run, cfg)
    for s in range(start, start + 3):
        tr.log({"loss": 1.0 / (s + 1)}, step=s)
    tr.finish()
    run.close()
    print("RESUMED" if run.resumed else "NEW")
""")


def _run(root, run_id, start):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(root), run_id, str(start)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_local_run_metrics_config_and_wandb_resume(tmp_path):
    first = _run(tmp_path, "run-a", 0)
    assert "NEW" in first and "wandb sync" in first
    second = _run(tmp_path, "run-a", 3)
    assert "RESUMED" in second
    run_dir = tmp_path / "run-a"
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 1, 2, 3, 4, 5]
    cfg_text = (run_dir / "config.yaml").read_text()
    assert cfg_text.startswith("# config_hash: ") and "lr: 0.1" in cfg_text
    assert "hello from the run" in (run_dir / "logs" / "rank0.log").read_text()
    # Both processes wrote to the same W&B run id (resume continues the run).
    assert wandb_records.run_ids(run_dir) == {"run-a"}
    rows = wandb_records.history(run_dir)
    assert sorted(r["_step"] for r in rows) == [0, 1, 2, 3, 4, 5]
    assert rows[0]["loss"] == 1.0


def test_config_hash_line_matches(tmp_path):
    from dataclasses import dataclass

    @dataclass(kw_only=True)
    class C:
        a: int = 1

    run = Run(RunConfig(root=str(tmp_path), id="h"))
    h = run.write_config(C())
    assert h == config_hash(C()) and (tmp_path / "h" / "config.yaml").read_text().startswith(f"# config_hash: {h}")


def test_rank_prefix_in_console_logs(monkeypatch, capsys):
    from tessera.log import setup_logging

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    setup_logging("INFO")
    logging.getLogger("tessera.test").info("ranked message")
    assert "[rank 1/2] INFO tessera.test: ranked message" in capsys.readouterr().err


def test_scrub_redacts_secret_keys_and_values(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "canary-wandb-123")
    cfg = {"a": {"api_key": "x", "url": "https://canary-wandb-123@host"}, "token": 1, "ok": [1, "fine"]}
    assert scrub(cfg) == {"a": {"api_key": "<redacted>", "url": "<redacted>"}, "token": "<redacted>", "ok": [1, "fine"]}


CANARIES = {"WANDB_API_KEY": "canaryWANDB0123456789abcdef0123456789abcd",
            "AWS_SECRET_ACCESS_KEY": "canaryAWSSECRET0123456789", "AWS_SESSION_TOKEN": "canaryAWSSESSION987654321"}


def assert_no_canary(files: dict[str, bytes]) -> None:
    """No canary value in any of the given files' bytes."""
    assert files, "nothing to check"
    hits = [(name, k) for name, data in files.items() for k, v in CANARIES.items() if v.encode() in data]
    assert hits == []


@pytest.mark.s3
def test_secrets_never_reach_run_files(s3_bucket, tmp_path, monkeypatch):
    """A tracked run with S3 storage and canary secrets in the env: 0 hits in everything it produced."""
    for k, v in CANARIES.items():
        monkeypatch.setenv(k, v)
    storage.configure(storage.StorageConfig())  # a client with the canary credentials
    mirror = tmp_path / "mirror"
    cfg_root = f"{s3_bucket}/runs"
    script = SCRIPT.replace("cfg = Job(run=RunConfig(root=root, id=run_id))",
                            f"cfg = Job(run=RunConfig(root=root, id=run_id, local_mirror={str(mirror)!r}, "
                            "sync_every_lines=1))")  # background uploads at every line, too
    out = subprocess.run([sys.executable, "-c", script, cfg_root, "secret-run", "0"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    files = {u: storage.read_bytes(u) for u in storage.list_prefix(cfg_root + "/")}
    assert any(u.endswith("metrics.jsonl") for u in files) and any(u.endswith("config.yaml") for u in files)
    files.update({str(p): p.read_bytes() for p in mirror.rglob("*") if p.is_file()})
    assert any("offline-run-" in name for name in files), "W&B offline files missing"
    files["stdout"], files["stderr"] = out.stdout.encode(), out.stderr.encode()
    assert_no_canary(files)
    storage.configure(storage.StorageConfig())


def test_wandb_goes_offline_by_itself_without_a_key(tmp_path):
    """No WANDB_API_KEY, no netrc entry and no WANDB_MODE: the tracker picks offline mode on its own and writes an
    offline run that `wandb sync` can upload."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), NETRC=str(tmp_path / "home" / ".netrc"))
    script = textwrap.dedent("""
        import sys
        from tessera.tracking import Run, RunConfig, Tracker, TrackingConfig
        run = Run(RunConfig(root=sys.argv[1], id="auto"))
        tr = Tracker(TrackingConfig(project="p"), run, {"lr": 0.1})
        tr.log({"loss": 1.0}, step=1)
        print("MODE", tr.mode)
        print("SYNC", tr.sync_command())
        tr.finish()
        run.close()
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "runs")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MODE offline" in out.stdout and "SYNC wandb sync" in out.stdout
    assert list((tmp_path / "runs" / "auto" / "wandb").glob("offline-run-*-auto"))
