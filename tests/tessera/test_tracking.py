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
from tessera.tracking import Run, RunConfig, run_wandb_id, scrub
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
    for s in range(start, start + 3):  # a start below the last step is a rollback: the steps are logged again
        tr.log({"loss": 1.0 / (s + 1), "samples": 8 * (s + 1)}, step=s)
    tr.log_table("grid", ["a"], [[start]], step=start + 2)  # joins the last row
    tr.finish()
    run.close()
    print("RESUMED" if run.resumed else "NEW")
""")


def _run(root, run_id, start):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(root), run_id, str(start)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_local_run_metrics_config_and_wandb_resume_and_rollback(tmp_path):
    """Three processes on one run directory (new, resumed, rolled back to step 1): one W&B run, whose step only
    grows, so every logged row is kept; every row carries samples, the charts' x axis."""
    first = _run(tmp_path, "run-a", 0)
    assert "NEW" in first and "wandb sync" in first
    assert "RESUMED" in _run(tmp_path, "run-a", 3)
    assert "RESUMED" in _run(tmp_path, "run-a", 1)  # a rollback: optimizer steps 1..3 again
    run_dir = tmp_path / "run-a"
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 1, 2, 3, 4, 5, 1, 2, 3]
    assert [l["wandb_step"] for l in lines] == list(range(9))
    cfg_text = (run_dir / "config.yaml").read_text()
    assert cfg_text.startswith("# config_hash: ") and "lr: 0.1" in cfg_text
    assert "hello from the run" in (run_dir / "logs" / "rank0.log").read_text()
    wandb_id = json.loads((run_dir / "run.json").read_text())["wandb_id"]
    assert wandb_id.startswith("run-a-") and len(wandb_id) == len("run-a-") + 8
    assert wandb_records.run_ids(run_dir) == {wandb_id}  # all three processes continued one W&B run
    rows = wandb_records.history(run_dir)
    assert [r["_step"] for r in rows] == list(range(9))  # strictly increasing: W&B drops nothing
    assert [(r["step"], r["samples"]) for r in rows] == [(s, 8 * (s + 1)) for s in [0, 1, 2, 3, 4, 5, 1, 2, 3]]
    assert [i for i, r in enumerate(rows) if r.get("grid/_type") == "table-file"] == [2, 5, 8]  # joined the row
    metrics = [r.metric for r in wandb_records.records(run_dir) if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "*" and m.step_metric == "samples" for m in metrics)
    runs = [r.run for r in wandb_records.records(run_dir) if r.WhichOneof("record_type") == "run"]
    assert {(r.project, r.run_group, r.job_type) for r in runs} == {("p", "g", "train")}


def test_offline_run_is_complete_for_wandb_sync(tmp_path):
    """`wandb sync` takes the offline directories the run prints, every record of them parses, and each process's
    part ends with its exit record (a clean finish, not a crash W&B would mark as such)."""
    out = _run(tmp_path, "run-s", 0) + _run(tmp_path, "run-s", 3)
    dirs = out.strip().splitlines()[-2].split()[2:]  # "  wandb sync DIR1 DIR2" of the second process
    assert len(dirs) == 2 and all(Path(d).is_dir() for d in dirs)
    for d in dirs:
        (f,) = Path(d).glob("run-*.wandb")
        kinds = [wandb_records.parse(p).WhichOneof("record_type") for p in wandb_records.read_payloads(f)]
        assert kinds[0] == "header" and "run" in kinds and kinds[-1] in ("exit", "final") and "exit" in kinds
    dry = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", *dirs], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert f"Would sync {len(dirs)} run(s)" in dry.stdout + dry.stderr


def test_wandb_ids_are_unique_per_run_directory_and_kept_on_resume(tmp_path):
    """The shipped configs name fixed runs (tiny_dit): two users, or one run directory deleted and made again,
    still get two W&B runs; a resume keeps the id its run.json holds."""
    import shutil

    a = Run(RunConfig(root=str(tmp_path / "alice"), id="tiny_dit")).meta["wandb_id"]
    b = Run(RunConfig(root=str(tmp_path / "bob"), id="tiny_dit")).meta["wandb_id"]
    assert a != b and a.startswith("tiny_dit-") and b.startswith("tiny_dit-")
    resumed = Run(RunConfig(root=str(tmp_path / "alice"), id="tiny_dit"))
    assert resumed.resumed and resumed.meta["wandb_id"] == a
    shutil.rmtree(tmp_path / "alice" / "tiny_dit")
    again = Run(RunConfig(root=str(tmp_path / "alice"), id="tiny_dit")).meta["wandb_id"]
    assert again not in (a, b)
    # `tessera submit` fixes the id of a new run before it exists, and reads an existing run's from run.json.
    wid, new = run_wandb_id(str(tmp_path / "alice"), "job-7")
    assert new and wid.startswith("job-7-") and wid != run_wandb_id(str(tmp_path / "alice"), "job-7")[0]
    assert run_wandb_id(str(tmp_path / "alice"), "tiny_dit") == (again, False)


