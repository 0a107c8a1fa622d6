"""Preemption: a signal handler that only records that the scheduler asked us to stop, and the requeue
that follows the checkpoint inside Slurm.

The handler is installed as early as possible (the worker does it before importing torch), so that a warning
signal arriving during start-up is not fatal (the default action of USR1/USR2 is to terminate). The Trainer
reads the flag every log_every steps and agrees on it with the other ranks in the same allreduce that sums
the loss (see hvdtrain.train.trainer); after the agreed checkpoint, rank 0 calls `requeue`.
"""

from __future__ import annotations

import signal
import subprocess
from typing import Optional

from hvdtrain.env import SlurmEnv
from hvdtrain.errors import LaunchError, UsageError

_requested = False
_installed: dict[int, object] = {}


def signal_number(name: str) -> int:
    return int(getattr(signal, "SIG" + name.upper().removeprefix("SIG")))


def _handler(signum, _frame) -> None:
    global _requested
    _requested = True


def install(name: str) -> bool:
    """Record `name` (USR1, USR2, TERM, INT) as a preemption request instead of dying of it. Idempotent: True when
    this call installed the handler (its caller then owns the uninstall), False when it was in place already."""
    if not name:
        return False
    num = signal_number(name)
    if num in _installed:
        return False
    _installed[num] = signal.signal(num, _handler)
    return True


def uninstall() -> None:
    for num, previous in _installed.items():
        signal.signal(num, previous)
    _installed.clear()


def requested() -> bool:
    return _requested


def request() -> None:
    """Ask for a stop as the signal would (for a library user's own trigger, and for tests)."""
    global _requested
    _requested = True


def reset() -> None:
    global _requested
    _requested = False


# --------------------------------------------------------------------------------------------------
# Requeue (inside Slurm, after the preemption checkpoint)
# --------------------------------------------------------------------------------------------------


def requeue_argv(job_label: str) -> list[str]:
    return ["scontrol", "requeue", job_label]


def requeue_job(slurm: SlurmEnv, timeout: float = 60.0) -> str:
    """Run ``scontrol requeue <id>`` for this job (``<array job id>_<task>`` for an array task, the form squeue
    shows); returns the id. Raises UsageError outside Slurm, LaunchError when scontrol is missing, fails or hangs
    (e.g. the job was not submitted with --requeue and the cluster forbids it, or slurmctld is unreachable)."""
    job = slurm.job_label
    if job is None:
        raise UsageError("not inside a Slurm job (no SLURM_JOB_ID): there is nothing to requeue")
    argv = requeue_argv(job)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise LaunchError("cannot requeue: scontrol is not on PATH; is this a Slurm node?") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"cannot requeue job {job}: scontrol did not answer in {timeout:.0f} s") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise LaunchError(
            f"cannot requeue job {job}: {' '.join(argv)} failed ({detail[-1] if detail else f'exit {proc.returncode}'}); "
            "submit with --requeue, or check that slurmctld is up (scontrol ping)"
        )
    return job


def requeue_after_preemption(requeue: bool, max_requeues: int, say, slurm: SlurmEnv) -> Optional[str]:
    """What rank 0 does after the preemption checkpoint: inside Slurm, requeue the job unless `requeue` is off or
    it was requeued `max_requeues` times already; returns the requeued id, or None (with a line saying why).
    `slurm`: the job this process is in."""
    if not slurm.in_job or not requeue:
        return None
    if slurm.restart_count >= max_requeues:
        say(f"not requeueing: the job was already requeued {slurm.restart_count} times (--max-requeues {max_requeues})")
        return None
    job = requeue_job(slurm)
    say(f"requeued Slurm job {job}; it will resume from the checkpoint")
    return job
