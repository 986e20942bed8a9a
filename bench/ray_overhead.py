"""Ray's fixed costs as the ingest sees them: start-up, a cold worker's first task, per-task overhead.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ray_overhead.py [--cpus 2] [--tasks 200] [--repeats 3]

Each repeat starts an embedded runtime through ``tessera.ray_runtime.ensure_ray`` (what ``tessera
data ingest`` does), then times: the first no-op task (a worker process starting and importing the
ingest module), a no-op task round trip once the workers are warm, the throughput of ``--tasks``
no-op tasks submitted at once, and ``ray.shutdown``. Medians and min/max over the repeats are
printed and written to ``bench/results/ray_overhead.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Report  # noqa: E402


def _noop(x: int) -> int:
    """A task that only imports what an ingest task imports (cached after the first call)."""
    import tessera.data_pipeline.ingest  # noqa: F401 - the import is the cold worker's real cost

    return x


def measure_once(cpus: int, tasks: int) -> dict:
    """One runtime's start-up, cold first task, warm round trip, per-task throughput cost and shutdown."""
    import ray

    from tessera.ray_runtime import RayConfig, ensure_ray

    t0 = time.perf_counter()
    ensure_ray(RayConfig(num_cpus=cpus, object_store_memory_mb=256))
    startup = time.perf_counter() - t0
    try:
        remote = ray.remote(_noop)
        t0 = time.perf_counter()
        ray.get([remote.remote(i) for i in range(cpus)])  # one cold task per worker, in parallel
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(20):
            ray.get(remote.remote(i))
        round_trip = (time.perf_counter() - t0) / 20
        t0 = time.perf_counter()
        ray.get([remote.remote(i) for i in range(tasks)])
        per_task = (time.perf_counter() - t0) / tasks
    finally:
        t0 = time.perf_counter()
        ray.shutdown()
        shutdown = time.perf_counter() - t0
    return {"startup_s": startup, "first_tasks_s": first, "round_trip_ms": round_trip * 1e3,
            "per_task_ms_pipelined": per_task * 1e3, "shutdown_s": shutdown}


def measure(cpus: int, tasks: int, repeats: int) -> dict:
    """Medians (and min/max) of ``measure_once`` over ``repeats`` fresh runtimes."""
    runs = [measure_once(cpus, tasks) for _ in range(repeats)]
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
                    "max": round(max(values), 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure and print Ray's overheads; write bench/results/ray_overhead.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    report = Report("ray_overhead", vars(args), ["ray"])
    for key, value in measure(args.cpus, args.tasks, args.repeats).items():
        report.note(key, value)
    report.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
