"""Which process is which, and tying a process's life to another's (no psutil: the rank wrapper imports this).

A process is named by `host pid start-time` (start time in clock ticks since boot, /proc/PID/stat field 22), so
that a reused pid is not taken for the process that had it. The rank wrapper watches its launcher by such a
name (HVDTRAIN_LAUNCHER), and the run directory's lock names its holder the same way.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from typing import Callable, Optional

LAUNCHER_ENV = "HVDTRAIN_LAUNCHER"  # `host pid start-time` of the hvdtrain process that launched the job
_PR_SET_PDEATHSIG = 1


def stat_fields(pid: int) -> Optional[list[bytes]]:
    """/proc/PID/stat's fields from the third on (state, ppid, pgrp, ...: index = field number - 3), None when there
    is no such process. The command name (field 2) is in parentheses and may hold spaces: fields are counted after
    its last ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def start_time(pid: int) -> Optional[str]:
    """The process's start time (clock ticks after boot) from /proc, None when there is no such process."""
    fields = stat_fields(pid)
    return fields[19].decode() if fields else None


def identity(pid: Optional[int] = None) -> str:
    """`host pid start-time` of process `pid` (this one by default)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()} {pid} {start_time(pid) or '?'}"


def parse_identity(text: str) -> Optional[tuple[str, int, str]]:
    parts = text.split()
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]


def alive(ident: str) -> Optional[bool]:
    """Whether the process named `ident` still runs: None when it is on another host (or the name is not one),
    where this machine cannot tell."""
    parsed = parse_identity(ident)
    if parsed is None or parsed[0] != socket.gethostname():
        return None
    return start_time(parsed[1]) == parsed[2]


def die_with_parent(signum: int = signal.SIGKILL) -> Callable[[], None]:
    """A preexec_fn for subprocess.Popen: the child gets `signum` from the kernel when the thread that started it
    ends (the caller's main thread: the process), however it ends, SIGKILL included. Linux; elsewhere a no-op.
    libc is looked up here, before the fork, not in the child."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return lambda: None
    return lambda: prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
