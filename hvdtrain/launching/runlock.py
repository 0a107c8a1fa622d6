"""One job per run directory: `hvdtrain train` holds RUN_DIR/hvdtrain.lock while its job runs.

The lock file names its holder (procs.identity: host, pid, start time) and, inside Slurm, its job. A second job
on the same directory (a `--resume` while the first still trains) is refused in one line, before anything is
written. A lock left by a holder that is gone (SIGKILL, a lost node) is stale and taken over: on the holder's
host, the process is checked; a requeued Slurm job recognises its own earlier incarnation by its job id.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

from hvdtrain import procs
from hvdtrain.env import SlurmEnv
from hvdtrain.errors import UsageError


def _holder(slurm: SlurmEnv) -> str:
    job = f" slurm-job {slurm.job_label} restart {slurm.restart_count}" if slurm.job_label else ""
    return procs.identity() + job + "\n"


def _stale(text: str, slurm: SlurmEnv) -> Optional[bool]:
    """Whether the lock holder written as `text` is gone: True, False (it runs), None (cannot tell); `slurm`: the
    job this process is in (its own lock from before a requeue is stale)."""
    fields = text.split()
    if (
        slurm.job_label is not None
        and fields[3:5] == ["slurm-job", slurm.job_label]
        and fields[5:6] == ["restart"]
        and fields[6:7] != [str(slurm.restart_count)]
    ):
        return True  # this job's own lock from before its requeue: that run of it has ended
    alive = procs.alive(" ".join(fields[:3]))
    return None if alive is None else not alive


def describe(text: str) -> str:
    """The holder written as `text`, in words."""
    fields = text.split()
    if len(fields) < 3:
        return "an unknown process"
    job = f", Slurm job {fields[4]}" if len(fields) > 4 and fields[3] == "slurm-job" else ""
    return f"pid {fields[1]} on {fields[0]}{job}"


def check(path: Path, flag: str, slurm: SlurmEnv) -> None:
    """Refuse now, as `hold` would, when a live job holds `path`: before anything reads the run directory (its
    checkpoints, which that job keeps rewriting and deleting). `hold` takes the lock later."""
    try:
        text = path.read_text()
    except OSError:
        return  # no lock: hold() takes it (or finds one taken just now)
    stale = _stale(text, slurm) if text.strip() else True  # empty: a holder killed while writing it
    if not stale:
        raise UsageError(
            f"{flag} {path.parent}: a job is already running there ({describe(text)}"
            + (", which this host cannot check" if stale is None else "")
            + "); wait for it or stop it, or choose another directory"
            + (f" (if it is gone, delete {path})" if stale is None else "")
        )


@contextlib.contextmanager
def hold(path: Path, flag: str, slurm: SlurmEnv) -> Iterator[None]:
    """Hold the lock file `path` (its folder is created) while the block runs; UsageError naming `flag` and the
    holder when a live job holds it. `slurm`: the job this process is in, written into the lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _attempt in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            check(path, flag, slurm)  # a live holder: refused
            path.unlink(missing_ok=True)  # stale (or gone since): take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(_holder(slurm))  # its size is small: one write, seen whole by a reader
        break
    else:
        raise UsageError(f"{flag} {path.parent}: another job took {path} just now; try again")
    mine = _holder(slurm)
    try:
        yield
    finally:
        try:
            if path.read_text() == mine:  # not a lock another job took over
                path.unlink()
        except OSError:
            pass
