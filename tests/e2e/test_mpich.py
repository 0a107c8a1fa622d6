"""`hvdtrain run` under MPICH's Hydra (Debian's MPICH 4.0.2), as a user who loaded an MPICH module: the guarantees
of the Open MPI path. Each rank knows its place, its output is prefixed with its rank, no Open MPI variable reaches
it; a failing rank is named, fast, with its exit status, whether it is an MPI process (a small program built with
MPICH's mpicc: MPI_Init works through the rank wrapper) or not; USR1 and USR2 reach every rank; Ctrl-C, SIGTERM
and SIGKILL of hvdtrain leave no process. Plain python and C only: this venv's mpi4py and Horovod are Open MPI's
(training under MPICH needs an MPICH-built venv)."""

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from jobprocs import job_processes
from mpich import HYDRA, compile_mpi, requires_mpich

pytestmark = [pytest.mark.mpich, requires_mpich]

HVDTRAIN = [sys.executable, "-m", "hvdtrain"]
GONE_WITHIN_S = 10.0
PLACE = (
    "import os; from hvdtrain.env import rank_info; "
    "print(rank_info(), sorted(k for k in os.environ if k.startswith('OMPI_')), flush=True)"
)
# Rank 1 fails at once; rank 0 would sleep for two minutes.
ONE_FAILS = (
    "import os, sys, time\nif os.environ['PMI_RANK'] == '1':\n    sys.exit('boom on purpose from rank 1')\n"
    "time.sleep(120)\n"
)
# MPI_Init and a barrier; the rank named by argv[1] leaves before MPI_Finalize with status 3.
MPI_PROGRAM = r"""
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    int rank, size;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    printf("hello from %d of %d\n", rank, size);
    fflush(stdout);
    if (argc > 1 && rank == atoi(argv[1])) {
        fprintf(stderr, "rank %d leaves before MPI_Finalize on purpose\n", rank);
        exit(3);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Finalize();
    return 0;
}
"""
# Records USR1 and USR2 in DIR/signals.R (argv: DIR MARKER), leaves once it has both.
SIGNALS = """
import os, signal, sys, time
got = []
def note(signum, _frame):
    got.append(signal.Signals(signum).name)
    with open(os.path.join(sys.argv[1], "signals." + os.environ["PMI_RANK"]), "a") as f:
        f.write(got[-1] + "\\n")
for s in (signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, note)
print("up", flush=True)
deadline = time.monotonic() + 60
while len(got) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
"""


