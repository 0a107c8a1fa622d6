"""A real single-node Slurm for this tier: started by scripts/slurm-local.sh, stopped at the end of the session
when this session started it (daemons already running from an earlier session are used and left running)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm-local.sh"
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


def _why_slurm_cannot_start() -> str | None:
    if os.geteuid() != 0:
        return "the local Slurm runs its daemons as root; run the tests as root"
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(b) is None]
    if missing:
        return f"{', '.join(missing)} not installed: run scripts/setup.sh --slurm (make test does)"
    return None


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """Start Slurm (idempotent); yields the environment for clients and jobs. Cancels the session's jobs and
    stops the daemons it started at the end."""
    why = _why_slurm_cannot_start()
    if why:
        pytest.skip(f"Slurm cannot start here: {why}")
    state = os.environ.get("HVDTRAIN_SLURM_DIR", "/tmp/hvdtrain-slurm")
    env_script = {**os.environ, "HVDTRAIN_SLURM_DIR": state}
    proc = subprocess.run(["bash", str(SCRIPT), "start"], env=env_script, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        pytest.fail(f"scripts/slurm-local.sh start failed:\n{proc.stdout}\n{proc.stderr}")
    started = proc.stdout.strip().splitlines()[-1] == "started"
    venv_bin = str(Path(os.sys.executable).parent)
    env = {
        **os.environ,
        "SLURM_CONF": f"{state}/slurm.conf",
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "HVDTRAIN_CACHE": str(tmp_path_factory.mktemp("hvdtrain-cache")),
    }
    for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
        del env[k]  # not a job of an outer allocation
    session = Slurm(env)
    yield session
    for job in session.jobs:
        subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)
    if started:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env_script, capture_output=True, timeout=120)


class Slurm:
    """Small helpers around the real client commands; every call has a timeout."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.jobs: list[str] = []

    def run(self, argv, cwd=None, timeout=60, check=True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            list(map(str, argv)), cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, args, cwd, extra_env=None) -> str:
        env = {**self.env, **(extra_env or {})}
        proc = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return self.track(proc.stdout.strip().split(";")[0])

    def track(self, job: str) -> str:
        self.jobs.append(job)
        return job

    def hvdtrain(self, *args, cwd=None, timeout=120) -> subprocess.CompletedProcess:
        return self.run([os.sys.executable, "-m", "hvdtrain", *args], cwd=cwd, timeout=timeout, check=False)

    def submit(self, *args, cwd) -> str:
        proc = self.hvdtrain("submit", *args, cwd=cwd)
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
