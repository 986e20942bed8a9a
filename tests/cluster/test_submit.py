"""``tessera submit`` without a scheduler: argument parsing, config validation through the stage's own dry run,
secrets refused by name, the cluster config, job records, and the small decisions (progress probes, Ray
addresses, Ray Train exit codes)."""

from __future__ import annotations

import io

import pytest

from tessera.cluster.backend import get_backend
from tessera.cluster.config import ClusterConfig, load_cluster_config
from tessera.cluster.ray_train import exit_code
from tessera.cluster.records import Attempt, JobRecord, JobStore
from tessera.cluster.secrets import SecretLeakError, check_clean, is_secret_name, submit_environment
from tessera.cluster.stages import progress_paths, ray_address_overrides, wandb_info
from tessera.cluster.submit import SubmitRequest, submit
from tessera.config import ConfigError, from_dict
from tests.cluster.conftest import ROOT, tessera
from tests.trainer import helpers as H

TINY = str(H.TINY_CONFIG)


def test_secret_names_and_the_clean_submit_environment():
    for name in ("WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN",
                 "RAY_AUTH_TOKEN", "DB_PASSWORD", "GOOGLE_APPLICATION_CREDENTIALS"):
        assert is_secret_name(name), name
    for name in ("TOKENIZERS_PARALLELISM", "PATH", "SLURM_CONF", "HF_HUB_OFFLINE", "KEYBOARD"):
        assert not is_secret_name(name), name
    env = {"PATH": "/bin", "WANDB_API_KEY": "k" * 40, "SLURM_CONF": "/etc/slurm.conf", "SLURM_JOB_ID": "7",
           "SBATCH_PARTITION": "p", "SRUN_CPUS_PER_TASK": "2", "SALLOC_ACCOUNT": "a", "HOME": "/root"}
    assert submit_environment(env) == {"PATH": "/bin", "SLURM_CONF": "/etc/slurm.conf", "HOME": "/root"}
    with pytest.raises(SecretLeakError) as e:
        check_clean({"job.sbatch": "echo " + "k" * 40}, env)
    assert "WANDB_API_KEY" in str(e.value) and "k" * 40 not in str(e.value)
    check_clean({"job.sbatch": "echo $WANDB_API_KEY"}, env)  # the name is fine, only the value is refused


