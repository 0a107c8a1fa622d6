"""Client side of a real Slurm for the tests: sbatch / hvdtrain submit / scontrol with timeouts, and a record of
the jobs submitted so a session can cancel them. Shared by the slurm tier (one node) and the cluster tier
(several nodes, where every client command runs on the first node: `prefix`)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Sequence

import psutil

REPO = Path(__file__).resolve().parents[1]


def launch_env(tmp_path_factory, **extra: str) -> dict[str, str]:
    """The environment for clients and jobs of a tier's session: this venv first on PATH, root allowed for Open
    MPI, the session's own cache and TMPDIR (logs kept after failing launches stay with the tests), nothing of an
    outer Slurm allocation; then `extra`."""
    venv_bin = os.path.dirname(os.sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    return {
        **env,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "HVDTRAIN_CACHE": str(tmp_path_factory.mktemp("hvdtrain-cache")),
        "TMPDIR": str(tmp_path_factory.mktemp("tmp")),
        **extra,
    }


DONE = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
)


class Slurm:
    """Small helpers around the real client commands; every call has a timeout."""

    def __init__(self, env: dict[str, str], prefix: Sequence[str] = ()):
        self.env = env
        self.prefix = list(prefix)  # how to reach the controller, e.g. cluster-local.sh exec node1 --
        self.jobs: list[str] = []

    def run(self, argv, cwd=None, timeout=60, check=True, extra_env=None) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [*self.prefix, *map(str, argv)], cwd=cwd, env={**self.env, **(extra_env or {})}, capture_output=True,
            text=True, timeout=timeout,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, args, cwd, extra_env=None) -> str:
        proc = self.run(["sbatch", "--parsable", *args], cwd=cwd, extra_env=extra_env, check=False)
        assert proc.returncode == 0, proc.stderr
        return self.track(proc.stdout.strip().split(";")[0])

    def track(self, job: str) -> str:
        self.jobs.append(job)
        return job

    def hvdtrain(self, *args, cwd=None, timeout=120, extra_env=None) -> subprocess.CompletedProcess:
        argv = [os.sys.executable, "-m", "hvdtrain", *args]
        return self.run(argv, cwd=cwd, timeout=timeout, check=False, extra_env=extra_env)

    def submit(self, *args, cwd, extra_env=None) -> str:
        proc = self.hvdtrain("submit", *args, cwd=cwd, extra_env=extra_env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        m = re.search(r"^submitted job (\d+)$", proc.stdout, re.M)
        assert m, proc.stdout
        return self.track(m.group(1))

    def show(self, job: str) -> list[dict[str, str]]:
        proc = self.run(["scontrol", "show", "job", "-o", job], check=False)
        out = []
        for line in proc.stdout.splitlines():
            out.append(dict(t.split("=", 1) for t in line.split() if "=" in t))
        return out

    def release_requeued(self, job: str) -> None:
        """A requeued job is held by Slurm for ~2 minutes (BeginTime), long enough for its first run's steps to
        be cleaned up on every node: wait until it is requeued and no slurmstepd of it is left, then release it
        (else the new run's PMIx directories can collide with the old run's)."""
        self.wait(job, timeout=120, until=lambda t: int(t[0].get("Restarts", 0)) >= 1 and t[0]["JobState"] == "PENDING")
        deadline = time.monotonic() + 60
        while any(f"[{job}." in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])):
            assert time.monotonic() < deadline, f"the first run of job {job} still has steps after 60 s"
            time.sleep(0.5)
        self.run(["scontrol", "update", f"jobid={job}", "StartTime=now"])

    def wait(self, job: str, timeout: float, until=None) -> list[dict[str, str]]:
        """Poll until every task of the job is done (or `until(tasks)` holds); fail with the job's state."""
        deadline = time.monotonic() + timeout
        tasks: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            tasks = self.show(job)
            if tasks and (until(tasks) if until else all(t.get("JobState") in DONE for t in tasks)):
                return tasks
            time.sleep(1)
        states = [(t.get("JobId"), t.get("JobState"), t.get("Reason")) for t in tasks]
        raise AssertionError(f"job {job} not done after {timeout:.0f} s: {states}")
