"""Running a job: `run_job` is the only place that starts one. It prepares the log directory and the launcher's
environment, starts the launcher in its own process group (tied to hvdtrain by the kernel's parent-death signal),
forwards signals to it (Ctrl-C turned into a graceful stop, exit 130), and when the job fails names the cause from
the ranks' records (`failures`).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable, Collection, Optional

from hvdtrain import errors, procs, startup
from hvdtrain.errors import LaunchError
from hvdtrain.launching import hangs, watchdog
from hvdtrain.launching.argv import build_argv, describe, placement, rank_env
from hvdtrain.launching.elastic_failures import diagnose_elastic
from hvdtrain.launching.failures import diagnose, exit_statuses, failed_ranks, log_sizes, worker_log_sizes
from hvdtrain.launching.hosts import is_local_host
from hvdtrain.launching.preflight import make_ssh_shim, ssh_shim_args
from hvdtrain.launching.rank import signal_wrappers
from hvdtrain.launching.spec import LaunchSpec
from hvdtrain.rundir import RankLogs

STOP_GRACE_S = 30.0  # after SIGTERM, how long the launcher may take to end the job before it is SIGKILLed
HANG_END_GRACE_S = 10.0  # after the hang watchdog's SIGTERM, how long the launcher may take before it is SIGKILLed
# What run_job keeps of an elastic launcher's output (the failure report reads horovodrun's own lines in it).
ELASTIC_OUTPUT_LINES = 300
# horovodrun's multiprocessing resource tracker, which frees its semaphores when the launcher is SIGKILLed: no warning.
_TRACKER_QUIET = "ignore::UserWarning:multiprocessing.resource_tracker"
RANK_POLL_S = 0.5  # how often run_job looks at the ranks' exit records while the launcher runs (_wait)
# Once every rank has an exit record and one failed, how long the launcher may take to exit before it is ended
# (horovodrun's Gloo path once lingered 104 s after both ranks of a job had ended: issue 29's fault reproduction).
LINGER_S = 15.0
INTERRUPTED = 130  # the exit status of a job stopped by Ctrl-C (128 + SIGINT), as a shell reports it


def _signal_tree(pid: int, signum: int) -> list:
    """Send `signum` to process `pid` and every process under it; returns them (psutil.Process). The launcher
    may not be the process that tears the job down: horovodrun's MPI path execs `/bin/sh -c "mpirun ..."`, and a
    signal to that shell alone kills the shell and leaves mpirun and the ranks running."""
    import psutil  # lazily: the CLI imports this module

    try:
        top = psutil.Process(pid)
        tree = [top, *top.children(recursive=True)]
    except psutil.Error:
        return []
    for p in tree:
        try:
            p.send_signal(signum)
        except psutil.Error:
            pass
    return tree


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _say(line: str) -> None:
    """One line on stderr from a signal handler (os.write: not the buffered stream the handler may have cut into)."""
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass


def _end_hung(job: _Job, proc: subprocess.Popen) -> None:
    """The watchdog's end of a hung job (its ranks already told to end): SIGTERM to the launcher's tree, and what is
    left of it after HANG_END_GRACE_S SIGKILLed (mpirun waits for the daemon of a host it cannot reach)."""
    tree = _signal_tree(proc.pid, signal.SIGTERM)
    job.stopping.extend(tree or [None])
    _reap(tree, HANG_END_GRACE_S)


def _reap(processes: list, timeout: float) -> None:
    """Wait for `processes` to end, at most `timeout` seconds, then SIGKILL what is left."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def _this_machine(hosts: Collection[str]) -> set[str]:
    return {socket.gethostname()} | {h for h in hosts if is_local_host(h)}


