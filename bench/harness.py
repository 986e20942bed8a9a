"""The shared benchmark harness: alternating runs, medians and spreads, the machine, a JSON result.

Every comparison runs the peer and Tessera at least 3 times each, alternating (peer, ours, peer,
ours, ...), so that a change in the machine's load hits both sides alike. It prints every run, the
median and min/max of each side, the ratio of the medians and the speed-up, and warns when a side's
spread ((max - min) / median) is over 15%. The result, with the machine (cores, CPU model, load,
library versions, date, git commit), is written as JSON to ``bench/results/<name>.json``.

    from harness import Comparison, Report
    report = Report("frechet", params=vars(args), libraries=["numpy", "scipy", "pytorch-fid"])
    report.compare(Comparison(name="2048-d", metric="s", higher_is_better=False,
                              peer="pytorch-fid", ours="tessera"), run_peer, run_ours, repeats=3)
    report.write()
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SPREAD_WARN = 0.15  # (max - min) / median above this prints a warning
MIN_REPEATS = 3

# A run returns its measured value, or (value, details) where details (JSON-safe) are kept per run.
RunResult = float | tuple[float, dict]


@dataclass(kw_only=True)
class Comparison:
    """What one comparison measures: the metric, its direction and the two sides' labels."""

    name: str
    metric: str  # unit of the value each run returns, e.g. "samples/s" or "s"
    higher_is_better: bool
    peer: str
    ours: str = "tessera"


@dataclass(kw_only=True)
class Side:
    """One side's runs and their summary."""

    label: str
    values: list[float] = field(default_factory=list)
    details: list[dict] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> float:
        """(max - min) / median: 0.15 means the runs span 15% of the median."""
        return (max(self.values) - min(self.values)) / abs(self.median) if self.median else float("inf")

    def summary(self) -> dict:
        return {"label": self.label, "values": self.values, "median": self.median, "min": min(self.values),
                "max": max(self.values), "spread": self.spread, "details": self.details}


def _unpack(result: RunResult) -> tuple[float, dict]:
    if isinstance(result, tuple):
        value, details = result
        return float(value), dict(details)
    return float(result), {}


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:.1f}"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine(libraries: list[str]) -> dict:
    """Cores, CPU model, memory, load, Python and library versions, thread settings, date, commit."""
    versions = {}
    for lib in libraries:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    mem = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": mem,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": versions,
        "threads_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
                        if k in os.environ},
        "git_commit": _git_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


class Report:
    """Collects a script's comparisons and notes; ``write`` saves the JSON result."""

    def __init__(self, name: str, params: dict, libraries: list[str]) -> None:
        self.name = name
        self.params = params
        self.machine = machine(libraries)
        self.comparisons: list[dict] = []
        self.notes: dict[str, Any] = {}
        m = self.machine
        print(f"== {name}: {m['cores']} cores ({m['cpu_model']}), load {m['load_average']}, {m['date']}, "
              f"commit {m['git_commit']}", flush=True)

    def compare(self, cmp: Comparison, run_peer: Callable[[], RunResult], run_ours: Callable[[], RunResult],
                repeats: int = MIN_REPEATS, warmup: Callable[[], Any] | None = None) -> dict:
        """Run peer and ours ``repeats`` times each, alternating (peer first); print and record the summary."""
        if repeats < MIN_REPEATS:
            raise ValueError(f"repeats must be >= {MIN_REPEATS} (a ratio measured once is not a result)")
        if warmup is not None:
            warmup()
        peer, ours = Side(label=cmp.peer), Side(label=cmp.ours)
        print(f"-- {cmp.name} ({cmp.metric}, {'higher' if cmp.higher_is_better else 'lower'} is better)", flush=True)
        for i in range(repeats):
            for side, fn in ((peer, run_peer), (ours, run_ours)):
                value, details = _unpack(fn())
                side.values.append(value)
                side.details.append(details)
                extra = "  " + json.dumps(details, default=str) if details else ""
                print(f"   run {i + 1}/{repeats} {side.label:>14}: {_fmt(value)} {cmp.metric}{extra}", flush=True)
        return self._summarise(cmp, peer, ours)

    def summarise(self, cmp: Comparison, peer_values: list[float], ours_values: list[float]) -> dict:
        """Summarise values derived from runs already made (e.g. a rate with a start-up time added)."""
        print(f"-- {cmp.name} ({cmp.metric}, derived from the runs above)", flush=True)
        return self._summarise(cmp, Side(label=cmp.peer, values=list(peer_values)),
                               Side(label=cmp.ours, values=list(ours_values)))

    def _summarise(self, cmp: Comparison, peer: Side, ours: Side) -> dict:
        ratio = ours.median / peer.median  # of the measured quantity, ours over peer
        speedup = ratio if cmp.higher_is_better else 1.0 / ratio  # > 1: ours is faster
        warnings = []
        for side in (peer, ours):
            print(f"   {side.label:>14}: median {_fmt(side.median)} {cmp.metric}, min {_fmt(min(side.values))}, "
                  f"max {_fmt(max(side.values))}, spread {side.spread:.1%}")
            if side.spread > SPREAD_WARN:
                msg = f"{side.label} spread {side.spread:.1%} > {SPREAD_WARN:.0%}: the machine was not steady"
                warnings.append(msg)
                print(f"   WARNING: {msg}")
        print(f"   ratio of medians {cmp.ours}/{cmp.peer} = {ratio:.3f}; speed-up {speedup:.2f}x", flush=True)
        result = {**asdict(cmp), "peer_runs": peer.summary(), "ours_runs": ours.summary(), "ratio": ratio,
                  "speedup": speedup, "spread_max": max(peer.spread, ours.spread), "warnings": warnings}
        self.comparisons.append(result)
        return result

    def note(self, key: str, value: Any) -> None:
        """Record (and print) an extra measured figure, e.g. Ray's start-up seconds."""
        self.notes[key] = value
        print(f"   {key}: {json.dumps(value, default=str)}", flush=True)

    def write(self) -> Path:
        """Write ``bench/results/<name>.json`` (load average at the end added to the machine record)."""
        RESULTS.mkdir(parents=True, exist_ok=True)
        self.machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        path = RESULTS / f"{self.name}.json"
        doc = {"benchmark": self.name, "params": self.params, "machine": self.machine,
               "comparisons": self.comparisons, "notes": self.notes}
        path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"== result written to {path.relative_to(REPO) if path.is_relative_to(REPO) else path}", flush=True)
        return path
