"""Launchers: ``--nproc N`` local ranks and Ray Train workers (each rank then reads its place in the job from
its environment, ``trainer.distributed.detect_env``)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("tessera.launch")


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(argv: list[str], nproc: int) -> int:
    """Run ``python -m trainer.cli <argv>`` as ``nproc`` local ranks; forward SIGTERM/SIGUSR1; return the exit code.

    The first non-zero exit code wins (so the preemption code propagates); when one rank dies the others
    are terminated rather than left hanging in a collective. Without an explicit OMP_NUM_THREADS each rank gets
    cores / nproc threads, as torchrun does: 2 ranks x 2 threads on 2 cores ran ~15% slower than 2 x 1.
    """
    port = free_port()
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, len(os.sched_getaffinity(0)) // max(1, nproc)))
    procs = []
    for r in range(nproc):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r), OMP_NUM_THREADS=threads,
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "tessera.cli", *argv], env=env))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        code = 0
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed and not code:
                code = failed[0]
                # Peers of a preempted rank are finishing the same collective save; give them a grace
                # period to exit on their own before tearing down ranks stuck in a collective.
                deadline = time.time() + 30
                while time.time() < deadline and any(p.poll() is None for p in procs):
                    time.sleep(0.2)
                for p in procs:
                    if p.poll() is None:
                        log.error("rank exited with %s; terminating the other ranks", code)
                        p.terminate()
            time.sleep(0.2)
        codes = [p.returncode for p in procs]
        return code or next((c for c in codes if c != 0), 0)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def ray_train_loop(config: dict) -> None:
    """Per-worker entry for Ray Train's ``TorchTrainer(train_loop_per_worker=ray_train_loop, train_loop_config=cfg)``.

    Ray Train has already started the process group (gloo on CPU, NCCL on GPU); ``detect_env`` reads the
    rank layout from it, and DeepSpeed reuses the group.
    """
    # Imported here: the process that only spawns ranks (``spawn_local``) stays free of torch and DeepSpeed.
    from tessera.config import from_dict
    from tessera.trainer.config import TrainJobConfig
    from tessera.trainer.grids import TrainHooks
    from tessera.trainer.loop import train

    make_hooks, notice = config.pop("_make_hooks", None), config.pop("_preemption_notice", None)
    cfg = from_dict(TrainJobConfig, config, "ray train_loop_config")
    hooks = make_hooks(cfg) if make_hooks else TrainHooks()
    if notice:
        hooks.preemption = _notice_reader(notice)
    code = train(cfg, hooks)
    if code != 0:
        raise SystemExit(code)


class PreemptionNotice:
    """A named Ray actor holding the signal the Ray Train driver received. Ray Train runs the training function
    off its worker's main thread, where Python cannot install a signal handler, and a preempted node's driver is
    the process that gets SIGTERM: the driver records it here and every worker's loop polls it (once a second),
    then finishes the step, checkpoints and exits 75 as under any other launcher."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def set(self, signum: int) -> None:
        """Record the signal."""
        self.signum = signum

    def get(self) -> int | None:
        """The recorded signal, if any."""
        return self.signum


def _notice_reader(name: str):
    import ray

    actor = ray.get_actor(name)
    return lambda: ray.get(actor.get.remote(), timeout=30)


@dataclass
class RayTrainOutcome:
    """How a Ray Train fit ended: ``error`` is None when it finished, else the workers' failure (a worker that
    checkpointed on preemption failed with ``SystemExit(75)``; ``cluster.ray_train.exit_code`` reads it)."""

    error: BaseException | None


@dataclass
class RayScaling:
    """Where Ray Train puts the workers (``tessera submit`` fills it from the cluster config)."""

    workers: int
    use_gpu: str = "auto"  # on | off | auto: GPUs when the Ray cluster has any
    cpus_per_worker: float | None = None
    resources: dict[str, float] = field(default_factory=dict)  # more per-worker resources (custom ones too)
    placement_strategy: str = "PACK"


def scaling_config_kwargs(s: RayScaling, cluster_resources: dict[str, float]) -> dict:
    """``ScalingConfig`` arguments. GPU use comes from the config or from the cluster's resources, never from this
    process's own device: a Ray job's driver runs on a head node that usually has no GPU."""
    if s.use_gpu not in ("on", "off", "auto"):
        raise ValueError(f"use_gpu must be on, off or auto, got {s.use_gpu!r}")
    use_gpu = s.use_gpu == "on" or (s.use_gpu == "auto" and cluster_resources.get("GPU", 0) > 0)
    per_worker = {"CPU": s.cpus_per_worker} if s.cpus_per_worker else {}
    per_worker.update({"GPU": 1} if use_gpu else {})
    per_worker.update(s.resources)
    return {"num_workers": s.workers, "use_gpu": use_gpu, "resources_per_worker": per_worker or None,
            "placement_strategy": s.placement_strategy}


def run_on_ray(cfg, scaling: RayScaling | int, make_hooks=None) -> RayTrainOutcome:
    """Train ``cfg`` on Ray Train workers (one rank and, on GPUs, one GPU each), placed as ``scaling`` says (an
    int: that many workers, GPUs if the cluster has them).

    ``make_hooks(cfg) -> TrainHooks`` (picklable) builds in-training evaluation on each worker."""
    import ray
    from ray.train import ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from tessera.config import to_dict
    from tessera.ray_runtime import RayConfig, ensure_ray
    from tessera.trainer.distributed import dist_timeout

    scaling = RayScaling(workers=scaling) if isinstance(scaling, int) else scaling
    # A Ray job's driver joins its cluster (RAY_ADDRESS); else the embedded loopback runtime.
    started = ensure_ray(RayConfig(address=os.environ.get("RAY_ADDRESS") or None))
    name = f"tessera-preemption-{os.getpid()}-{time.time_ns()}"
    notice = ray.remote(num_cpus=0)(PreemptionNotice).options(name=name).remote()

    def forward(signum, _frame):
        log.warning("received %s: asking the Ray Train workers to checkpoint and exit 75", signal.Signals(signum).name)
        notice.set.remote(signum)

    kwargs = scaling_config_kwargs(scaling, ray.cluster_resources())
    log.info("Ray Train: %d workers, GPUs %s, %s per worker, placement %s", kwargs["num_workers"],
             "on" if kwargs["use_gpu"] else "off", kwargs["resources_per_worker"], kwargs["placement_strategy"])
    timeout = dist_timeout()  # Ray Train starts the process group; the trainer's own timeout applies to it too
    torch_config = TorchConfig(backend="nccl" if kwargs["use_gpu"] else "gloo",
                               **({"timeout_s": int(timeout.total_seconds())} if timeout else {}))
    trainer = TorchTrainer(ray_train_loop, train_loop_config={**to_dict(cfg), "_make_hooks": make_hooks,
                                                              "_preemption_notice": name},
                           scaling_config=ScalingConfig(**kwargs), torch_config=torch_config)
    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)} if main else {}
    try:
        return RayTrainOutcome(trainer.fit().error)
    except TrainingFailedError as e:  # Ray Train 2.x raises the workers' failure; earlier versions returned it
        return RayTrainOutcome(e)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        ray.kill(notice)
        if started:
            ray.shutdown()
