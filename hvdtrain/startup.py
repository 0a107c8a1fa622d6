"""Time to the first step, in phases: where a job's start-up goes (no torch here: the launching side imports this).

    launch       hvdtrain's run_job -> this rank's process started (the launcher, the rank wrapper, the interpreter's
                 own start); only when launched by hvdtrain (HVDTRAIN_LAUNCHED), and on one clock: this machine's,
                 or hosts that keep theirs in step
    imports      the process's start -> the Trainer's set-up (Python, torch, Horovod, hvdtrain, the user's script)
    hvd.init     Horovod's init (MPI or Gloo, the background thread, process sets)
    data         loading the dataset
    model        building and placing the model, the update rule and its optimizer
    broadcast    rank 0's starting state to every rank (or a checkpoint read and restored)
    first step   the first optimizer step (Horovod negotiates each tensor once here, and caches the responses)

A process's start comes from /proc (its start in clock ticks after boot, against /proc/uptime now): 10 ms steps.
"""

from __future__ import annotations

import os
import time
from typing import Mapping, Optional

from hvdtrain import procs

LAUNCHED_ENV = "HVDTRAIN_LAUNCHED"  # time.time() when run_job started the launcher


def process_started(pid: Optional[int] = None) -> Optional[float]:
    """When process `pid` (this one by default) started, as a time.time() value; None where /proc cannot say."""
    ticks = procs.start_time(os.getpid() if pid is None else pid)
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        per_second = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    if ticks is None or not ticks.isdigit():
        return None
    return time.time() - (uptime - int(ticks) / per_second)


class Startup:
    """Marks the end of each phase (`mark`); `phases` gives their lengths in seconds, in order."""

    def __init__(self, environ: Optional[Mapping[str, str]] = None):
        environ = os.environ if environ is None else environ
        self.marks: list[tuple[str, float]] = []
        try:
            launched: Optional[float] = float(environ[LAUNCHED_ENV])
        except (KeyError, ValueError):
            launched = None
        started = process_started()
        if launched is not None and started is not None and started >= launched:
            self.marks.append(("", launched))
            self.marks.append(("launch", started))
        elif started is not None:
            self.marks.append(("", started))
        self.done = False

    def mark(self, phase: str) -> None:
        if self.marks:
            self.marks.append((phase, time.time()))

    def phases(self) -> dict[str, float]:
        return {name: round(t - self.marks[i][1], 3) for i, (name, t) in enumerate(self.marks[1:])}

    def line(self) -> str:
        phases = self.phases()
        parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in phases.items())
        return f"start-up: {sum(phases.values()):.2f} s to the end of the first step ({parts})"
