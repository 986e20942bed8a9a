"""A real Ray head (``ray start --head --block``) on 127.0.0.1 for the Jobs API, stopped by its PID.

Never ``ray stop``: it ends every Ray process on the machine. The head gets its own ``--temp-dir``, so its
address file does not make other processes' ``ray.init()`` attach to it; Ray's single-node mode keeps every
server on loopback; token authentication is on (``RAY_AUTH_MODE=token``, the token in ``~/.ray/auth_token``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """``start()`` / ``stop()``; ``address`` is the Jobs API (dashboard) URL."""

    def __init__(self, num_cpus: int = 2) -> None:
        self.num_cpus = num_cpus
        self.temp_dir = Path(tempfile.mkdtemp(prefix="tsr-ray-", dir="/tmp"))  # short: Ray's socket paths
        self.dashboard_port = _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.proc: subprocess.Popen | None = None
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                        RAY_USAGE_STATS_ENABLED="0")
        self.env.pop("RAY_ADDRESS", None)

    def start(self, timeout: float = 120) -> None:
        """Start the head and wait until the Jobs API answers."""
        ray = str(Path(sys.executable).with_name("ray"))
        argv = [ray, "start", "--head", "--block", f"--temp-dir={self.temp_dir}", "--node-ip-address=127.0.0.1",
                f"--port={_free_port()}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", f"--num-cpus={self.num_cpus}",
                f"--object-store-memory={200 * 2**20}", "--disable-usage-stats",
                # Not Ray's fixed defaults (52365, ...): another Ray on this machine may hold them.
                f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
        self.log = open(self.temp_dir / "ray-start.log", "w")
        self.proc = subprocess.Popen(argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: {self.temp_dir / 'ray-start.log'}")
            try:
                # The Jobs API needs the head's agent as well: a job listing answers once both are up.
                if requests.get(f"{self.address}/api/jobs/", headers=self.auth, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the Ray head did not answer at {self.address} within {timeout} s")

    @property
    def auth(self) -> dict[str, str]:
        """The token header (``ray start`` creates ``~/.ray/auth_token`` when there is none)."""
        token = Path.home() / ".ray" / "auth_token"
        return {"Authorization": f"Bearer {token.read_text().strip()}"} if token.exists() else {}

    def processes(self) -> list[psutil.Process]:
        """The head's process tree (``ray start`` and everything it started)."""
        try:
            p = psutil.Process(self.proc.pid)
            return [p, *p.children(recursive=True)]
        except (psutil.NoSuchProcess, AttributeError):
            return []

    def stop(self) -> None:
        """SIGTERM ``ray start --block`` (it stops what it started), then SIGKILL any process of the tree left."""
        procs = self.processes()
        if self.proc is not None and self.proc.poll() is not None:  # it died during the session: keep its logs
            kept = Path(tempfile.mkdtemp(prefix="tsr-ray-died-", dir="/tmp"))
            shutil.copytree(self.temp_dir, kept / "head", ignore=shutil.ignore_patterns("*.sock", "sockets"),
                            ignore_dangling_symlinks=True, dirs_exist_ok=True)
            print(f"the Ray head exited {self.proc.returncode} during the session; its logs: {kept}", file=sys.stderr)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
