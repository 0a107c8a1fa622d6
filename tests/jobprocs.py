"""Finding a job's processes by a marker in their command line (the run directory, a sleeper's text): what the
tests that kill launchers check is gone."""

from __future__ import annotations

import os

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