LINEAGE = textwrap.dedent("""
    import sys
    from tessera import lineage
    from tessera.tracking import Run, RunConfig, Tracker, TrackingConfig
    root, kind, arg = sys.argv[1], sys.argv[2], sys.argv[3]
    if kind == "train":  # a training run: a dataset in, a checkpoint out
        run = Run(RunConfig(root=root, id="tiny_dit"))
        tr = Tracker(TrackingConfig(project="proj", mode="offline"), run, {})
        tr.use_artifact(lineage.dataset_artifact(arg))
        tr.log({"loss": 1.0, "samples": 8}, step=1)
        ckpt = run.path("checkpoints", "step_000000001")
        tr.outputs_at_finish(lambda: [lineage.checkpoint_artifact(ckpt, run.meta["wandb_id"], step=1, samples=8)])
    else:  # an eval (or fine-tuning) run on that checkpoint, with no project of its own
        run = Run(RunConfig(root=root, id="eval"))
        tr = Tracker(TrackingConfig(project=None, job_type=kind, mode="offline"), run, {}, source=arg)
        tr.log({"fid": 3.0}, step=1, samples=8)
    tr.finish()
    run.close()
""")


def test_eval_joins_its_training_runs_project_and_group_and_lineage_links_dataset_checkpoint_eval(tmp_path):
    dataset = tmp_path / "data" / "tiny"
    (dataset / "shards").mkdir(parents=True)
    (dataset / "manifest.json").write_text(json.dumps({"shards": [{"name": "00000"}], "totals": {"written": 5}}))
    ckpt = tmp_path / "runs" / "tiny_dit" / "checkpoints" / "step_000000001"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("ok\n")
    for kind, arg, root in (("train", dataset, tmp_path / "runs"), ("eval", ckpt, tmp_path / "evals")):
        out = subprocess.run([sys.executable, "-c", LINEAGE, str(root), kind, str(arg)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
    train_dir, eval_dir = tmp_path / "runs" / "tiny_dit", tmp_path / "evals" / "eval"
    (train_run,) = [r.run for r in wandb_records.records(train_dir) if r.WhichOneof("record_type") == "run"]
    (eval_run,) = [r.run for r in wandb_records.records(eval_dir) if r.WhichOneof("record_type") == "run"]
    assert (eval_run.project, eval_run.run_group, eval_run.job_type) == ("proj", train_run.run_group, "eval")
    assert train_run.run_group == train_run.run_id and train_run.job_type == "train"

    def artifacts(d):
        return {a.name: a for a in (r.artifact for r in wandb_records.records(d)
                                    if r.WhichOneof("record_type") == "artifact") if a.type != "run_table"}

    train_arts, eval_arts = artifacts(train_dir), artifacts(eval_dir)
    (ds_name,) = [n for n, a in train_arts.items() if a.type == "dataset"]
    ds = train_arts[ds_name]
    assert ds.use_after_commit and ds.metadata and json.loads(ds.metadata)["samples"] == 5  # an input, by reference
    assert {e.ref for e in ds.manifest.contents} == {(dataset / "manifest.json").as_uri()}
    model = train_arts[f"model-{train_run.run_id}"]
    assert not model.use_after_commit and "step-1" in model.aliases  # an output of the training run
    used = eval_arts[f"model-{train_run.run_id}"]
    assert used.use_after_commit and used.digest == model.digest  # the eval run used that very version


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
    assert list((tmp_path / "runs" / "auto" / "wandb").glob("offline-run-*-auto-*"))


def test_submit_fixes_the_w_and_b_id_of_a_new_run_and_reads_an_existing_runs(tmp_path):
    """`tessera submit` prints the W&B run a job logs to: a new run's unique id is made at submit time and passed
    to the job (tracking.id); a run that exists keeps the id its run.json holds."""
    from tessera.cluster.records import JobStore
    from tessera.cluster.submit import SubmitRequest, build_spec, cluster_config
    from tests.trainer.helpers import TINY_CONFIG

    def spec(*overrides):
        req = SubmitRequest(stage=["train"], config=str(TINY_CONFIG), overrides=[
            f"run.root={tmp_path / 'runs'}", "tracking.mode=offline", f"cluster.state_dir={tmp_path / 'jobs'}",
            *overrides])
        return build_spec(req, cluster_config(req), JobStore(tmp_path / "jobs"))

    new = spec("run.id=null")
    wid = new.wandb["id"]
    assert wid.startswith(f"{new.run_id}-") and f"tracking.id={wid}" in new.stage_args and wid in new.wandb["url"]
    existing = Run(RunConfig(root=str(tmp_path / "runs"), id="kept")).meta["wandb_id"]
    old = spec("run.id=kept")
    assert old.wandb["id"] == existing and not any(a.startswith("tracking.id=") for a in old.stage_args)