@pytest.fixture
def hvdtrain(mpich_env, tmp_path):
    def call(*args, timeout=120):
        return subprocess.run(
            [*HVDTRAIN, *map(str, args)], cwd=tmp_path, env=mpich_env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip

    return call


@pytest.fixture
def start(mpich_env, tmp_path):
    """`hvdtrain run -np 2 --output-dir LOGS -- python -c CODE MARKER` in a session of its own (its group stands
    for a terminal's); returns (Popen, marker) once both ranks said "up". The marker (a path) is on the command
    line of hvdtrain, mpiexec, the rank wrappers and the commands: what is left of the job."""
    started = []

    def run(code, stderr=subprocess.DEVNULL):
        marker = str(tmp_path / "job-marker")
        logs = tmp_path / "logs"
        proc = subprocess.Popen(
            [*HVDTRAIN, "run", "-np", "2", "--output-dir", str(logs), "--", sys.executable, "-c", code, str(tmp_path),
             marker],
            env=mpich_env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr, text=True, start_new_session=True,
        )  # fmt: skip
        started.append((proc, marker))
        deadline = time.monotonic() + 60
        while not all(
            (logs / f"rank.{r}.log").exists() and "up" in (logs / f"rank.{r}.log").read_text() for r in (0, 1)
        ):
            assert proc.poll() is None and time.monotonic() < deadline, f"the ranks did not start (exit {proc.poll()})"
            time.sleep(0.05)
        return proc, marker

    yield run
    for proc, marker in started:  # whatever a failed test left
        for p in [*job_processes(marker), *([psutil.Process(proc.pid)] if proc.poll() is None else [])]:
            try:
                p.kill()
            except psutil.Error:
                pass
        proc.wait(timeout=30)


SLEEPER = "import time; print('up', flush=True); time.sleep(120)"


def proxies_of(marker: str) -> list:
    """Hydra's proxies of the job: the children of its mpiexec (their command line does not name the job)."""
    return [c for p in job_processes(marker) if p.cmdline()[0] == str(HYDRA) for c in p.children()]


def running(p) -> bool:
    """Still there and not a zombie (a process gone whose parent has not reaped it yet)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(processes: list, timeout: float = GONE_WITHIN_S) -> list:
    deadline = time.monotonic() + timeout
    left = [p for p in processes if running(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if running(p)]
    return left


def test_each_rank_knows_its_place_and_its_output_is_prefixed_with_its_rank(hvdtrain, tmp_path):
    logs = tmp_path / "logs"
    result = hvdtrain("run", "-np", "2", "--output-dir", logs, "--", "python", "-c", PLACE)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("["))
    assert lines == [
        f"[{r}] RankInfo(rank={r}, size=2, local_rank={r}, local_size=2) []" for r in (0, 1)
    ]  # Hydra's PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS; no OMPI_* variable
    for r in (0, 1):
        assert (logs / f"rank.{r}.log").read_text().startswith(f"RankInfo(rank={r},")  # the logs are not prefixed
        assert (logs / f"rank.{r}.exit").read_text() == "0\n"
    dry = hvdtrain("run", "-np", "2", "--dry-run", "--", "python", "-c", "pass")
    assert dry.stdout.splitlines()[0] == f"# mpirun: MPICH (Hydra) 4.0.2 ({tmp_path / 'mpich/bin/mpirun'} -> {HYDRA})"
    assert dry.stdout.splitlines()[-1].startswith(f"{HYDRA} -n 2 -hosts localhost:2 -bind-to none -prepend-rank ")


def test_an_mpi_rank_that_leaves_before_mpi_finalize_is_named_fast(hvdtrain, mpich_env, tmp_path):
    program = compile_mpi(MPI_PROGRAM, tmp_path / "mpi_job", tmp_path / "mpich" / "bin")
    ok = hvdtrain("run", "-np", "2", "--", program)
    assert ok.returncode == 0, ok.stdout + ok.stderr  # MPI_Init through the rank wrapper (the PMI socket)
    assert sorted(line for line in ok.stdout.splitlines() if "hello" in line) == [
        "[0] hello from 0 of 2", "[1] hello from 1 of 2",
    ]  # fmt: skip
    started = time.monotonic()
    failed = hvdtrain("run", "-np", "2", "--", program, "1", timeout=120)
    assert time.monotonic() - started < 60 and failed.returncode == 3, failed.stdout + failed.stderr
    report = [line for line in failed.stderr.splitlines() if line.startswith("hvdtrain: error: ")]
    assert report and report[0].startswith("hvdtrain: error: rank 1 failed with exit status 3"), failed.stderr
    assert "rank 1 leaves before MPI_Finalize on purpose" in failed.stderr


def test_a_rank_that_fails_ends_the_job_fast_and_is_named(hvdtrain):
    """Not an MPI process: Hydra would leave rank 0 to its two minutes; run_job ends the job, as mpirun does."""
    started = time.monotonic()
    result = hvdtrain("run", "-np", "2", "--", "python", "-c", ONE_FAILS)
    assert time.monotonic() - started < 60, result.stderr
    assert result.returncode == 1, result.stdout + result.stderr
    report = [line for line in result.stderr.splitlines() if line.startswith("hvdtrain: error: ")]
    assert report and report[0].startswith("hvdtrain: error: rank 1 failed with exit status 1"), result.stderr
    assert "boom on purpose from rank 1" in result.stderr


# Reports its steps; rank 1 stops at step 20, asleep in a function of its own.
STOPS = """
import os, time
import hvdtrain.progress as progress
def asleep_for_good():
    time.sleep(120)
for step in range(100000):
    progress.step(step)
    if os.environ["PMI_RANK"] == "1" and step == 20:
        asleep_for_good()
    time.sleep(0.01)
"""


def test_a_rank_that_makes_no_progress_is_ended_by_the_hang_watchdog(hvdtrain, tmp_path):
    """Under Hydra too: the watchdog names rank 1 and its function, ends the job with status 124, keeps the stacks."""
    started = time.monotonic()
    logs = tmp_path / "logs"
    result = hvdtrain("run", "-np", "2", "--hang-timeout", "4", "--output-dir", logs, "--", "python", "-c", STOPS)
    took = time.monotonic() - started
    assert result.returncode == 124, result.stdout + result.stderr
    line = result.stderr.splitlines()[-1]  # after run's warnings that this venv's Horovod and mpi4py are Open MPI's
    assert re.match(r"hvdtrain: error: hang: rank 1 \(\S+\) is in asleep_for_good \(<string>:5\) at step 20", line), (
        line
    )
    assert "asleep_for_good" in (logs / "rank.1.stacks").read_text()
    assert took < 40, took


RANKS_TESTS = "import pytest\n\n\n@pytest.mark.ranks([2, 3])\ndef test_place(world):\n    assert world.rank < 2\n"


def test_the_pytest_plugin_launches_its_tests_through_hydra(mpich_env, tmp_path):
    """hvdtrain.testing under an MPICH module: a plain pytest launches each size through mpiexec, each rank knows its
    place (PMI_RANK), and a failing rank is named in the test's one line."""
    (tmp_path / "test_ranks.py").write_text(RANKS_TESTS)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--color=no", "-rA", "test_ranks.py"],
        cwd=tmp_path, env={**mpich_env, "COLUMNS": "400"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "PASSED test_ranks.py::test_place[np2]" in done.stdout, done.stdout + done.stderr
    assert "FAILED test_ranks.py::test_place[np3] - rank 2: assert 2 < 2" in done.stdout, done.stdout
    assert done.returncode == 1


def test_usr1_and_usr2_reach_every_rank(start, tmp_path):
    """Preemption warnings: Hydra passes USR1 on, and would die of USR2 (hvdtrain gives it to the wrappers)."""
    proc, _ = start(SIGNALS)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=60) == 0
    for r in (0, 1):
        assert (tmp_path / f"signals.{r}").read_text() == "SIGUSR1\nSIGUSR2\n"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_end_every_rank_and_leave_nothing(start, signum):
    proc, marker = start(SLEEPER, stderr=subprocess.PIPE)
    proxies = proxies_of(marker)
    assert proxies
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the foreground group
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert f"hvdtrain: error: the job was stopped by {signal.Signals(signum).name}" in err
    assert not wait_gone([*job_processes(marker), *proxies])


@pytest.mark.parametrize("target", ["process", "group"])
def test_sigkill_of_hvdtrain_leaves_no_rank_and_no_proxy_behind(start, target):
    proc, marker = start(SLEEPER)
    proxies = proxies_of(marker)
    assert len([p for p in job_processes(marker) if p.cmdline()[1:3] == ["-m", "hvdtrain.launching.rank"]]) == 2
    assert proxies
    if target == "process":
        os.kill(proc.pid, signal.SIGKILL)
    else:  # the OOM killer, or `kill -9 -PGID`
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    left = wait_gone([*job_processes(marker), *proxies])
    assert not left, [(p.pid, p.cmdline()[:3]) for p in left]
