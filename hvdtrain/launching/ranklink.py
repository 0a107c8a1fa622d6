"""The rank wrapper's side of the hang watchdog (the launching side's is launching.watchdog).

The wrapper makes two shared memory files (memfds, gone with the last process that holds them: nothing to clean
up) and hands them to the rank by number: its progress record (hvdtrain.progress writes it) and its stack record,
where every Python process of the rank dumps its stacks on DUMP_SIGNAL (faulthandler, registered by the
sitecustomize put first on the rank's PYTHONPATH).

When the job has a watchdog (HVDTRAIN_WATCHDOG: ``PORT TOKEN ADDR[,ADDR...]``, the launching machine's addresses
to try in order) a thread of the wrapper connects to it and, one JSON line at a time:
    -> {"hello": TOKEN, "rank": R, "host": H}                   once
    -> {"step", "phase", "age", "beats", "step_s", "state"}     every BEAT_S (age: seconds in the phase)
    <- {"do": "stacks"}  -> {"stacks": TEXT, "state": S}        every process of the rank that catches DUMP_SIGNAL
    <- {"do": "end"}                                            the rank is ended (SIGCONT, SIGTERM, SIGKILL)
    -> {"exit": STATUS}                                         when the command has ended
`state` is the command's process state from /proc (R running, S sleeping, D uninterruptible, T stopped, ...).
The watchdog's word never fails a rank: an address it cannot reach is one warning line, and the rank goes on.
"""

from __future__ import annotations

import json
import mmap
import os
import select
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from hvdtrain import procs, progress

WATCHDOG_ENV = "HVDTRAIN_WATCHDOG"
STACKS_SIGNAL_ENV = "HVDTRAIN_STACKS_SIGNAL"
DUMP_SIGNAL = signal.SIGRTMIN + 6  # no MPI, Horovod or torch handler uses it; the sitecustomize registers it
SITE_DIR = Path(__file__).resolve().parent / "site"  # the sitecustomize that registers it
STATES = {
    "R": "running",
    "S": "sleeping",
    "D": "in uninterruptible sleep (I/O: a hung file system or device?)",
    "T": "stopped (SIGSTOP)",
    "t": "stopped by a debugger",
    "Z": "a zombie",
}  # a process's state letter (/proc/PID/stat), in words
STOPPED = ("T", "t")  # the states of a process that runs no more until it is continued
BEAT_S = 1.0  # how often the wrapper tells the watchdog where its rank is
CONNECT_TIMEOUT_S = 3.0
DUMP_SETTLE_S = 0.15  # a process's dump is done when its record has not grown for this long ...
DUMP_MAX_S = 2.0  # ... or after this long (a process that does not answer: stopped, or the signal is blocked)


def parse_watchdog(value: str) -> Optional[tuple[int, str, list[str]]]:
    """(port, token, addresses) of HVDTRAIN_WATCHDOG, None when it is malformed."""
    parts = value.split()
    if len(parts) != 3 or not parts[0].isdigit() or not parts[2]:
        return None
    return int(parts[0]), parts[1], parts[2].split(",")


def format_watchdog(port: int, token: str, addresses: list[str]) -> str:
    return f"{port} {token} {','.join(addresses)}"


def process_state(pid: int) -> Optional[str]:
    """The process's state letter (/proc/PID/stat field 3), None when it is gone."""
    fields = procs.stat_fields(pid)
    return fields[0].decode() if fields else None


def _group_members(pgid: int) -> list[int]:
    """The processes of process group `pgid`, the group's leader first."""
    members = [
        int(e) for e in os.listdir("/proc") if e.isdigit() and (f := procs.stat_fields(int(e))) and int(f[2]) == pgid
    ]
    return sorted(members, key=lambda pid: (pid != pgid, pid))


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"