class _Tee:
    """horovodrun's output (Gloo path, elastic; stdout and stderr, one pipe) copied line by line to our stdout as it comes,
    its last `keep` lines kept for the failure report; read by a thread, so that run_job waits on the launcher
    itself (and its signals) as for any job."""

    def __init__(self, pipe, keep: int = ELASTIC_OUTPUT_LINES, sink=None):
        import collections
        import threading

        self._sink = sink  # a binary file the lines go to instead of our stdout
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._held: list[bytes] = []
        self._pipe = pipe
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        for line in iter(self._pipe.readline, b""):
            text = line.decode(errors="replace").rstrip("\n")
            self.lines.append(text)
            # horovodrun's own traceback (its lines carry no rank prefix such as "[0]<stdout>:") is held back: when
            # the job fails, the report replaces it; a rank's line after it, or success, lets it through.
            if text == "Traceback (most recent call last):" and not self._held:
                self._held.append(line)
            elif self._held and not text.startswith("["):
                self._held.append(line)
            else:
                self.release()
                self._write(line)

    def _write(self, line: bytes) -> None:
        try:
            out = self._sink if self._sink is not None else getattr(sys.stdout, "buffer", None)
            if out is not None:
                out.write(line)
            else:
                sys.stdout.write(line.decode(errors="replace"))
            sys.stdout.flush()
        except (OSError, ValueError):
            pass  # our stdout is gone; keep reading, or the launcher blocks on a full pipe

    def release(self) -> None:
        """Pass on the lines held back."""
        held, self._held = self._held, []
        for line in held:
            self._write(line)

    def finish(self, timeout: float = 5.0) -> list[str]:
        """The kept lines, once the pipe is drained (or after `timeout`: a process the launcher left behind may
        hold it open). Lines still held back (horovodrun's closing traceback) are not passed on: call release()
        to show them."""
        self._thread.join(timeout)
        return list(self.lines)


@dataclasses.dataclass
class _Job:
    """A job about to start, or started: what run_job's parts share."""

    spec: LaunchSpec
    argv: list[str]
    env: dict[str, str]  # the launcher's whole environment
    log_dir: str
    keep_logs: bool  # --output-dir given: the logs stay; else a temporary directory, removed after success
    starts: dict  # each rank log's size before this job (failures reads only what this job appended)
    worker_starts: dict  # the same for an elastic job's worker logs
    shim: Optional[str] = None  # the ssh shim's directory, removed when the job ends
    stops: list[str] = dataclasses.field(default_factory=list)  # SIGTERM/SIGINT received, in order
    stopping: list = dataclasses.field(default_factory=list)  # the launcher's process tree, once it was told to stop
    watch: Optional[watchdog.Watchdog] = None  # the hang watchdog (launching.watchdog), None when off
    output: Optional[BinaryIO] = None  # where the launcher's output goes (None: our stdout)


