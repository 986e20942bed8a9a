"""Golden files of everything ``tessera submit`` renders: sbatch scripts, Ray job requests, Kubernetes manifests.

A change to a template shows up as a reviewed diff of these files. Regenerate them with
``TESSERA_UPDATE_GOLDEN=1 pytest tests/cluster/test_golden.py`` and read the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tessera.cluster.backend import get_backend
from tessera.cluster.config import ClusterConfig
from tessera.config import from_dict
from tessera.cluster.spec import JobSpec

GOLDEN = Path(__file__).parent / "golden"
STATE = Path("/shared/tessera/jobs")
RESOLVED = "# config_hash: 0123\nrun:\n  root: /shared/runs\n  id: null\n"


def spec(stage: list[str], job_id: str, cluster: dict, **kw) -> JobSpec:
    """A fixed job: no clock, no random id, no machine paths (the interpreter and secrets file are pinned)."""
    base = {"python": "/opt/tessera/bin/python", "secrets": ["WANDB_API_KEY", "AWS_ACCESS_KEY_ID",
                                                               "AWS_SECRET_ACCESS_KEY"],
            "state_dir": str(STATE), "k8s": {"image": "registry.example.com/tessera:0.1.0", "ray_version": "2.60.0"}}
    slurm = {"secrets_file": "/home/ada/.tessera/secrets.env", **cluster.pop("slurm", {})}
    cfg = from_dict(ClusterConfig, {**base, **cluster, "slurm": slurm}, "golden")
    run = {"run_id": job_id, "wandb": {"id": job_id}} if stage[0] == "train" else {}
    progress = [f"/shared/runs/{job_id}/checkpoints/latest"] if stage[0] == "train" else ["/shared/data/out"]
    args = [f"run.id={job_id}"] if stage[0] == "train" else []
    return JobSpec(id=job_id, stage=stage, stage_args=args + kw.pop("extra", []), cluster=cfg,
                   job_dir=STATE / job_id, submit_cwd="/home/ada/project", config_text=RESOLVED,
                   progress_paths=progress, **run, **kw)


CASES = {
    "train_1node_cpu.sbatch": (["train"], "train-20261202-120000-a1b2c3", {}, {}),
    "train_2nodes_4gpus_after.sbatch": (
        ["train"], "train-20261202-120100-d4e5f6",
        {"resources": {"nodes": 2, "gpus_per_node": 4, "cpus_per_task": 8, "mem_gb": 200, "time": "04:00:00"},
         "slurm": {"partition": "gpu", "account": "proj42", "qos": "high", "extra_sbatch": ["--constraint=a100"]},
         "env": {"NCCL_DEBUG": "WARN"}, "retry": {"preemptions": 5, "crashes": 1}},
        {"after": "12345"}),
    "train_2nodes_8gpus_bind.sbatch": (
        ["train"], "train-20261202-120200-0a0b0c",
        {"resources": {"nodes": 2, "gpus_per_node": 8, "cpus_per_task": 12},
         "slurm": {"gpu_bind": "closest", "srun_args": ["--distribution=block:block"]},
         "distributed": {"timeout_s": 600, "env": {"NCCL_DEBUG": None, "NCCL_SOCKET_IFNAME": "ib0"}}}, {}),
    "ingest_array.sbatch": (
        ["data", "ingest"], "data-ingest-20261202-120300-abcdef",
        {"resources": {"cpus_per_task": 16, "time": "1-00:00:00"},
         "slurm": {"array_overrides": ["output=/shared/data/out/part{index}", "seed={index}"]}}, {"array": 4}),
    "eval_after.sbatch": (
        ["eval"], "eval-20261202-120400-fedcba", {"resources": {"gpus_per_node": 1}},
        {"after": "12346", "extra": ["--checkpoint", "/shared/runs/train-20261202-120100-d4e5f6"]}),
    "ingest_ray.json": (["data", "ingest"], "data-ingest-20261202-120500-111111",
                        {"backend": "ray", "ray": {"address": "http://127.0.0.1:8265"}},
                        {"extra": ["ray.address=auto"]}),
    "train_ray.json": (["train"], "train-20261202-120600-222222",
                       {"backend": "ray", "workdir": "/shared/project", "resources": {"nodes": 2, "gpus_per_node": 4}},
                       {}),
    "train_pytorchjob.yaml": (["train"], "train-20261202-120700-333333",
                              {"backend": "k8s", "resources": {"nodes": 2, "gpus_per_node": 4, "time": "12:00:00"},
                               "k8s": {"image": "registry.example.com/tessera:0.1.0", "volume_claim": "tessera-runs",
                                       "namespace": "ml"}}, {}),
    "ingest_rayjob.yaml": (["data", "ingest"], "data-ingest-20261202-120800-444444",
                           {"backend": "k8s", "resources": {"nodes": 3},
                            "k8s": {"image": "registry.example.com/tessera:0.1.0", "ray_version": "2.60.0",
                                    "service_account": "tessera"}},
                           {"extra": ["ray.address=auto"]}),
}


def rendered(name: str) -> str:
    """The one artefact the backend renders for case ``name``."""
    stage, job_id, cluster, kw = CASES[name]
    s = spec(stage, job_id, {k: (dict(v) if isinstance(v, dict) else v) for k, v in cluster.items()}, **dict(kw))
    (text,) = get_backend(s.cluster.backend).render(s).values()
    return text


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_artefacts_match_their_golden_files(name):
    text = rendered(name)
    path = GOLDEN / name
    if os.environ.get("TESSERA_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}: run with TESSERA_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{name} differs from its golden file (TESSERA_UPDATE_GOLDEN=1 rewrites it)"


def test_the_sbatch_script_is_valid_bash_with_the_preemption_contract():
    import subprocess

    for name in [n for n in CASES if n.endswith(".sbatch")]:
        text = rendered(name)
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0, name
        for needed in ("--requeue", "--open-mode=append", "--signal=B:USR1@", "srun --kill-on-bad-exit=1",
                       "scontrol requeue", 'trap \'forward USR1\' USR1', "scontrol show hostnames"):
            assert needed in text, f"{name} lacks {needed!r}"
    chained = rendered("train_2nodes_4gpus_after.sbatch")
    assert "--dependency=afterok:12345" in chained and "--kill-on-invalid-dep=yes" in chained


def _secrets_preamble(secrets_file: Path) -> str:
    """The part of a rendered sbatch script that reads the secrets file and reports the secrets by name."""
    s = spec(["train"], "train-20261202-121000-999999", {"slurm": {"secrets_file": str(secrets_file)}})
    (text,) = get_backend("slurm").render(s).values()
    return text[text.index("SECRETS_FILE="):text.index("# Rendezvous")] + 'echo "WANDB=${WANDB_API_KEY:-}"\n'


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_the_job_sources_the_secrets_file_only_when_it_is_private(tmp_path, mode):
    import subprocess

    path = tmp_path / "secrets.env"
    path.write_text("WANDB_API_KEY=canary-preamble-5e1f\n")
    path.chmod(mode)
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "AWS_ACCESS_KEY_ID",
                                                             "AWS_SECRET_ACCESS_KEY")}
    out = subprocess.run(["bash", "-c", _secrets_preamble(path)], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    if mode == 0o600:
        assert "WANDB=canary-preamble-5e1f" in out.stdout and "secret WANDB_API_KEY: set" in out.stdout
    else:  # world-readable: refused by name and mode, and nothing from it reaches the environment
        assert f"not reading {path}: mode 644, it must be 600" in out.stderr
        assert "WANDB=\n" in out.stdout and "secret WANDB_API_KEY: not set" in out.stdout


def test_each_rank_gets_its_cpus_threads_and_the_process_group_settings():
    """srun is given --cpus-per-task itself (Slurm >= 22.05 does not pass sbatch's on), ranks are bound to their
    cores with matching OMP threads, and training gets the NCCL defaults and timeout, changed by the config."""
    text = rendered("train_2nodes_8gpus_bind.sbatch")
    (srun,) = [line for line in text.splitlines() if line.startswith("srun ")]
    assert "--ntasks-per-node=8 --cpus-per-task=12 --cpu-bind=cores --gpu-bind=closest" in srun
    assert "--distribution=block:block" in srun and "torch.distributed.run" not in text
    exports = dict(line.removeprefix("export ").split("=", 1) for line in text.splitlines()
                   if line.startswith("export ") and "=" in line and " " not in line.removeprefix("export "))
    assert exports["OMP_NUM_THREADS"] == "12" and exports["TESSERA_DIST_TIMEOUT_S"] == "600"
    assert exports["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and exports["NCCL_SOCKET_IFNAME"] == "ib0"
    assert "NCCL_DEBUG" not in exports  # a null in distributed.env drops that default
    data = rendered("ingest_array.sbatch")  # one task with its CPUs, no process-group settings
    assert "--ntasks=1 --cpus-per-task=16 --cpu-bind=cores" in data and "NCCL" not in data


def test_torchrun_is_refused_with_the_reason():
    from tessera.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="one srun task per rank.*dies on the time-limit SIGUSR1"):
        load_config(ClusterConfig, None, ["slurm.launcher=torchrun"])
