"""Preemption: a scheduler's signal becomes a checkpoint at the end of the current step and exit code 75.

SLURM sends SIGTERM before it kills a preempted job and, with `--signal=USR1@<seconds>`, SIGUSR1
ahead of the time limit; other schedulers do the same with SIGTERM. The handler only takes note;
at the end of every optimizer step all ranks ask `requested()` (one all-reduce of one number), so
they all stop after the same step, save the same checkpoint and exit with `PREEMPTED_EXIT_CODE`,
which `launch/slurm/*.sbatch` turn into `scontrol requeue`; the requeued job resumes with
`--train.resume auto`.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Optional, Sequence

from pipeline import comm

# EX_TEMPFAIL from sysexits.h ("try again later"): distinct from success (0), errors (1, 2) and the
# stability abort (3), so a batch script can tell "requeue me" from "I failed".
PREEMPTED_EXIT_CODE = 75


class Preemption:
    """Catches `signals` and turns them into one collective decision per step (stateless across restarts)."""

    KILL_AT = 3  # the third delivery of the same signal kills: the first two are one request

    def __init__(self, signals: Sequence[str] = ("SIGTERM", "SIGUSR1")):
        self.received: Optional[str] = None  # the first signal
        self._count: dict[str, int] = {}
        self.signals = [signal.Signals[name] for name in signals]
        # Handlers can only be installed from the main thread (a library import inside a thread is not a run).
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        self._count[name] = self._count.get(name, 0) + 1
        if self._count[name] >= self.KILL_AT:
            # The sender insists: a hung rank must stay killable by SIGTERM, so the default action runs.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        # A second delivery is what a signal to the whole process group looks like (a terminal, SLURM,
        # Kubernetes): the rank gets it directly and again from the launcher that forwards it. Neither
        # it nor a different signal (SLURM's SIGTERM after its SIGUSR1) may interrupt the checkpoint the
        # first one asked for.
        self.received = self.received or name  # nothing else here: a handler may interrupt any line
    def requested(self) -> bool:
        """Collective: true on every rank once any rank has received one of the signals."""
        return comm.any_rank(self.received is not None)

    def describe(self) -> str:
        return self.received or "a signal to another rank"
