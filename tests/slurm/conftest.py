"""A real single-node Slurm for this tier: started by scripts/slurm-local.sh, stopped at the end of the session
when this session started it (daemons already running from an earlier session are used and left running)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from slurmjobs import Slurm, launch_env

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm-local.sh"


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
    env = launch_env(tmp_path_factory, SLURM_CONF=f"{state}/slurm.conf")
    session = Slurm(env)
    yield session
    for job in session.jobs:
        subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)
    if started:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env_script, capture_output=True, timeout=120)
