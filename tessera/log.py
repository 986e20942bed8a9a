"""Console logging with rank prefixes, and progress bars with rates."""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def rank_prefix() -> str:
    """``[rank R/W]`` when running under a multi-process launcher, else empty."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ""
    return f"[rank {os.environ.get('RANK', '0')}/{world}] "


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (pytest's capture, a redirect), never a stale closed stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _RankFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.rank = rank_prefix()
        return super().format(record)


def setup_logging(level: str = "INFO") -> None:
    """Configure the ``tessera`` loggers once: time, level, rank prefix, logger name."""
    root = logging.getLogger()
    if any(getattr(h, "_tessera", False) for h in root.handlers):
        root.setLevel(level)
        return
    handler = _StderrHandler()
    handler._tessera = True  # type: ignore[attr-defined]
    handler.setFormatter(_RankFormatter("%(asctime)s %(rank)s%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    # Third-party chatter at INFO hides our own progress lines.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``tessera`` namespace."""
    return logging.getLogger(name if name.startswith("tessera") else f"tessera.{name}")


def progress(it: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool | None = None):
    """A tqdm progress bar with rates, shown on rank 0 only (and only on a terminal unless forced)."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = int(os.environ.get("RANK", "0")) != 0 or os.environ.get("TESSERA_NO_PROGRESS") == "1"
    return tqdm(it, total=total, desc=rank_prefix() + desc, unit=unit, disable=disable, dynamic_ncols=True,
                mininterval=1.0, smoothing=0.1)
