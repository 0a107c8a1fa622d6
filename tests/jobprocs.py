"""Finding a job's processes by a marker in their command line (the run directory, a sleeper's text): what the
tests that kill launchers check is gone, waiting for them to go, and the clean-up after a failed test."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil


def job_processes(marker: str) -> list:
    """Every process but this one whose command line holds `marker` (launcher, wrappers, workers, proxies)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and any(marker in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except psutil.Error:
            pass
    return found


def wait_gone(marker: str, timeout: float) -> list:
    """The job's processes still there after `timeout` seconds (at once when none is left)."""
    deadline = time.monotonic() + timeout
    while (left := job_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def kill_all(proc: subprocess.Popen, marker: str) -> None:
    """Clean-up after a test, failed or not: `proc` (started in a session of its own) and its process group, if still
    running, and whatever else of the job is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in job_processes(marker):
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait(timeout=30)
