"""Ray executor: byte-identical to the local executor, and a worker killed mid-task is retried harmlessly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tessera.data_pipeline.executors import RayConfig, RayExecutor
from tessera.data_pipeline.ingest import run_ingest
from tessera.data_pipeline.inspect_verify import verify_dataset
from tests.data_pipeline.test_ingest import check_dataset, make_config, make_folder, outputs, tar_samples

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # Ray start-up alone is 5-20 s on 2 shared cores


@pytest.fixture(scope="session")
def ray_runtime(ray_session):
    """The session's shared Ray runtime (tests/conftest.py)."""
    return ray_session


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> tuple[Path, dict, Path]:
    """(input folder, expected outcomes, local-executor output) to compare Ray against."""
    src = tmp_path_factory.mktemp("ray_src")
    expected = make_folder(src)
    out = tmp_path_factory.mktemp("ray_local") / "ds"
    run_ingest(make_config(src, out))
    return src, expected, out


def test_ray_output_is_byte_identical_to_local(ray_runtime, local_run, tmp_path):
    src, expected, local_out = local_run
    m = run_ingest(make_config(src, tmp_path / "ds", executor="ray", max_task_retries=2))
    assert outputs(tmp_path / "ds") == outputs(local_out)
    assert m["shards"] == json.loads((local_out / "manifest.json").read_text())["shards"]
    check_dataset(tmp_path / "ds", expected)


def _die_once(fn, marker: str):
    """Wrap a task so that the first attempt to reach its attempt marker kills its worker (os._exit)."""

    def wrapped(task):
        import tessera.data_pipeline.ingest as ing

        if not getattr(ing._mark_attempt, "_die_once", False):
            mark = ing._mark_attempt

            def mark_then_die(out, n, phase):
                mark(out, n, phase)
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    return
                os._exit(1)  # a hard worker death mid-task, after the staging work began

            mark_then_die._die_once = True
            ing._mark_attempt = mark_then_die
        return fn(task)

    wrapped.__name__ = fn.__name__
    return wrapped


class _DieOnceRay(RayExecutor):
    def __init__(self, marker: str) -> None:
        super().__init__(RayConfig(), max_retries=2)
        self.marker = marker

    def map(self, fn, tasks):
        return super().map(_die_once(fn, self.marker), tasks)


def test_worker_killed_once_still_gives_complete_duplicate_free_dataset(ray_runtime, local_run, tmp_path):
    src, expected, local_out = local_run
    marker = str(tmp_path / "died")
    m = run_ingest(make_config(src, tmp_path / "ds", executor="ray", max_task_retries=2),
                   executor=_DieOnceRay(marker))
    assert os.path.exists(marker)  # a worker really died
    assert m["retries"] >= 1
    assert outputs(tmp_path / "ds") == outputs(local_out)
    check_dataset(tmp_path / "ds", expected)
    problems, _ = verify_dataset(str(tmp_path / "ds"))
    assert problems == []
    keys, shas = [], []
    for s in m["shards"]:
        metas = tar_samples(str(tmp_path / "ds" / s["name"]))
        keys += list(metas)
        shas += [v["sha256"] for v in metas.values()]
    assert len(keys) == len(set(keys)) == len(set(shas)) == m["totals"]["written"]


def test_embedded_ray_binds_dashboard_to_loopback(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    RayExecutor(RayConfig(num_cpus=3, object_store_memory_mb=100), max_retries=1)
    RayExecutor(RayConfig(address="ray://head:10001"), max_retries=1)
    assert calls == [
        {"address": "local", "num_cpus": 3, "include_dashboard": False, "dashboard_host": "127.0.0.1",
         "object_store_memory": 100 * 2**20, "_node_ip_address": "127.0.0.1", "log_to_driver": False},
        {"address": "ray://head:10001", "log_to_driver": False},
    ]
