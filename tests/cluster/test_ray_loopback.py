"""The one Ray bootstrap (``tessera.ray_runtime.ensure_ray``): an embedded runtime listens on loopback only and
keeps token authentication on, even when the environment asks otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil

from tests.cluster.conftest import ROOT

LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def test_an_embedded_ray_ingest_listens_on_loopback_only(tmp_path):
    """Sample the listening sockets of every process of a running ``executor: ray`` ingest (the case that bound
    ``*`` and ``0.0.0.0`` before) until it ends."""
    cfg = tmp_path / "ingest.yaml"
    cfg.write_text(f"sources: [{{name: emoji, limit: 48}}]\noutput: {tmp_path / 'out'}\nsamples_per_shard: 8\n"
                   "executor: ray\nray: {num_cpus: 2, object_store_memory_mb: 100}\n"
                   "process: {min_side: 32, image_format: png, buckets: {base_resolution: 32, multiple: 16}}\n")
    env = dict(os.environ, TESSERA_NO_PROGRESS="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "tessera.cli", "data", "ingest", "--config", str(cfg)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[str, set] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        for p in [root, *root.children(recursive=True)]:
            try:
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        seen.setdefault(p.name(), set()).add(c.laddr.ip)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        time.sleep(0.1)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "gcs_server" in seen and "raylet" in seen, seen  # the run was sampled while Ray was up
    assert all(ip in LOOPBACK for ips in seen.values() for ip in ips), seen


PROBE = """
import json, os, ray
from ray._private import ray_constants
from ray._raylet import AuthenticationMode, get_authentication_mode
from tessera.ray_runtime import RayConfig, ensure_ray
assert ensure_ray(RayConfig(num_cpus=1, object_store_memory_mb=80))
node_ip = ray._private.worker._global_node.node_ip_address
out = {"token": get_authentication_mode() == AuthenticationMode.TOKEN, "node_ip": node_ip,
       "single_node_env": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"),
       "cluster_mode_restored": ray_constants.ENABLE_RAY_CLUSTER,
       "task": ray.get(ray.remote(lambda: 41 + 1).remote())}
ray.shutdown()
print(json.dumps(out))
"""


def test_the_embedded_runtime_keeps_token_authentication_on_and_restores_the_process_settings():
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"token": True, "node_ip": "127.0.0.1", "single_node_env": None, "cluster_mode_restored": True,
                   "task": 42}
    assert "keeps token authentication on" in out.stderr
