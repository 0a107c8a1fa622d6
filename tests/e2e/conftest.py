import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

HVDTRAIN = [sys.executable, "-m", "hvdtrain"]


@pytest.fixture
def hvdtrain(child_env, tmp_path):
    """Run the real CLI (real horovodrun/mpirun, real ranks) with a hard timeout; returns CompletedProcess."""

    def call(*args, timeout=240, cwd=None):
        return subprocess.run(
            [*HVDTRAIN, *map(str, args)], cwd=cwd or tmp_path, env=child_env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip

    return call


def _kill_tree(proc: subprocess.Popen, marker: str) -> None:
    """SIGKILL a launched job: the launcher's process group, and any rank still running (found by marker)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in (p.info["cmdline"] or [])):
            try:
                p.kill()
            except psutil.Error:
                pass
    proc.wait(timeout=30)


@pytest.fixture
def spawn(child_env, tmp_path):
    """Start the real CLI in the background, in a session of its own; returns (Popen, kill) where kill(marker)
    SIGKILLs the whole job: the launcher's process group and every rank whose command line holds marker."""

    def start(*args):
        proc = subprocess.Popen(
            [*HVDTRAIN, *map(str, args)], env=child_env, cwd=tmp_path, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        return proc, lambda marker: _kill_tree(proc, marker)

    return start


@pytest.fixture
def kill_rank_mid_training(child_env, tmp_path):
    """Start `hvdtrain ARGS` (a training job writing to RUN_DIR), SIGKILL the worker of `rank` once rank 0 has
    logged step 10; returns (exit status, seconds from the kill to the job's end, the job's stderr)."""

    def run(args, run_dir, rank: int, limit: float = 90):
        proc = subprocess.Popen([*HVDTRAIN, *map(str, args)], env=child_env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            log = run_dir / "logs" / "rank.0.log"
            while not (log.exists() and "step 10/" in log.read_text()):
                assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
                time.sleep(0.1)
            for p in psutil.process_iter(["cmdline"]):
                cmd = p.info["cmdline"] or []
                if cmd[1:3] == ["-m", "hvdtrain.worker"] and str(run_dir) in " ".join(cmd):
                    if p.environ().get("OMPI_COMM_WORLD_RANK") == str(rank):
                        p.send_signal(signal.SIGKILL)
            started = time.monotonic()
            _, err = proc.communicate(timeout=limit)
            return proc.returncode, time.monotonic() - started, err
        finally:
            if proc.poll() is None:
                psutil.Process(proc.pid).kill()
                proc.wait()

    return run


@pytest.fixture
def examples_dir():
    return Path(__file__).resolve().parents[2] / "examples"
