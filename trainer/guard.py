"""Cross-rank step flags (non-finite loss, preemption request) and the preemption signal handler."""

from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger("tessera.guard")

# Exit code of a run that checkpointed because of SIGTERM/SIGUSR1 (EX_TEMPFAIL: "try again"), so a
# cluster wrapper can tell a preemption from a failure and requeue.
EXIT_PREEMPTED = 75


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1; the loop finishes the current step, checkpoints and exits."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(s, self._handler)

    def _handler(self, signum, _frame) -> None:
        self.requested, self.signum = True, signum
        log.warning("received %s: will checkpoint after this step and exit %d",
                    signal.Signals(signum).name, EXIT_PREEMPTED)


def any_rank(*flags: bool, device: torch.device | None = None) -> list[bool]:
    """OR of each flag over all ranks, in one all-reduce (MAX)."""
    t = torch.tensor([float(f) for f in flags], device=device or torch.device("cpu"))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