class RankRecords:
    """The rank's progress and stack records (memfds), what the command needs to find them, and reading them."""

    def __init__(self):
        self.progress_fd = os.memfd_create("hvdtrain-progress", 0)
        os.ftruncate(self.progress_fd, progress.SIZE)
        self._map = mmap.mmap(self.progress_fd, progress.SIZE)
        self.stacks_fd = os.memfd_create("hvdtrain-stacks", 0)

    def env(self, environ) -> dict[str, str]:
        """The command's variables: the records' descriptors, the dump signal, the sitecustomize first on its path."""
        path = [str(SITE_DIR), *filter(None, environ.get("PYTHONPATH", "").split(os.pathsep))]
        return {
            progress.PROGRESS_FD_ENV: str(self.progress_fd),
            progress.STACKS_FD_ENV: str(self.stacks_fd),
            STACKS_SIGNAL_ENV: str(int(DUMP_SIGNAL)),
            "PYTHONPATH": os.pathsep.join(path),
        }

    @property
    def fds(self) -> tuple[int, int]:
        return self.progress_fd, self.stacks_fd

    def beat(self) -> Optional[progress.Beat]:
        return progress.unpack(self._map)

    def stacks(self, pgid: int) -> str:
        """Every process of the command's group that catches DUMP_SIGNAL dumps its stacks, one after the other, each
        under a line naming it; a stopped process is named as such. The text of this round only."""
        start = os.fstat(self.stacks_fd).st_size
        for pid in _group_members(pgid):
            state = process_state(pid)
            header = f"=== pid {pid}: {_command_line(pid)} ===\n"
            if state in STOPPED:
                os.pwrite(self.stacks_fd, f"{header}(not dumped: {STATES[state]})\n".encode(), self._end())
                continue
            if not catches(pid, DUMP_SIGNAL):
                continue
            os.pwrite(self.stacks_fd, header.encode(), self._end())
            os.lseek(self.stacks_fd, 0, os.SEEK_END)  # faulthandler writes at the shared offset
            try:
                os.kill(pid, DUMP_SIGNAL)
            except ProcessLookupError:
                continue
            self._settle()
        end = self._end()
        return os.pread(self.stacks_fd, end - start, start).decode(errors="replace")

    def _end(self) -> int:
        return os.fstat(self.stacks_fd).st_size

    def _settle(self) -> None:
        size, changed, began = self._end(), time.monotonic(), time.monotonic()
        grew = False
        while time.monotonic() - began < DUMP_MAX_S:
            time.sleep(0.02)
            now_size = self._end()
            if now_size != size:
                size, changed, grew = now_size, time.monotonic(), True
            elif grew and time.monotonic() - changed >= DUMP_SETTLE_S:
                return


class Link:
    """The wrapper's connection to the watchdog, run by a daemon thread until the command ends."""

    def __init__(self, records: RankRecords, rank: int, end_rank: Callable[[], None], say: Callable[[bytes], None]):
        self.records, self.rank, self.end_rank, self.say = records, rank, end_rank, say

    def start(self, proc, value: str) -> Optional[threading.Thread]:
        parsed = parse_watchdog(value)
        if parsed is None:
            return None
        thread = threading.Thread(target=self._run, args=(proc, *parsed), name="hvdtrain-watchdog-link", daemon=True)
        thread.start()
        return thread

    def _connect(self, port: int, addresses: list[str]) -> Optional[socket.socket]:
        for address in addresses:
            try:
                return socket.create_connection((address, port), timeout=CONNECT_TIMEOUT_S)
            except OSError:
                continue
        where = ", ".join(f"{a}:{port}" for a in addresses)
        self.say(f"hvdtrain: warning: cannot reach the hang watchdog at {where}; this rank is not watched\n".encode())
        return None

    def _run(self, proc, port: int, token: str, addresses: list[str]) -> None:
        sock = self._connect(port, addresses)
        if sock is None:
            return
        try:
            sock.settimeout(10.0)
            self._send(sock, {"hello": token, "rank": self.rank, "host": socket.gethostname()})
            self._serve(sock, proc)
        except OSError:
            pass  # the watchdog is gone (the launching side ended): the rank goes on as the launcher decides
        finally:
            sock.close()

    def _serve(self, sock: socket.socket, proc) -> None:
        pending = b""
        next_beat = 0.0
        while True:
            status = proc.poll()
            if status is not None:
                self._send(sock, {"exit": 128 - status if status < 0 else status})
                return
            now = time.monotonic()
            if now >= next_beat:
                self._send(sock, self._beat(proc.pid, now))
                next_beat = now + BEAT_S
            readable, _, _ = select.select([sock], [], [], min(0.2, max(0.0, next_beat - now)))
            if not readable:
                continue
            data = sock.recv(65536)
            if not data:
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                self._command(sock, proc, line)

    def _command(self, sock: socket.socket, proc, line: bytes) -> None:
        try:
            do = json.loads(line).get("do")
        except (ValueError, AttributeError):
            return
        if do == "stacks":
            self._send(sock, {"stacks": self.records.stacks(proc.pid), "state": process_state(proc.pid)})
        elif do == "end":
            self.end_rank()

    def _beat(self, pid: int, now: float) -> dict:
        beat = self.records.beat()
        message = {"state": process_state(pid)}
        if beat is not None:
            message.update(step=beat.step, phase=beat.phase, age=round(now - beat.since, 3), beats=beat.beats,
                           step_s=beat.step_s)  # fmt: skip
        return message

    @staticmethod
    def _send(sock: socket.socket, message: dict) -> None:
        sock.sendall(json.dumps(message).encode() + b"\n")


def records_or_none(say) -> Optional[RankRecords]:
    """The rank's records, None where memfds are not available (not Linux): the rank then runs unwatched."""
    try:
        return RankRecords()
    except (OSError, AttributeError) as e:
        say(f"hvdtrain: warning: no progress record for this rank ({e}); the hang watchdog cannot watch it\n".encode())
        return None
