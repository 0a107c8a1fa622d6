"""The rank wrapper (run for real, as the launchers run it) and where a rank learns its place on its host."""

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from hvdtrain.env import RankInfo, expand_tasks_per_node, rank_info
from hvdtrain.launching import rank
from hvdtrain.rundir import RankLogs

PRINT_THREADS = "import os; print('threads', os.environ.get('OMP_NUM_THREADS'))"
# Launcher variables that would otherwise leak from the test's own environment into the wrapper's.
PLACES = ("HOROVOD_", "OMPI_COMM_WORLD_", "PMIX_", "PMI_", "SLURM_", "MPI_LOCAL")


def wrapper(log_dir, *args, env=None):
    """Run `python -m hvdtrain.launching.rank` as a launcher does; returns the CompletedProcess."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(PLACES) and k != "OMP_NUM_THREADS"}
    return subprocess.run(
        [sys.executable, "-m", "hvdtrain.launching.rank", "--log-dir", str(log_dir), *args],
        env={**base, **(env or {})}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize(
    "local_size,env",
    [
        (2, {"HOROVOD_RANK": "3", "HOROVOD_SIZE": "4", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "2"}),
        (1, {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}),
        # srun --mpi=pmix: no local size variable; the step's tasks on this node (node 1 of '3,1') say 1.
        (1, {"PMIX_RANK": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "3,1", "SLURM_NODEID": "1"}),
        # MPICH's Hydra (as `mpiexec -n 4 env` shows them)
        (2, {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}),
    ],
)
def test_auto_threads_are_this_hosts_cpus_over_its_ranks(tmp_path, local_size, env):
    """--threads auto: each rank divides its own host's CPUs by the ranks on its host, whatever the launcher."""
    proc = wrapper(tmp_path, "--threads", "auto", "--", sys.executable, "-c", PRINT_THREADS, env=env)
    assert proc.returncode == 0, proc.stderr
    expected = max(1, len(os.sched_getaffinity(0)) // local_size)
    assert proc.stdout.split() == ["threads", str(expected)]
    assert (tmp_path / "rank.3.host").read_text() == socket.gethostname() + "\n"
    assert (tmp_path / "rank.3.exit").read_text() == "0\n"


def test_auto_threads_inside_slurm_are_the_jobs_cpus_per_task(tmp_path):
    """sbatch --cpus-per-task=3: each rank's OpenMP gets 3 threads, whatever this host's CPUs and ranks."""
    env = {"PMIX_RANK": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_CPUS_PER_TASK": "3"}
    proc = wrapper(tmp_path, "--threads", "auto", "--", sys.executable, "-c", PRINT_THREADS, env=env)
    assert proc.stdout.split() == ["threads", "3"], proc.stderr


def test_a_task_of_an_srun_step_without_mpi_wire_up_does_not_start(tmp_path):
    """srun --mpi=none, 2 tasks: no PMIx or PMI variable, so each MPI rank would be rank 0 of 1; the wrapper says so in
    one line (rank 0 on stderr, every rank in its log) and ends with status 2, its command never started."""
    step = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"}
    started = tmp_path / "started"
    command = ["--", sys.executable, "-c", f"open({str(started)!r}, 'w')"]
    for r in (0, 1):
        proc = wrapper(tmp_path, *command, env={**step, "SLURM_PROCID": str(r)})
        line = (tmp_path / f"rank.{r}.log").read_text()
        assert proc.returncode == 2 and (tmp_path / f"rank.{r}.exit").read_text() == "2\n"
        assert line.startswith("hvdtrain: error: srun started 2 tasks with --mpi=none") and line.count("\n") == 1
        assert "try --mpi=pmix" in line and proc.stderr == (line if r == 0 else "") and proc.stdout == ""
    assert not started.exists()
    wired = wrapper(tmp_path, *command[:-1], "pass", env={**step, "SLURM_PROCID": "0", "SLURM_MPI_TYPE": "pmix",
                                                          "PMIX_RANK": "0"})  # fmt: skip
    assert wired.returncode == 0, wired.stderr


def test_threads_given_or_left_alone(tmp_path):
    given = wrapper(tmp_path, "--threads", "3", "--", sys.executable, "-c", PRINT_THREADS)
    assert given.stdout.split() == ["threads", "3"]
    # Without --threads (an older launcher's command line) the inherited value is kept.
    kept = wrapper(tmp_path, "--", sys.executable, "-c", PRINT_THREADS, env={"OMP_NUM_THREADS": "5"})
    assert kept.stdout.split() == ["threads", "5"]


def test_host_record_comes_first_and_stays_when_the_rank_is_killed(tmp_path):
    """A rank SIGKILLed with its wrapper (a lost host) leaves its host record and no exit record."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hvdtrain.launching.rank", "--log-dir", str(tmp_path), "--", sys.executable, "-c",
         "import time; print('up', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    command = []
    try:
        assert proc.stdout.readline().strip() == "up"
        command = psutil.Process(proc.pid).children()
        assert RankLogs(tmp_path).host(0).read_text().strip() == socket.gethostname()
    finally:
        for p in [proc, *command]:  # the wrapper and its command, as SIGKILL of a whole host would
            p.kill()
        proc.wait()
    assert not RankLogs(tmp_path).exit(0).exists()


def test_the_pmi_socket_reaches_the_command_and_stays_open_until_the_exit_record_is_written(tmp_path):
    """MPICH's Hydra hands each rank a socket (PMI_FD) its MPI talks over: the command gets it (MPI_Init fails
    without), and the wrapper keeps its own copy until its exit record is written: Hydra kills every process of the
    job once that socket closes before MPI_Finalize, and the report needs the record of the rank that died."""
    ours, theirs = socket.socketpair()
    fd = theirs.fileno()
    command = f"import os, sys; os.write({fd}, b'init'); os.close({fd}); sys.exit(3)"
    base = {k: v for k, v in os.environ.items() if not k.startswith(PLACES)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hvdtrain.launching.rank", "--log-dir", str(tmp_path), "--", sys.executable, "-c",
         command],
        env={**base, "PMI_FD": str(fd), "PMI_RANK": "1", "PMI_SIZE": "2"}, pass_fds=(fd,),
    )  # fmt: skip
    theirs.close()
    try:
        ours.settimeout(30)
        assert ours.recv(16) == b"init"  # the command wrote on it
        assert ours.recv(16) == b""  # closed by every holder: the wrapper's copy went last ...
        assert RankLogs(tmp_path).exit(1).read_text() == "3\n"  # ... after its record
    finally:
        ours.close()
        assert proc.wait(timeout=30) == 3
    assert rank.pmi_fds({"PMI_FD": "not a number"}) == () and rank.pmi_fds({}) == ()
    assert rank.pmi_fds({"PMI_FD": str(fd)}) == ()  # closed here: nothing to hand on


def test_signal_wrappers_reaches_the_wrappers_under_a_process_and_nothing_else(tmp_path):
    """How a launcher that would die of USR1/USR2 (horovodrun's elastic driver, MPICH's mpiexec with USR2) gets
    them to the ranks: every rank wrapper under it, found by its command line, passes the signal on."""
    trap = (
        "import signal, sys, time; signal.signal(signal.SIGUSR2, lambda *a: (print('USR2', flush=True), "
        "sys.exit(0))); print('up', flush=True); time.sleep(30)"
    )
    wrapped = [sys.executable, "-m", "hvdtrain.launching.rank", "--log-dir", str(tmp_path), "--", sys.executable]
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; [p.wait() for p in "
         f"[subprocess.Popen({wrapped + ['-c', trap]!r}), subprocess.Popen({[sys.executable, '-c', trap]!r})]]"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert [launcher.stdout.readline().strip() for _ in range(2)] == ["up", "up"]
        rank.signal_wrappers(signal.SIGUSR2, launcher.pid)
        assert launcher.stdout.readline().strip() == "USR2"  # the wrapped command's
        deadline = time.monotonic() + 30
        while not RankLogs(tmp_path).exit(0).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert RankLogs(tmp_path).exit(0).read_text() == "0\n"  # it ended as its handler said
        assert launcher.poll() is None  # the other child, no wrapper, got nothing and runs on
    finally:
        for p in psutil.Process(launcher.pid).children(recursive=True):
            p.kill()
        launcher.kill()
        launcher.wait()


def test_a_full_file_system_under_the_log_is_one_line_and_the_rank_goes_on(tmp_path):
    """The log's file system fills up while the command prints (a real small tmpfs: tests/fullfs.py): the wrapper
    says so once, every line still reaches the launcher, the command's exit status is the rank's; the exit record
    that no longer fits is said too. No traceback."""
    import fullfs

    mnt = tmp_path / "mnt"
    base = {k: v for k, v in os.environ.items() if not k.startswith(PLACES)}
    command = [sys.executable, "-c", "for i in range(3000): print(f'line {i:04d}', 'x' * 40)\nraise SystemExit(3)"]
    proc = fullfs.run(
        [sys.executable, "-m", "hvdtrain.launching.rank", "--log-dir", str(mnt / "logs"), "--", *command],
        mnt, size="256k", leave=8192, env={**base, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"},
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    lines = proc.stdout.splitlines()
    warned = [line for line in lines if line.startswith("hvdtrain: ")]
    assert len(warned) == 1 and warned[0].startswith(
        f"hvdtrain: warning: cannot write {mnt}/logs/rank.0.log: the file system is full (only "
    ), warned
    assert warned[0].endswith(f"free on {mnt}); this rank's output goes on to the launcher only")
    assert [line for line in lines if not line.startswith("hvdtrain: ")] == [
        f"line {i:04d} {'x' * 40}" for i in range(3000)
    ]
    assert proc.stderr.startswith(f"hvdtrain: warning: cannot write {mnt}/logs/rank.0.exit: the file system is full")
    assert "Traceback" not in proc.stdout + proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["--threads", "0", "--", "true"],
        ["--threads", "many", "--", "true"],
        ["--threads", "auto", "true"],
        ["--threads", "auto", "--"],
    ],
)
def test_bad_arguments(tmp_path, args):
    proc = wrapper(tmp_path, *args)
    assert proc.returncode == 2 and proc.stderr.strip() == rank.USAGE
    assert not list(tmp_path.iterdir())


def test_parse_args():
    assert rank.parse_args(["--log-dir", "d", "--threads", "auto", "--", "a", "--", "b"]) == (
        rank.Path("d"),
        "auto",
        ["a", "--", "b"],
    )
    assert rank.parse_args(["--log-dir", "d", "--", "x"]) == (rank.Path("d"), None, ["x"])
    assert rank.parse_args(["--threads", "2", "--", "x"]) is None  # no log dir
    assert rank.parse_args(["--log-dir", "d", "--log-dir", "e", "--", "x"]) is None


def test_threads_for():
    assert rank.threads_for("auto", local_size=2, cpus=8) == 4
    assert rank.threads_for("auto", local_size=3, cpus=2) == 1
    assert rank.threads_for("auto", local_size=1, cpus=16) == 16
    assert rank.threads_for("6", local_size=4, cpus=2) == 6
    assert rank.threads_for("auto", local_size=2, cpus=8, cpus_per_task=3) == 3
    assert rank.threads_for("6", local_size=2, cpus=8, cpus_per_task=3) == 6


def test_rank_info_local_size_from_the_srun_step():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1] and expand_tasks_per_node("x") == []
    srun = {"PMIX_RANK": "6", "SLURM_STEP_NUM_TASKS": "7", "SLURM_LOCALID": "0", "SLURM_NODEID": "3"}
    assert rank_info({**srun, "SLURM_STEP_TASKS_PER_NODE": "2(x3),1"}) == RankInfo(6, 7, 0, 1)
    assert rank_info({**srun, "SLURM_STEP_TASKS_PER_NODE": "2(x4)"}) == RankInfo(6, 7, 0, 2)
    # Nothing says: the job's size (the safe side: fewer threads, never more).
    assert rank_info({"PMIX_RANK": "1", "PMIX_SIZE": "4"}) == RankInfo(1, 4, 1, 4)
