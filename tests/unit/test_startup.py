"""hvdtrain.startup: a process's start time from /proc, and the phases of a start-up."""

import subprocess
import sys
import time

import pytest

from hvdtrain import startup


def test_process_started_is_when_the_process_started():
    before = time.time()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        time.sleep(0.5)
        started = startup.process_started(child.pid)
    finally:
        child.kill()
        child.wait()
    assert before - 0.02 <= started <= before + 0.3  # clock ticks: 10 ms steps
    assert startup.process_started(2**22 + 7) is None  # no such process


def test_phases_from_the_launch_to_each_mark(monkeypatch):
    # This process's start, fixed: read twice from /proc (10 ms ticks) and the clock, it moves by a tick or so.
    started = startup.process_started()
    monkeypatch.setattr(startup, "process_started", lambda pid=None: started)
    launched = started - 1.5  # hvdtrain started the launcher 1.5 s before this process
    clock = startup.Startup({startup.LAUNCHED_ENV: f"{launched:.6f}"})
    now = [time.time() + 10.0]
    monkeypatch.setattr(startup.time, "time", lambda: now[0])
    clock.mark("imports")
    now[0] += 0.25
    clock.mark("hvd.init")
    phases = clock.phases()
    assert list(phases) == ["launch", "imports", "hvd.init"]
    assert phases["launch"] == pytest.approx(1.5, abs=0.002) and phases["hvd.init"] == pytest.approx(0.25, abs=0.002)
    assert clock.line().startswith(
        f"start-up: {sum(phases.values()):.2f} s to the end of the first step (launch 1.50 s"
    )
    # Not launched by hvdtrain (or a launch time after this process's start, another clock): no launch phase.
    assert list(startup.Startup({}).phases()) == []
    assert "launch" not in startup.Startup({startup.LAUNCHED_ENV: f"{time.time() + 60:.6f}"}).marks[0][0]
    assert startup.Startup({startup.LAUNCHED_ENV: "soon"}).marks[0][0] == ""