def run_job(
    spec: LaunchSpec,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
    on_interrupt: Optional[Callable[[], bool]] = None,
    output: Optional[BinaryIO] = None,
) -> int:
    """Run the job (or print it with dry_run); returns the job's exit status, raising LaunchError on failure.
    `output`: a binary file the launcher's output (the ranks' output with it) goes to instead of our stdout.
    A job stopped by Ctrl-C ends with status 130 (INTERRUPTED); `on_interrupt`, called at the first Ctrl-C,
    asks the ranks to stop gracefully and returns True, or returns False: then the launcher ends them.

    The launcher's own stderr goes to our stdout with the ranks' output (the wrapper merges each rank's), so
    stderr carries hvdtrain's own message only, whatever the launcher prints on its way out. horovodrun's Gloo
    path (and every elastic job) ends a failed job with a Python traceback: its output passes through a pipe
    (`_Tee`) that holds the traceback back, and the report (failures.diagnose, diagnose_elastic) names the cause
    instead."""
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if sys.stdout.isatty() and "HVDTRAIN_TTY" not in spec.env:
        # The ranks' stdout is a pipe whatever happens; tell them a person is watching (progress bars).
        spec = dataclasses.replace(spec, env={**spec.env, "HVDTRAIN_TTY": "1"})
    extra = rank_env(spec, is_root)
    keep_logs = spec.output_dir is not None
    log_dir = spec.output_dir or tempfile.mkdtemp(prefix="hvdtrain-logs-")
    argv = build_argv(spec, os.path.abspath(log_dir), is_root)
    if dry_run:
        echo(describe(argv, extra, _dry_run_notes(spec)))
        if not keep_logs:
            os.rmdir(log_dir)
        return 0
    dog = watchdog.for_spec(spec, os.path.abspath(log_dir))
    job = _prepare(spec, argv, {**extra, **(dog.env() if dog else {})}, log_dir, keep_logs)
    job.watch, job.output = dog, output
    try:
        status, tee = _start_and_wait(job, on_interrupt)
    finally:
        if dog is not None:
            dog.close()
        if job.shim:
            shutil.rmtree(job.shim, ignore_errors=True)
    output = tee.finish() if tee is not None else []
    if status != 0 or (dog is not None and dog.hang is not None):
        _diagnose(job, status, output, tee)
    if tee is not None:
        tee.release()
    _check_started(job)
    if keep_logs:
        echo(f"per-{'rank' if spec.elastic is None else 'worker'} logs: {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    return INTERRUPTED if "SIGINT" in job.stops else 0


def _dry_run_notes(spec: LaunchSpec) -> list[str]:
    """What --dry-run says besides the command: the MPICH found on PATH, the ssh shim the launcher runs with."""
    shim_args = ssh_shim_args(spec)
    notes = [f"{spec.launcher}: {spec.mpi.describe()}"] if spec.hydra else []
    if shim_args:
        who = "horovodrun" if spec.launcher == "horovodrun" else os.path.basename(spec.mpi.path)
        notes.append(f"{who} runs with an 'ssh' first on its PATH that is: ssh {shlex.join(shim_args)}")
    if spec.elastic is not None and shim_args:
        notes.append(
            "(ServerAlive*: the ssh to a host whose link goes down ends within ~15 s, and the elastic driver "
            "drops that host)"
        )
    return notes


def _prepare(spec: LaunchSpec, argv: list[str], extra: dict[str, str], log_dir: str, keep_logs: bool) -> _Job:
    """The log directory (a previous job's exit and host records removed, its logs' sizes noted) and the launcher's
    environment: the rank variables, the ssh shim first on PATH, the job's launcher and start time."""
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    errors.keep_tracebacks_in(log_dir)
    logs = RankLogs(log_dir)
    for _rank, stale in [*logs.exit_records(), *logs.host_records()]:
        stale.unlink()
    for _worker, stale in [*logs.worker_records("exit"), *logs.worker_records("host")]:
        stale.unlink()
    env = {**os.environ, **extra}
    shim = make_ssh_shim(spec, env.get("PATH", os.defpath))
    if shim:
        env["PATH"] = shim + os.pathsep + env.get("PATH", os.defpath)
    # The job names its launcher: a rank on this machine ends itself when this process is gone (launching.rank).
    env[procs.LAUNCHER_ENV] = procs.identity()
    env[startup.LAUNCHED_ENV] = f"{time.time():.6f}"  # the start of the "launch" phase (hvdtrain.startup)
    if _drives_ranks(
        spec
    ):  # ... and its multiprocessing resource tracker, which then frees its semaphores, not warn about them
        warnings = [w for w in [env.get("PYTHONWARNINGS", ""), _TRACKER_QUIET] if w]
        env["PYTHONWARNINGS"] = ",".join(warnings)
    return _Job(spec, argv, env, log_dir, keep_logs, log_sizes(log_dir), worker_log_sizes(log_dir), shim)


def _drives_ranks(spec: LaunchSpec) -> bool:
    """horovodrun starting the ranks itself (Gloo, elastic) rather than through mpirun."""
    return spec.launcher == "horovodrun" and (spec.controller == "gloo" or spec.elastic is not None)


def _start_and_wait(job: _Job, on_interrupt: Optional[Callable[[], bool]]) -> tuple[int, Optional[_Tee]]:
    """Start the launcher and wait for it, forwarding signals; (its exit status, the tee of its output or None).

    The launcher runs in a process group of its own, so that Ctrl-C reaches this process alone and is turned into
    a stop here (`_forwarder`); no stdin, which a background group may not read; and it gets a signal from the
    kernel when this process dies, however (SIGKILL, OOM killer): mpirun ends its ranks on SIGTERM; horovodrun's
    Gloo path is SIGKILLed (its per-rank middlemen end their ranks when it is gone; on SIGTERM it would first print
    a traceback of its own into a terminal that hvdtrain no longer holds). horovodrun driving the ranks itself
    (Gloo, elastic) ends a failed job with a Python traceback of its own: its output passes through a pipe (_Tee)
    that holds that back; with MPI it execs mpirun, whose output is passed on."""
    import psutil  # noqa: F401  (here, not in a signal handler: an import there can be interrupted by the next signal)

    gloo = _drives_ranks(job.spec)
    popen = {
        "env": job.env,
        "stdin": subprocess.DEVNULL,
        "process_group": 0,
        "preexec_fn": procs.die_with_parent(signal.SIGKILL if gloo else signal.SIGTERM),
    }
    tee = None
    if job.spec.launcher == "horovodrun" and job.spec.controller != "mpi":
        proc = subprocess.Popen(job.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)
        tee = _Tee(proc.stdout, sink=job.output)
    else:
        proc = subprocess.Popen(job.argv, stdout=job.output, stderr=subprocess.STDOUT, **popen)
    forward = _forwarder(job, proc, on_interrupt)
    if job.watch is not None:  # a hang: the ranks' stacks are taken, the ranks told to end, then the launcher
        job.watch.start(lambda _hang: _end_hung(job, proc))
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        status = _wait(job, proc)
        if job.stopping:  # let mpirun (or horovodrun) finish ending the ranks, so that their records are there
            _reap([p for p in job.stopping[1:] if p is not None], STOP_GRACE_S)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return status, tee


def _wait(job: _Job, proc: subprocess.Popen) -> int:
    """The job's exit status. Open MPI's mpirun ends a job when a rank exits non-zero; MPICH's mpiexec does only
    when an MPI process ends before MPI_Finalize or dies of a signal. Under it, a rank's non-zero exit record (where
    this machine sees them: its ranks, or a shared log directory) ends the job here as a SIGTERM would (the
    launcher's tree). The job's status is the failed rank's whenever a record shows one: mpiexec says the status of
    a rank its own cleanup SIGKILLed (9) as often as the failed rank's, and now and then 0 after a Ctrl-C.
    Whatever the launcher, one still running LINGER_S after every rank's exit record is there, one of them a
    failure, is ended the same way, and the job's status is that rank's (an elastic job's workers come and go:
    not there)."""
    if job.spec.elastic is not None:
        return proc.wait()
    failed, ended_at = None, None
    while True:
        try:
            status = proc.wait(timeout=RANK_POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        if job.stopping or job.stops:  # a stop (TERM, INT) or an end already under way
            continue
        if job.spec.hydra:
            failed = _first_failed(job)
        elif _all_ended_one_failed(job):
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at >= LINGER_S:
                failed = _first_failed(job)
        if failed is not None:
            job.stopping.extend(_signal_tree(proc.pid, signal.SIGTERM) or [None])
    if job.spec.hydra or failed is not None:
        failed = failed or _first_failed(job)
    return status if failed is None else failed[1]


def _all_ended_one_failed(job: _Job) -> bool:
    """Every rank of the job has an exit record here, and one is a failure."""
    statuses = [status for status, _when in exit_statuses(job.log_dir).values()]
    return len(statuses) >= job.spec.np and any(statuses)


def _first_failed(job: _Job) -> Optional[tuple[int, int]]:
    """(rank, exit status) of the rank whose record shows the likely first failure of this job; None if none."""
    return next(iter(failed_ranks(job.log_dir, job.starts)), None)


def _forwarder(job: _Job, proc: subprocess.Popen, on_interrupt: Optional[Callable[[], bool]]):
    """The signal handler while the job runs. USR1/USR2 (preemption warnings) are passed on to the launcher, and it
    passes them to the ranks (USR2 under MPICH's mpiexec: to this machine's rank wrappers). SIGTERM (a scheduler,
    timeout) goes to the launcher's whole local process tree (_signal_tree), waited for by _start_and_wait. The
    first Ctrl-C (SIGINT) asks for a graceful stop when the job has one (`on_interrupt`: a training job checkpoints
    and stops), else goes to the launcher's group as a terminal's would; another is a SIGTERM. A stop (TERM, INT) is
    remembered: the report then says so."""

    def forward(signum, _frame):
        if signum in (signal.SIGTERM, signal.SIGINT):
            job.stops.append(signal.Signals(signum).name)
        if signum == signal.SIGINT and job.stops.count("SIGINT") == 1:
            if on_interrupt is not None and on_interrupt():
                _say("hvdtrain: interrupted: the ranks checkpoint and stop (Ctrl-C again to end them at once)")
            else:
                _signal_group(proc.pid, signal.SIGINT)
        elif signum in (signal.SIGTERM, signal.SIGINT):
            if job.stopping:  # a second SIGTERM (Slurm sends one per step and one to the batch shell): once is enough
                return
            job.stopping.extend(_signal_tree(proc.pid, signal.SIGTERM) or [None])
        elif signum == signal.SIGUSR2 and job.spec.hydra:
            # MPICH's mpiexec passes USR1 on to every rank but has no handler for USR2, which would kill it (and
            # with it the job): this machine's rank wrappers get it instead; the preemption vote is summed over
            # every rank, so every rank stops after the same step.
            signal_wrappers(signum, proc.pid)
        else:
            proc.send_signal(signum)

    return forward


def _diagnose(job: _Job, status: int, output: list[str], tee: Optional[_Tee]) -> None:
    """A failed job's cause from the ranks' (or workers') records and the launcher's lines: raises LaunchError with
    the job's exit status (130 after Ctrl-C). The launcher's held-back traceback is shown only when nothing known
    explains the failure."""
    spec = job.spec
    stopped_by = job.stops[0] if job.stops else None
    hang = job.watch.hang if job.watch is not None else None
    if hang is not None and not stopped_by:
        raise LaunchError(
            hangs.describe(hang, str(RankLogs(job.log_dir).stacks("R"))),
            watchdog.HANG_STATUS,
            "hang",
        )
    if spec.elastic is not None:
        found = diagnose_elastic(job.log_dir, status, output, job.worker_starts, stopped_by, spec.elastic.discovery)
    else:
        where = placement(spec)
        here = _this_machine(set(where.values()))
        found = diagnose(job.log_dir, status, spec.np, where, here, job.starts, stopped_by, spec.roles)
    if tee is not None and found.cause is None:
        tee.release()
    # Stopped by a signal: 128 + that signal, as a shell reports it (130 after Ctrl-C), whatever the launcher made
    # of it (MPICH's mpiexec says 15 for a rank ended by SIGTERM).
    code = 128 + signal.Signals[stopped_by] if stopped_by else status if status > 0 else 128 - status
    raise LaunchError(found.message, code, found.cause)


def _check_started(job: _Job) -> None:
    """Where the records must be (a chosen directory, or ranks on this machine): a launcher that says success
    although no rank started (srun does, when a step is aborted before its tasks launch) is a failure."""
    if not (job.keep_logs or any(is_local_host(h.name) for h in job.spec.hosts)):
        return
    logs = RankLogs(job.log_dir)
    records = [
        *logs.exit_records(), *logs.host_records(), *logs.worker_records("exit"), *logs.worker_records("host")
    ]  # fmt: skip
    if not records:
        raise LaunchError(
            f"{job.spec.launcher} exited with status 0 but no rank started (no rank records in {job.log_dir}); see "
            f"{job.spec.launcher}'s messages above"
        )