def test_cluster_config_is_strict_and_refuses_secrets_in_env(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("backend: slurm\nslurm: {partiton: gpu}\n")
    with pytest.raises(ConfigError, match="partiton.*did you mean 'slurm.partition'"):
        load_cluster_config(str(bad), [])
    with pytest.raises(ConfigError, match="must not carry secrets.*WANDB_API_KEY"):
        load_cluster_config(None, ["env={WANDB_API_KEY: x}"])
    with pytest.raises(ConfigError, match="time must look like"):
        load_cluster_config(None, ["resources.time=4h"])
    cfg = load_cluster_config(str(ROOT / "configs/cluster/slurm.yaml"), ["resources.nodes=2", "slurm.partition=gpu"])
    assert (cfg.resources.nodes, cfg.resources.gpus_per_node, cfg.slurm.partition) == (2, 8, "gpu")
    for name in ("ray", "k8s"):
        assert load_cluster_config(str(ROOT / f"configs/cluster/{name}.yaml"), []).backend == name


def test_submit_parses_stage_words_overrides_and_options_in_any_order(tmp_path):
    out = tessera("submit", "data", "ingest", "--config", "configs/data/tiny.yaml", "samples_per_shard=7",
                  "--array", "2", f"cluster.state_dir={tmp_path}", "--partition", "cpu", "--dry-run",
                  "cluster.slurm.array_overrides=['output=/d/part{index}']")
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --array=0-1" in out.stdout and "#SBATCH --partition=cpu" in out.stdout
    assert "tessera.cli data ingest --config" in out.stdout and '"output=/d/part${SLURM_ARRAY_TASK_ID}"' in out.stdout
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
    bad = tessera("submit", "train", "--config", TINY, "optim.lrr=1e-3", "--dry-run", f"cluster.state_dir={tmp_path}")
    assert bad.returncode == 2 and "'optim.lrr'" in bad.stderr and "'optim.lr'" in bad.stderr
    assert tessera("submit", "--config", TINY, "--dry-run").returncode == 2  # no stage


def test_a_secret_in_an_override_is_refused_by_name(tmp_path, monkeypatch):
    value = "wandb-secret-" + "9" * 20
    monkeypatch.setenv("WANDB_API_KEY", value)
    req = SubmitRequest(stage=["train"], config=TINY, overrides=[f"tracking.name={value}",
                                                                 f"cluster.state_dir={tmp_path}"], dry_run=True)
    buf = io.StringIO()
    with pytest.raises(SecretLeakError) as e:
        submit(req, buf)
    assert "WANDB_API_KEY" in str(e.value) and value not in str(e.value) and buf.getvalue() == ""


def test_records_are_found_by_id_backend_id_or_prefix(tmp_path):
    store = JobStore(tmp_path)
    for i, bid in enumerate(("101", "102")):
        rec = JobRecord(id=f"train-2026120{i}-000000-aaaaa{i}", backend="slurm", stage="train", backend_id=bid,
                        attempts=[Attempt(n=0, backend_id=bid)])
        store.create(rec, {"config.yaml": "a: 1\n"})
    assert store.find("102").id.endswith("aaaaa1") and store.find("train-20261201").backend_id == "102"
    with pytest.raises(ConfigError, match="ambiguous"):
        store.find("train-2026")
    with pytest.raises(ConfigError, match="no job"):
        store.find("nope")
    assert oct((tmp_path / store.all()[0].id / "record.json").stat().st_mode & 0o777) == "0o600"


def test_progress_probes_and_ray_addresses_come_from_the_resolved_config():
    run = {"run": {"root": "/r", "id": None}, "train": {"ckpt_root": None}}
    assert progress_paths(run, "job-1") == ["/r/job-1/checkpoints/latest"]
    assert progress_paths({"run": {"root": "s3://b/runs", "id": None}}, "job-1") == []  # not probeable from bash
    assert progress_paths({"output": "/data/out", "ray": {"address": None}}, None) == ["/data/out"]
    ingest = {"output": "/o", "ray": {"address": None, "num_cpus": None}, "dedup": {"exact": True}}
    assert ray_address_overrides(ingest) == ["ray.address=auto"]
    assert ray_address_overrides({"distribute": {"backend": "ray", "address": "ray://h:1"}}) == []  # user's own


def test_the_job_records_the_w_and_b_run_its_requeues_continue_unless_tracking_is_disabled():
    job = {"run": {"root": "/r", "id": None}, "tracking": {"project": "p", "entity": "e", "mode": "online"}}
    info = wandb_info(job, "team/job-1", "team-job-1-0a1b2c3d")  # the id is fixed at submit time (tracking.id)
    assert info["id"] == "team-job-1-0a1b2c3d" and info["url"].endswith("/e/p/runs/team-job-1-0a1b2c3d")
    assert wandb_info({**job, "tracking": {"project": "p", "mode": "disabled"}}, "job-1", "x") is None
    assert wandb_info(job, None, "x") is None


def test_ray_train_maps_a_workers_preemption_exit_to_75():
    assert exit_code(None) == 0
    try:
        try:
            raise SystemExit(75)
        except SystemExit as inner:
            raise RuntimeError("Training failed") from inner
    except RuntimeError as e:
        assert exit_code(e) == 75
    assert exit_code(RuntimeError("worker raised\nSystemExit: 75")) == 75
    assert exit_code(ValueError("boom")) == 1


def test_stage_and_backend_combinations_that_cannot_work_are_refused():
    from tessera.cluster.slurm import SlurmBackend
    from tessera.cluster.spec import JobSpec

    cfg = from_dict(ClusterConfig, {"resources": {"nodes": 2}}, "test")
    spec = JobSpec(id="data-ingest-1", stage=["data", "ingest"], stage_args=[], cluster=cfg, job_dir=ROOT,
                   submit_cwd="/")
    with pytest.raises(ConfigError, match="only training stages span nodes"):
        SlurmBackend().render(spec)
    spec = JobSpec(id="train-1", stage=["train"], stage_args=[], cluster=from_dict(ClusterConfig, {}, "test"),
                   job_dir=ROOT, submit_cwd="/", array=2)
    with pytest.raises(ConfigError, match="--array is for data stages"):
        SlurmBackend().render(spec)


def test_a_new_run_is_pinned_to_the_job_id_at_submit_time(tmp_path):
    from tessera.cluster.submit import build_spec, cluster_config

    state = f"cluster.state_dir={tmp_path}"
    req = SubmitRequest(stage=["train"], config=TINY, overrides=["run.id=null", state])
    spec = build_spec(req, cluster_config(req), JobStore(tmp_path))
    assert spec.run_id == spec.id and f"run.id={spec.id}" in spec.stage_args  # what every attempt is launched with
    assert f"run.id={spec.id}" in get_backend("slurm").render(spec)["job.sbatch"]
    named = SubmitRequest(stage=["train"], config=TINY, overrides=["run.id=mine", state])
    spec = build_spec(named, cluster_config(named), JobStore(tmp_path))
    assert spec.run_id == "mine" and not [a for a in spec.stage_args if a.startswith("run.id=")]  # continues its run


def test_the_shortest_submit_renders_a_gpu_job_from_the_packaged_cluster_config(tmp_path):
    """No --cluster: the defaults are configs/cluster/<backend>.yaml (GPUs, CPUs, time, grace), not a CPU job."""
    buf = io.StringIO()
    req = SubmitRequest(stage=["train"], config=TINY, overrides=[f"cluster.state_dir={tmp_path}"],
                        flags={"backend": "slurm"}, dry_run=True)
    submit(req, buf)
    script = buf.getvalue()
    for line in ("#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --time=24:00:00", "#SBATCH --signal=B:USR1@300", "export OMP_NUM_THREADS=8",
                 "export TESSERA_DIST_TIMEOUT_S=1800"):
        assert line in script, line
    k8s = SubmitRequest(stage=["train"], config=TINY, overrides=[f"cluster.state_dir={tmp_path}"],
                        flags={"backend": "k8s"}, dry_run=True)
    with pytest.raises(ConfigError, match="cluster.k8s.image is required.*Dockerfile"):
        submit(k8s, io.StringIO())


def test_after_takes_a_tessera_job_or_a_slurm_job_id(tmp_path):
    from tessera.cluster.submit import scheduler_dependency

    store = JobStore(tmp_path)
    store.create(JobRecord(id="train-20261201-000000-aaaaaa", backend="slurm", stage="train", backend_id="777"),
                 {"config.yaml": "a: 1\n"})
    store.create(JobRecord(id="data-ingest-20261201-000000-bbbbbb", backend="ray", stage="data ingest",
                           backend_id="data-ingest-20261201-000000-bbbbbb-a0"), {"config.yaml": "a: 1\n"})
    assert scheduler_dependency("train-20261201", "slurm", store) == "777"  # a Tessera job, by prefix
    assert scheduler_dependency("4242", "slurm", store) == "4242"  # submitted with plain sbatch
    assert scheduler_dependency("4242_3", "slurm", store) == "4242_3"  # one array task
    with pytest.raises(ConfigError, match="no Tessera job of that id.*not a Slurm job id"):
        scheduler_dependency("train-2025", "slurm", store)
    with pytest.raises(ConfigError, match="runs on ray, this one on slurm"):
        scheduler_dependency("data-ingest", "slurm", store)
    buf = io.StringIO()
    submit(SubmitRequest(stage=["train"], config=TINY, overrides=[f"cluster.state_dir={tmp_path}"], after="4242",
                         flags={"backend": "slurm"}, dry_run=True), buf)
    assert "#SBATCH --dependency=afterok:4242\n#SBATCH --kill-on-invalid-dep=yes" in buf.getvalue()


def test_jobs_print_json_for_scripts(tmp_path):
    import json

    store = JobStore(tmp_path)
    store.create(JobRecord(id="train-20261201-000000-aaaaaa", backend="slurm", stage="train", backend_id="777",
                           state="COMPLETED", attempts=[Attempt(n=0, backend_id="777", exit_code=0, action="done")]),
                 {"config.yaml": "a: 1\n"})
    store.create(JobRecord(id="train-20261201-000001-cccccc", backend="k8s", stage="train", state="WRITTEN",
                           backend_id="pytorchjob/tessera-train", endpoint="ml"), {"config.yaml": "a: 1\n"})
    listed = json.loads(tessera("jobs", "ls", "--state-dir", str(tmp_path), "--json").stdout)
    assert [(r["id"][-6:], r["state"]) for r in listed] == [("aaaaaa", "COMPLETED"), ("cccccc", "WRITTEN")]
    status = json.loads(tessera("jobs", "status", "--state-dir", str(tmp_path), "777", "--json").stdout)
    assert status["attempts"][0]["exit_code"] == 0 and status["backend_id"] == "777"
    done = json.loads(tessera("jobs", "cancel", "--state-dir", str(tmp_path), "777", "--json").stdout)
    assert done == {"id": "train-20261201-000000-aaaaaa", "backend_id": "777", "cancelled": False,
                    "state": "COMPLETED"}
    assert json.loads(tessera("jobs", "status", "--state-dir", str(tmp_path), "train-20261201-000001",
                              "--json").stdout)["state"] == "WRITTEN"
