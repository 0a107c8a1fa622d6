"""Slurm: sbatch script rendering, submission, job status and logs, and the requeue helper of the trainer.

Everything that builds a command or a script is a pure function; `submit`, `status`, `logs` and
`requeue_job` are the only places that start processes (sbatch, squeue, scontrol). Nothing heavy is
imported: the CLI and the trainer both import this module.
"""

from __future__ import annotations

import subprocess
from typing import Mapping

from hvdtrain.errors import LaunchError, UsageError


def requeue_id(environ: Mapping[str, str]) -> str:
    """The id that `scontrol requeue` needs for this job: ``<array job id>_<task id>`` for an array task
    (requeueing the plain SLURM_JOB_ID of a task works too, but the array form is what squeue shows and
    what the user sees), else SLURM_JOB_ID."""
    array_job, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    job = environ.get("SLURM_JOB_ID")
    if not job:
        raise UsageError("not inside a Slurm job (no SLURM_JOB_ID): there is nothing to requeue")
    return job


def requeue_argv(job_id: str) -> list[str]:
    return ["scontrol", "requeue", job_id]


def requeue_job(environ: Mapping[str, str], timeout: float = 60.0) -> str:
    """Run ``scontrol requeue <id>`` for the job described by `environ`; returns the id.

    Raises LaunchError when scontrol is missing, fails or hangs (e.g. the job was not submitted with
    --requeue and the cluster forbids it, or slurmctld is unreachable)."""
    job = requeue_id(environ)
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
