"""The per-rank wrapper: ``python -m hvdtrain.launching.rank --log-dir DIR [--threads auto|N] -- COMMAND...``.

Every launcher starts the user's command through this wrapper on each rank. It first writes DIR/rank.R.host
(the host it runs on), sets OMP_NUM_THREADS for the command (``--threads N``: N; ``auto``: the job's
--cpus-per-task inside Slurm, else this host's CPUs divided by the ranks on this host, worked out here, so each
host gets its own value whatever the launcher), runs the command, copies its output both to the wrapper's own
stdout (which the launcher shows, prefixed by rank; there a traceback of Horovod's shutdown, printed by a program
that does not catch it after another rank failed, is one line: launching.tracebacks) and to DIR/rank.R.log
(whole), passes on the signals a scheduler sends, and finally writes DIR/rank.R.exit with the exit status, so that
the launching side can say which rank failed (or which host was lost) and show its last lines. A log or record it
cannot write (a full file system) is said in one line, and the rank goes on: its output still reaches the
launcher. A task of an srun step of several whose --mpi plugin
left it nothing to find the others by (--mpi=none: each MPI rank would be rank 0 of 1) does not start the
command: one line naming the plugin to try, exit status 2.

With a hang watchdog (HVDTRAIN_WATCHDOG, set by run_job unless --hang-timeout 0 or an elastic job) the command gets
its progress record and its stack record (launching.ranklink: memfds, a sitecustomize that registers the stack
dump), and a thread of the wrapper reports the progress to the watchdog once a second, dumps the rank's stacks
and ends it when the watchdog asks.

A rank never outlives its job: the command dies with the wrapper (the kernel's parent-death signal), and a thread
ends the command (SIGTERM to its process group, SIGKILL after END_GRACE_S) once the process that started the
wrapper is gone (the launcher's daemon, sshd's session, slurmstepd: the wrapper's parent changes) or, on the
launching machine, the hvdtrain process that launched the job (HVDTRAIN_LAUNCHER) is: a SIGKILLed hvdtrain leaves
mpirun or horovodrun alive for a moment, and their ranks in sessions of their own.

In an elastic job (horovodrun sets HOROVOD_ELASTIC=1, and per worker HOROVOD_HOSTNAME and HOROVOD_LOCAL_RANK:
the host as the discovery names it and the slot there, stable for the process's life while its rank changes at
every reset) the records are the worker's instead: DIR/worker.<host>.<slot>.{host,log,exit}. A worker started
again on the same host and slot appends to its log after a line
``=== hvdtrain: worker <host>[<slot>] started <UTC time> ===``.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Mapping, Optional

from hvdtrain import procs
from hvdtrain.env import SlurmEnv, rank_info
from hvdtrain.errors import HvdtrainError
from hvdtrain.files import full_disk, write_text_atomic
from hvdtrain.launching import ranklink, tracebacks
from hvdtrain.rundir import RankLogs
from hvdtrain.srunmpi import wire_up_problem

WRAPPER = "hvdtrain.launching.rank"  # how a wrapper is found among processes (its command line)
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
USAGE = "usage: python -m hvdtrain.launching.rank --log-dir DIR [--threads auto|N] -- COMMAND..."
AUTO = "auto"
WATCH_INTERVAL_S = 0.5  # how often a rank checks that its job is still there
END_GRACE_S = 3.0  # after SIGTERM, how long an orphaned command may take to end before it is SIGKILLed


def parse_args(argv: list[str]) -> Optional[tuple[Path, Optional[str], list[str]]]:
    """(log dir, threads choice or None, command) from the wrapper's arguments; None when they are malformed."""
    options: dict[str, str] = {}
    i = 0
    while i + 1 < len(argv) and argv[i] in ("--log-dir", "--threads") and argv[i] not in options:
        options[argv[i]] = argv[i + 1]
        i += 2
    threads = options.get("--threads")
    command = argv[i + 1 :]
    if "--log-dir" not in options or i >= len(argv) or argv[i] != "--" or not command:
        return None
    if threads is not None and threads != AUTO and not (threads.isdigit() and int(threads) > 0):
        return None
    return Path(options["--log-dir"]), threads, command


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a cgroup cpuset or taskset counts), else all."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_for(choice: str, local_size: int, cpus: int, cpus_per_task: Optional[int] = None) -> int:
    """OMP_NUM_THREADS for a rank: N as given, or (auto) the job's --cpus-per-task inside Slurm, else this host's
    CPUs shared by the ranks on it, at least 1."""
    if choice == AUTO:
        return cpus_per_task or max(1, cpus // max(1, local_size))
    return int(choice)


def elastic_worker(environ: Mapping[str, str]) -> Optional[tuple[str, int]]:
    """(host, slot) of a worker of an elastic horovodrun job, None in any other job."""
    host, slot = environ.get("HOROVOD_HOSTNAME"), environ.get("HOROVOD_LOCAL_RANK", "")
    if environ.get("HOROVOD_ELASTIC") != "1" or not host or not slot.isdigit():
        return None
    return host, int(slot)


def started_line(host: str, slot: int, now: Optional[datetime.datetime] = None) -> str:
    """The line an elastic worker's log gets each time a worker starts on that host and slot."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return f"=== hvdtrain: worker {host}[{slot}] started {now:%Y-%m-%d %H:%M:%S} UTC ===\n"


def orphaned(parent: int, launcher: Optional[str]) -> Optional[str]:
    """Why this rank has lost its job, None while it has not: the process that started the wrapper (pid `parent`)
    is gone, or the launching hvdtrain process (`launcher`, procs.identity form) is, where this machine can tell."""
    if os.getppid() != parent:
        return f"the process that started it (pid {parent}) is gone"
    if launcher and procs.alive(launcher) is False:
        return f"the hvdtrain process that launched the job (pid {launcher.split()[1]}) is gone"
    return None


def _end_group(proc: subprocess.Popen, wake: bool = False) -> None:
    """SIGTERM to the command's process group, SIGKILL after END_GRACE_S if it is still there; `wake`: SIGCONT first
    (a stopped process takes no SIGTERM)."""
    if wake:
        try:
            os.killpg(proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            return
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + END_GRACE_S
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is not None:
            return


def watch(proc: subprocess.Popen, parent: int, launcher: Optional[str], say) -> threading.Thread:
    """A daemon thread that ends `proc` (its group) once this rank has lost its job (`orphaned`)."""

    def run():
        while proc.poll() is None:
            why = orphaned(parent, launcher)
            if why is not None:
                say(f"hvdtrain: {why}: ending this rank's command\n".encode())
                _end_group(proc)
                return
            time.sleep(WATCH_INTERVAL_S)

    thread = threading.Thread(target=run, name="hvdtrain-orphan-watch", daemon=True)
    thread.start()
    return thread


def _records(logs: RankLogs, rank: int, worker: Optional[tuple[str, int]]) -> tuple[str, Path, Path, Path]:
    """(how the report names this process, its host record, its log, its exit record): a rank's, or an elastic
    worker's (a rank changes at every reset)."""
    if worker is None:
        return f"rank {rank}", logs.host(rank), logs.log(rank), logs.exit(rank)
    return (
        f"worker {worker[0]}[{worker[1]}]",
        logs.worker_host(*worker),
        logs.worker_log(*worker),
        logs.worker_exit(*worker),
    )


def pmi_fds(environ: Mapping[str, str]) -> tuple[int, ...]:
    """The descriptor a PMI process manager handed this process for the rank's MPI to talk over (PMI_FD: MPICH's
    Hydra, Intel MPI, srun --mpi=pmi2), when it is open here; () otherwise."""
    fd = environ.get("PMI_FD", "")
    if not fd.isdigit():
        return ()
    try:
        os.fstat(int(fd))
    except OSError:
        return ()
    return (int(fd),)


def _start(command: list[str], env: dict[str, str], fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """The command in its own process group (ended as one), SIGKILLed by the kernel if the wrapper dies first. It
    gets the PMI descriptor (without it MPI_Init fails under Hydra). The wrapper keeps its own copy open until it
    exits: Hydra ends the whole job (SIGKILL) once that socket closes before MPI_Finalize, and the wrapper of a rank
    that died must have written its exit record by then."""
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        process_group=0,
        preexec_fn=procs.die_with_parent(signal.SIGKILL),
        pass_fds=(*pmi_fds(env), *fds),
    )


def signal_wrappers(signum: int, pid: Optional[int] = None) -> None:
    """Send `signum` to every rank wrapper under process `pid` (this one by default), found by its command line:
    for a launcher that would die of the signal instead of passing it on (horovodrun's elastic driver, MPICH's
    mpiexec with USR2)."""
    import psutil

    try:
        below = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return
    for p in below:
        try:
            if WRAPPER in p.cmdline():
                p.send_signal(signum)
        except psutil.Error:
            pass


class _Log:
    """The rank's log file, written as the output comes: a write that fails (a full file system) is said once on
    the rank's output, which then goes on to the launcher only; the rank goes on."""

    def __init__(self, f, path: Path):
        self.f, self.path, self.failed = f, path, False

    def write(self, data: bytes) -> None:
        if self.failed:
            return
        try:
            while data:
                data = data[self.f.write(data) :]
        except OSError as e:
            self.failed = True
            _warn(self.path, e, "this rank's output goes on to the launcher only", sys.stdout.buffer)


def _warn(path: Path, error: Exception, then: str, out=None) -> None:
    """One line for a record or log the wrapper could not write (the rank goes on without it)."""
    cause = full_disk(path, error, fix=then) or f"cannot write {path} ({error}); {then}"
    out = out or sys.stderr.buffer
    try:
        out.write(f"hvdtrain: warning: {cause}\n".encode())
        out.flush()
    except OSError:
        pass


def _record(path: Path, text: str) -> None:
    """A host or exit record; one that cannot be written is said (the launch report then knows less)."""
    try:
        write_text_atomic(path, text)
    except (OSError, HvdtrainError) as e:
        _warn(path, e, "the launch report cannot read it")


def _run_teed(command: list[str], env: dict[str, str], log, name: str, parent: int, rank: int) -> int:
    """Run `command` with its output copied to `log` and our stdout; its exit status (128 + N for signal N; 127 when
    it cannot start). Signals are forwarded to it; it ends when the wrapper's parent or the launcher is gone. With a
    hang watchdog (ranklink.WATCHDOG_ENV) the command gets its progress and stack records, and a thread of ours
    tells the watchdog where it is."""
    watchdog = os.environ.get(ranklink.WATCHDOG_ENV)
    records = ranklink.records_or_none(log.write) if watchdog else None
    if records is not None:
        env = {**env, **records.env(env)}
    try:
        proc = _start(command, env, records.fds if records else ())
    except OSError as e:
        msg = f"hvdtrain: {name}: cannot start {command[0]!r}: {e.strerror}\n".encode()
        log.write(msg)
        sys.stderr.buffer.write(msg)
        return 127
    for s in _FORWARDED:
        signal.signal(s, lambda signum, _frame: proc.send_signal(signum))
    watch(proc, parent, os.environ.get(procs.LAUNCHER_ENV), log.write)
    out = sys.stdout.buffer
    if records is not None:
        ranklink.Link(records, rank, lambda: _end_group(proc, wake=True), log.write).start(proc, watchdog)

    def show(chunk: bytes) -> None:
        try:
            out.write(chunk)
            out.flush()
        except (BrokenPipeError, OSError):
            pass  # the launcher went away; keep the log complete

    # The terminal gets a traceback of Horovod's shutdown (another rank failed) as one line; the log keeps it.
    terminal = tracebacks.Folder(show, f"{tracebacks.folded_line(str(log.path))}\n".encode())
    for chunk in iter(lambda: proc.stdout.readline(), b""):
        log.write(chunk)
        terminal.feed(chunk)
    terminal.close()
    status = proc.wait()
    return 128 - status if status < 0 else status


def _refuse(problem: str, log, rank: int) -> int:
    """The command is not started: `problem` in the rank's log and (rank 0's) on stderr, as a usage error."""
    line = f"hvdtrain: error: {problem}\n".encode()
    log.write(line)
    if rank == 0:
        sys.stderr.buffer.write(line)
    return 2


def main(argv: list[str]) -> int:
    parsed = parse_args(argv)
    if parsed is None:
        print(USAGE, file=sys.stderr)
        return 2
    log_dir, threads, command = parsed
    parent = os.getppid()
    info, slurm = rank_info(), SlurmEnv.read()
    worker = elastic_worker(os.environ)
    name, host_record, log_path, exit_record = _records(RankLogs(log_dir), info.rank, worker)
    log_dir.mkdir(parents=True, exist_ok=True)
    _record(host_record, socket.gethostname() + "\n")
    if worker is not None:
        exit_record.unlink(missing_ok=True)  # the previous worker's of this slot: this one is running
    env = {**os.environ, "HVDTRAIN_LOG_DIR": str(log_dir), "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads_for(threads, info.local_size, available_cpus(), slurm.cpus_per_task))
    problem = wire_up_problem(slurm)  # before MPI starts: srun's --mpi=none leaves every rank alone
    with open(log_path, "ab", buffering=0) as f:
        log = _Log(f, log_path)
        if worker is not None:
            log.write(started_line(*worker).encode())
        status = _refuse(problem, log, info.rank) if problem else _run_teed(command, env, log, name, parent, info.rank)
    _record(exit_record, f"{status}\n")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
