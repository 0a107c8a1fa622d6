"""The run directory's lock (hvdtrain.launching.runlock) and the process names it rests on (hvdtrain.procs)."""

import os
import socket
import subprocess
import sys

import pytest

from hvdtrain import procs
from hvdtrain.env import SlurmEnv
from hvdtrain.errors import UsageError
from hvdtrain.launching import runlock


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_process_names_tell_a_live_process_from_a_gone_or_reused_one():
    me = procs.identity()
    host, pid, start = me.split()
    assert host == socket.gethostname() and int(pid) == os.getpid() and start.isdigit()
    assert procs.alive(me) is True
    assert procs.alive(f"{host} {pid} {int(start) + 1}") is False  # the pid, reused by a later process
    assert procs.alive(f"{host} {dead_pid()} {start}") is False
    assert procs.alive(f"another-host.invalid {pid} {start}") is None  # cannot tell from here
    assert procs.alive("garbage") is None


def test_the_lock_is_held_while_the_block_runs_and_refused_to_a_second_holder(tmp_path):
    lock = tmp_path / "run" / "hvdtrain.lock"
    with runlock.hold(lock, "--run-dir", slurm=SlurmEnv()):
        assert lock.read_text().split()[:2] == [socket.gethostname(), str(os.getpid())]
        with pytest.raises(UsageError, match=rf"--run-dir {tmp_path / 'run'}: a job is already running there \(pid "):
            with runlock.hold(lock, "--run-dir", slurm=SlurmEnv()):
                pass
    assert not lock.exists()


@pytest.mark.parametrize(
    "holder,environ,taken",
    [
        (lambda: f"{socket.gethostname()} {dead_pid()} 1\n", {}, True),  # its process is gone
        (lambda: "\n", {}, True),  # an empty lock: a holder killed while writing it
        (lambda: "node9.invalid 4242 77\n", {}, False),  # another host: cannot tell, so refused
        # A requeued job finds the lock of its own earlier run (another host perhaps): stale.
        (
            lambda: "node9.invalid 4242 77 slurm-job 99 restart 0\n",
            {"SLURM_JOB_ID": "99", "SLURM_RESTART_COUNT": "1"},
            True,
        ),
        # The same run of the same job, on another host (a second hvdtrain in one allocation): not stale.
        (
            lambda: "node9.invalid 4242 77 slurm-job 99 restart 1\n",
            {"SLURM_JOB_ID": "99", "SLURM_RESTART_COUNT": "1"},
            False,
        ),
        (
            lambda: "node9.invalid 4242 77 slurm-job 98 restart 0\n",
            {"SLURM_JOB_ID": "99", "SLURM_RESTART_COUNT": "1"},
            False,
        ),
    ],
)
def test_stale_locks_are_taken_over_and_unknown_ones_refused(tmp_path, holder, environ, taken):
    lock = tmp_path / "hvdtrain.lock"
    text = holder()
    lock.write_text(text)
    if taken:
        runlock.check(
            lock, "--run-dir", slurm=SlurmEnv.read(environ)
        )  # the early check lets it through, touching nothing
        assert lock.read_text() == text
        with runlock.hold(lock, "--run-dir", slurm=SlurmEnv.read(environ)):
            assert str(os.getpid()) in lock.read_text()
        assert not lock.exists()
    else:
        for attempt in (lambda: runlock.check(lock, "--run-dir", slurm=SlurmEnv.read(environ)), lambda: runlock.hold(lock, "--run-dir", slurm=SlurmEnv.read(environ)).__enter__()):  # fmt: skip
            with pytest.raises(UsageError, match="which this host cannot check.*if it is gone, delete"):
                attempt()
        assert lock.read_text() == text  # left as it was


def test_the_early_check_refuses_a_live_holder_and_passes_no_lock(tmp_path):
    """`hvdtrain train` checks before it reads the run directory's checkpoints (a live job rewrites them)."""
    lock = tmp_path / "run" / "hvdtrain.lock"
    runlock.check(lock, "--run-dir", slurm=SlurmEnv())  # no lock, no directory: nothing to refuse, nothing written
    assert not lock.parent.exists()
    with runlock.hold(lock, "--run-dir", slurm=SlurmEnv()):
        with pytest.raises(UsageError, match=rf"--run-dir {tmp_path / 'run'}: a job is already running there \(pid "):
            runlock.check(lock, "--run-dir", slurm=SlurmEnv())
