"""How a training job's ranks are launched: the process-group timeout the trainer reads from the job, and how Ray
Train workers are sized and placed (from the cluster config and the cluster's resources, never from the driver's
own device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tessera.cluster.config import ClusterConfig
from tessera.cluster.ray_jobs import ray_train_args
from tessera.cluster.ray_train import parse_args
from tessera.config import from_dict
from tessera.trainer.launch import RayScaling, free_port, scaling_config_kwargs
from tests.cluster.conftest import ROOT

PROBE = """
import json, torch
from tessera.trainer.distributed import DistEnv, init_distributed
init_distributed(DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port={port}))
pg = torch.distributed.distributed_c10d._get_default_group()
print(json.dumps(pg._get_backend(torch.device("cpu")).options._timeout.total_seconds()))
"""


@pytest.mark.parametrize("value,expected", [("123", 123.0), ("", 600.0)])
def test_the_process_group_takes_its_timeout_from_the_job(value, expected):
    """``TESSERA_DIST_TIMEOUT_S`` (rendered from ``cluster.distributed.timeout_s``) reaches the real process group;
    unset, DeepSpeed's default (10 minutes) stays."""
    env = dict(os.environ, TESSERA_DIST_TIMEOUT_S=value, DS_ACCELERATOR="cpu")
    out = subprocess.run([sys.executable, "-c", PROBE.replace("{port}", str(free_port()))], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


def test_a_bad_timeout_is_an_error_naming_the_variable(monkeypatch):
    from tessera.trainer.distributed import dist_timeout

    monkeypatch.setenv("TESSERA_DIST_TIMEOUT_S", "30m")
    with pytest.raises(ValueError, match="TESSERA_DIST_TIMEOUT_S must be a positive number of seconds, got '30m'"):
        dist_timeout()


def _scaling(cluster: dict) -> RayScaling:
    """What the Ray job's driver parses from the entrypoint ``tessera submit`` renders for ``cluster``."""
    args = parse_args([*ray_train_args(from_dict(ClusterConfig, cluster, "test")), "--", "train"])
    return RayScaling(workers=args.workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
                      resources=dict(args.resource), placement_strategy=args.placement_strategy)


def test_ray_train_gpus_come_from_the_config_or_the_cluster_never_from_the_driver():
    from ray.train import ScalingConfig

    head_only = {"CPU": 8.0}  # what the driver's node offers: no GPU (as on this machine)
    gpu_cluster = {"CPU": 128.0, "GPU": 16.0}
    gpus = _scaling({"resources": {"nodes": 2, "gpus_per_node": 8, "cpus_per_task": 10},
                     "ray": {"train_resources_per_worker": {"accelerator_type:H100": 0.001},
                             "train_placement_strategy": "SPREAD"}})
    kw = scaling_config_kwargs(gpus, head_only)  # the config says GPUs: the head's lack of one does not matter
    assert kw == {"num_workers": 16, "use_gpu": True, "placement_strategy": "SPREAD",
                  "resources_per_worker": {"CPU": 10.0, "GPU": 1, "accelerator_type:H100": 0.001}}
    ScalingConfig(**kw)  # Ray accepts them
    auto = _scaling({"resources": {"nodes": 2}})  # no GPUs configured: the cluster's resources decide
    assert scaling_config_kwargs(auto, gpu_cluster)["use_gpu"] is True
    assert scaling_config_kwargs(auto, head_only) == {"num_workers": 2, "use_gpu": False, "placement_strategy": "PACK",
                                                     "resources_per_worker": None}
    off = _scaling({"resources": {"gpus_per_node": 8}, "ray": {"train_use_gpu": "off"}})
    assert scaling_config_kwargs(off, gpu_cluster)["use_gpu"] is False
