"""Interchangeable task executors (img2dataset "distributors"): in-process and Ray.

A task is ``fn(task: dict) -> dict`` on plain data, idempotent because every output is written
atomically and its done-marker last; so a retry after a crash or a killed worker is harmless.
``map`` yields results as tasks complete (any order); callers never depend on that order.
:func:`count_task` shows each finished task on a ``tessera.log.progress`` bar.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator, Literal

from tessera.ray_runtime import RayConfig, ensure_ray

log = logging.getLogger("tessera.data")

Task = dict[str, Any]
TaskFn = Callable[[Task], dict]


class LocalExecutor:
    """Runs tasks one by one in this process, in the given order; for debugging and small runs."""

    name = "local"

    def __init__(self, max_retries: int = 0) -> None:
        self.max_retries = max_retries

    def map(self, fn: TaskFn, tasks: list[Task]) -> Iterator[dict]:
        """Run each task, retrying an exception up to ``max_retries`` times (like Ray does)."""
        for task in tasks:
            for attempt in range(self.max_retries + 1):
                try:
                    yield fn(task)
                    break
                except Exception:
                    if attempt == self.max_retries:
                        raise
                    log.warning("task %s failed (attempt %d), retrying", task.get("name"), attempt + 1, exc_info=True)

    def close(self) -> None:
        """Nothing to release."""


class RayExecutor:
    """One Ray task per item, ``max_retries`` on worker death or exception, results as they finish."""

    name = "ray"

    def __init__(self, cfg: RayConfig, max_retries: int = 3) -> None:
        import ray

        self.max_retries = max_retries
        self._owned = ensure_ray(cfg)
        self._ray = ray

    def map(self, fn: TaskFn, tasks: list[Task]) -> Iterator[dict]:
        """Submit tasks with a bounded in-flight window and yield each result once it is ready."""
        ray = self._ray
        remote = ray.remote(max_retries=self.max_retries, retry_exceptions=True)(fn)
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        pending: list = []
        todo = list(tasks)
        todo.reverse()
        while todo or pending:
            while todo and len(pending) < window:
                pending.append(remote.options(name=str(todo[-1].get("name", "task"))).remote(todo.pop()))
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])

    def close(self) -> None:
        """Shut Ray down if this executor started it."""
        if self._owned:
            self._ray.shutdown()


def make_executor(kind: Literal["ray", "local"], ray_cfg: RayConfig, max_retries: int):
    """Build the executor a config names."""
    if kind == "local":
        return LocalExecutor(max_retries)
    if kind == "ray":
        return RayExecutor(ray_cfg, max_retries)
    raise ValueError(f"unknown executor {kind!r} (known: local, ray)")


def count_task(bar: Any, samples: int, t0: float) -> float:
    """Advance a progress bar by one finished task, showing samples and samples/s since ``t0``; return the rate."""
    rate = samples / max(time.perf_counter() - t0, 1e-9)
    bar.set_postfix(samples=samples, samples_per_s=f"{rate:.1f}", refresh=False)
    bar.update(1)
    return rate
