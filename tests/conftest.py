"""Session-wide test setup: offline hubs, offline W&B, the loopback S3 server fixtures."""

import os

# Before anything imports transformers/wandb/deepspeed: no hub, no telemetry, CPU accelerator by detection.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_SILENT", "true")
if not os.environ.get("WANDB_API_KEY"):
    os.environ.setdefault("WANDB_MODE", "offline")

pytest_plugins = ["tests.fixtures.s3"]


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """One small embedded Ray runtime for the whole session (2 CPUs, 200 MB object store, no dashboard).

    Ray allows one runtime per driver process, so every test that needs Ray shares this one. Its own temp dir
    (short: Ray's socket paths) keeps the two test workers' runtimes apart.
    """
    import shutil
    import tempfile
    from pathlib import Path

    import ray

    root = str(Path(__file__).resolve().parents[1])
    temp_dir = tempfile.mkdtemp(prefix="tsr-rs-", dir="/tmp")
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": root}}, _temp_dir=temp_dir)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


# Seconds each of the slowest test files took in ``make test`` (3 workers, idle machine, 2026-12-07; junit times).
# ``--dist loadfile`` hands files to the workers in collection order, so the longest go first (LPT): with the
# slowest files last, the suite ended on a tail of one worker (1716 s simulated from these times against 1642 s).
FILE_SECONDS = {
    "tests/finetune/test_runs.py": 712, "tests/test_quickstart.py": 481, "tests/trainer/test_train.py": 469,
    "tests/trainer/test_resume.py": 391, "tests/distill/test_runs.py": 349, "tests/cluster/test_slurm.py": 326,
    "tests/trainer/test_checkpoint_scale.py": 249, "tests/trainer/test_control_train.py": 166,
    "tests/trainer/data/test_train_s3.py": 142, "tests/cluster/test_ray_jobs.py": 125,
    "tests/trainer/test_lora_train.py": 117, "tests/trainer/test_sharded_grids.py": 111,
    "tests/evaluation/test_suite.py": 98, "tests/data_pipeline/test_condition.py": 96,
    "tests/data_pipeline/test_ray_executor.py": 90, "tests/trainer/test_probes.py": 88,
    "tests/cluster/test_ray_loopback.py": 79, "tests/tessera/test_tracking.py": 61,
    "tests/trainer/test_train_launch.py": 52, "tests/trainer/test_zero_state.py": 51,
}


def pytest_collection_modifyitems(config, items):
    """The slowest test files first (``FILE_SECONDS``), then the multi-process DeepSpeed tests, then the rest in
    collection order: failures of the long end-to-end runs surface early, and the workers of ``make test``
    (pytest-xdist, ``--dist loadfile``: each file is one unit of work, so its module fixtures, such as the resume
    tests' reference runs, are built once) end together. The sort is stable and the same on every worker."""
    root = config.rootpath

    def key(item):
        rel = item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else str(item.path)
        return -FILE_SECONDS.get(rel, 0), 0 if item.get_closest_marker("distributed") else 1

    items.sort(key=key)
