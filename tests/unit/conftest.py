import subprocess

import pytest

from hvdtrain import launch


class ProcessStarted(AssertionError):
    pass


@pytest.fixture
def no_processes(monkeypatch):
    """Fail the test if anything tries to start a process through the launcher."""
    started = []

    def refuse(argv, *a, **k):
        started.append(argv)
        raise ProcessStarted(f"a process was started: {argv}")

    monkeypatch.setattr(launch.subprocess, "Popen", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    return started


@pytest.fixture
def clean_env(monkeypatch):
    """No Slurm variables from the surrounding shell."""
    import os

    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)
