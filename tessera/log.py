"""Console logging with rank prefixes, and the one progress helper every stage uses (rank 0, rates, log-safe)."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Iterable, TextIO, TypeVar

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


class _PlainLines:
    """A stream for tqdm off a terminal: each redraw becomes a plain line, at most one per ``every_s``.

    tqdm redraws with carriage returns, which a log file keeps byte for byte (a redirected run's log grew
    large that way), and ``set_postfix`` redraws regardless of tqdm's ``mininterval``; so the last redraw
    waits here and is printed once ``every_s`` has passed, or when the bar closes (tqdm then writes a newline).
    """

    encoding = "utf-8"

    def __init__(self, stream: TextIO, every_s: float) -> None:
        self._stream, self._every_s = stream, every_s
        self._pending: str | None = None
        self._last = -math.inf

    def write(self, s: str) -> int:
        """Keep the newest redraw; print it if the interval has passed or the bar is closing."""
        for part in s.split("\r"):
            if part.strip():
                self._pending = part.strip()
        now = time.monotonic()
        if self._pending and ("\n" in s or now - self._last >= self._every_s):
            self._stream.write(self._pending + "\n")
            self._stream.flush()
            self._pending, self._last = None, now
        return len(s)

    def flush(self) -> None:
        self._stream.flush()


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, rank: int | None = None, every_s: float = 30.0, file: TextIO | None = None):
    """A tqdm bar with rates (``<unit>/s``) on rank 0; off a terminal, a plain line at most every ``every_s``.

    Use it like tqdm: iterate it, or ``update(n)`` it; ``set_postfix(loss=...)`` adds fields to the line;
    ``close()`` (or a ``with`` block) prints the final line; ``bar.format_dict["rate"]`` is the current
    rate. ``rank`` defaults to ``$RANK`` (else 0): other ranks get a disabled bar whose calls do nothing, as
    does ``TESSERA_NO_PROGRESS=1``. ``file`` defaults to stderr; it counts as a terminal if it ``isatty()``.
    """
    from tqdm import tqdm  # not tqdm.auto: a notebook widget would bypass the plain-line stream

    stream = file if file is not None else sys.stderr
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    disable = rank != 0 or os.environ.get("TESSERA_NO_PROGRESS") == "1"
    common = dict(total=total, desc=rank_prefix() + desc, unit=unit, initial=initial, disable=disable, leave=True)
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, file=stream, dynamic_ncols=True, mininterval=1.0, smoothing=0.1, **common)
    fmt = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]" \
        if total else "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"
    return tqdm(iterable, file=_PlainLines(stream, every_s), bar_format=fmt, ascii=True, mininterval=every_s,
                maxinterval=max(every_s, 10.0), smoothing=0.1, **common)
