"""The loop's safety policies: preemption (SIGTERM/SIGUSR1 -> checkpoint, exit 75) and non-finite steps (skip
everywhere, then roll back or stop after K in a row)."""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from typing import Callable

from tessera.trainer import train_state as TS

log = logging.getLogger("tessera.guard")

# Exit code of a run that checkpointed because of SIGTERM/SIGUSR1 (EX_TEMPFAIL: "try again"), so a
# cluster wrapper can tell a preemption from a failure and requeue.
EXIT_PREEMPTED = 75


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1; the loop finishes the current step, checkpoints and exits.

    Signal handlers can only be set on the main thread. Where training runs on another thread (Ray Train's
    workers), ``notice() -> signum | None`` asks the launcher, which did receive the signal; it is polled at
    most every ``every_s`` seconds, when the loop reads ``requested``."""

    def __init__(self, notice: Callable[[], int | None] | None = None, every_s: float = 1.0) -> None:
        self._requested = False
        self.signum: int | None = None
        self._notice, self._every_s, self._polled = notice, every_s, 0.0
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(s, self._handler)

    def _handler(self, signum, _frame) -> None:
        self._set(signum, "received")

    def _set(self, signum: int, how: str) -> None:
        self._requested, self.signum = True, signum
        log.warning("%s %s: will checkpoint after this step and exit %d", how, signal.Signals(signum).name,
                    EXIT_PREEMPTED)

    @property
    def requested(self) -> bool:
        """Whether this process was asked to stop (by a signal, or by the launcher's notice)."""
        if not self._requested and self._notice is not None and time.monotonic() - self._polled >= self._every_s:
            self._polled = time.monotonic()
            signum = self._notice()
            if signum:
                self._set(signum, "the launcher received")
        return self._requested


def after_step(st: TS.TrainState, skipped: bool, reason: str, max_consecutive: int, on_nonfinite: str,
               roll_back) -> None:
    """Count a skipped step; after ``max_consecutive`` in a row roll back (``roll_back() -> bool``) or stop."""
    if not skipped:
        st.consecutive_skips = 0
        return
    st.skipped += 1
    st.consecutive_skips += 1
    log.warning("non-finite %s at step %d: step skipped on every rank (%d in a row)", reason, st.step,
                st.consecutive_skips)
    if st.consecutive_skips < max_consecutive:
        return
    if on_nonfinite == "stop" or not roll_back():
        raise FloatingPointError(f"{st.consecutive_skips} consecutive non-finite steps at step {st.step}")


def rollback(ckpt: TS.Checkpointer, engine, frags, ema, st: TS.TrainState) -> bool:
    """Reload weights, optimizer and EMA from the newest checkpoint but keep moving forward through the data:
    replaying the batches that blew up would likely blow up again."""
    url = ckpt.resolve("auto")
    if url is None:
        return False
    keep = dataclasses.replace(st)
    TS.load(url, engine, frags, ema, None, st, restore_loader=False)
    st.step, st.samples, st.skipped = keep.step, keep.samples, keep.skipped
    st.consecutive_skips, st.rollbacks = 0, keep.rollbacks + 1
    log.warning("rolled back weights and optimizer to %s (rollback #%d)", url, st.rollbacks)
    return True
