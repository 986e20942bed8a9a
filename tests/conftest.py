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


def pytest_collection_modifyitems(config, items):
    """Run the multi-process DeepSpeed tests first: they are the slowest, so failures surface early and the
    two workers of ``make test`` (pytest-xdist, ``--dist loadfile``: each test file is one unit of work, so its
    module fixtures, such as the resume tests' reference runs, are built once) end together."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("distributed") else 1)
