"""A real single-node Slurm (Debian's slurm-wlm and munge) in a temporary directory, stopped by PID.

munged, slurmctld and slurmd run from a config written here: this host at 127.0.0.1, ``auth/munge`` through
a private munge socket, ``proctrack/linuxproc``, ``task/affinity``, ``select/cons_tres``, no accounting, free
ports, and a node with this machine's CPUs and memory. Clients find it through ``SLURM_CONF``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

DAEMONS = ("munged", "slurmctld", "slurmd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_available() -> str | None:
    """None when every Slurm and munge program is installed, else what is missing."""
    missing = [p for p in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
               if not shutil.which(p) and not os.path.exists(f"/usr/sbin/{p}")]
    return ", ".join(missing) or None


class SlurmCluster:
    """Start with ``start()``, stop with ``stop()``; ``env`` is what a client needs (``SLURM_CONF``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.host = socket.gethostname()
        self.procs: dict[str, int] = {}

    @property
    def env(self) -> dict[str, str]:
        """Environment variables for sbatch/scontrol/squeue/scancel and for the jobs."""
        return {"SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        mem_mb = int(psutil.virtual_memory().total / 2**20 * 0.9)
        self.conf.write_text("\n".join([
            "ClusterName=tessera-test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            # cred_expire also sets how long Slurm holds a requeued job before it may start again (default 120 s).
            "AuthType=auth/munge", f"AuthInfo=socket={r / 'munge' / 'munge.socket'},cred_expire=10",
            "CredType=cred/munge",
            # task/affinity binds each task to its CPUs, as production sites do (task/affinity or task/cgroup):
            # a rank's sched_getaffinity then shows the CPUs srun gave it.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/affinity", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "MpiDefault=none", "ReturnToService=2",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none", "MinJobAge=3600", "KillWait=10", "SchedulerParameters=sched_interval=2",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={mem_mb} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
            ""]))

    def start(self, timeout: float = 60) -> None:
        """Start munged, slurmctld and slurmd, then wait until the node is idle."""
        self._write_config()
        r = self.root
        munged = subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={r / 'munge' / 'munge.socket'}",
             f"--key-file={r / 'munge' / 'munge.key'}", f"--pid-file={r / 'munge' / 'munged.pid'}",
             f"--log-file={r / 'log' / 'munged.log'}", f"--seed-file={r / 'munge' / 'munge.seed'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.procs["munged"] = munged.pid
        self._wait(lambda: (r / "munge" / "munge.socket").exists(), timeout, "munged")
        for name in ("slurmctld", "slurmd"):
            p = subprocess.Popen([name, "-D", "-f", str(self.conf)], stdout=subprocess.DEVNULL,
                                 stderr=open(r / "log" / f"{name}.stderr", "w"), start_new_session=True,
                                 env=dict(os.environ, **self.env))
            self.procs[name] = p.pid
        self._wait(self._node_idle, timeout, "the Slurm node")

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True,
                             env=dict(os.environ, **self.env), timeout=30)
        return out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, pid in self.procs.items():
                if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    raise RuntimeError(f"{name} exited; see {self.root / 'log'}")
            if ready():
                return
            time.sleep(0.25)
        raise TimeoutError(f"{what} not ready after {timeout} s; see {self.root / 'log'}")

    def stop(self) -> None:
        """SIGTERM each daemon (and the job processes it started) by PID, then SIGKILL what is left."""
        procs = []
        for pid in self.procs.values():
            try:
                p = psutil.Process(pid)
                procs += [p, *p.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        self.procs.clear()
