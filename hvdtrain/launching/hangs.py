"""A hang, told: which ranks held the job up, where (the function and line from their stacks), and what the others
were doing. Pure: the watchdog (launching.watchdog) gathers a `Hang`; `describe` words it for the report.

Stacks are faulthandler's dumps (every Python process of a rank, each under a ``=== pid P: COMMAND ===`` line the
rank wrapper wrote). The frame that names a rank's place is the innermost one in the user's own code (not the
standard library's, not an installed package's, not hvdtrain's); failing that, the innermost frame.

The ranks that held the job up are, in this order of evidence: those whose host went silent, those stopped
(SIGSTOP), those stuck in work of their own while the others wait in a collective (by their phase, or by their
stack when the phase does not say), and failing all that the smaller groups of ranks stuck at the same line.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import sysconfig
from pathlib import Path
from typing import Optional, Sequence

from hvdtrain.launching.ranklink import STATES, STOPPED
from hvdtrain.progress import COLLECTIVE_PHASES
from hvdtrain.render import ranks_words

_THREAD_RE = re.compile(r"^(Current thread|Thread) (0x[0-9a-f]+) \(most recent call first\):")
_FRAME_RE = re.compile(r'^\s+File "(.*)", line (\d+) in (.*)$')
_PROCESS_RE = re.compile(r"^=== pid (\d+): (.*) ===$")
# Where a rank waiting on the others is, by its stack: Horovod's, torch.distributed's and mpi4py's collectives.
_COLLECTIVE_FILES = ("/horovod/", "/torch/distributed/", "mpi4py")
_COLLECTIVE_FUNCS = re.compile(r"^(synchronize|allreduce|allgather|broadcast|alltoall|barrier|reducescatter|join|wait)")


@functools.lru_cache(maxsize=1)
def _library_dirs() -> tuple[str, ...]:
    """The standard library's and installed packages' directories, and hvdtrain's: code that is not the user's."""
    paths = sysconfig.get_paths()
    dirs = {
        str(Path(paths[k]).resolve()) + os.sep for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths
    }
    return tuple(dirs | {str(Path(__file__).resolve().parents[1]) + os.sep})


@dataclasses.dataclass(frozen=True)
class Frame:
    file: str
    line: int
    function: str

    def __str__(self) -> str:
        return f"{self.function} ({Path(self.file).name}:{self.line})"

    @property
    def library(self) -> bool:
        """Code of the standard library (frozen modules too), of an installed package, or hvdtrain's own: not the
        user's (`python -c` code, "<string>", is)."""
        path = self.file
        return (
            path.startswith("<frozen")
            or "site-packages" in path
            or "dist-packages" in path
            or path.startswith(_library_dirs())
        )


@dataclasses.dataclass(frozen=True)
class Thread:
    current: bool  # the thread the dump ran on
    frames: tuple[Frame, ...]  # innermost first


@dataclasses.dataclass(frozen=True)
class Process:
    pid: Optional[int]
    command: str
    threads: tuple[Thread, ...]  # none for a process that was not dumped (stopped)


def parse_stacks(text: str) -> list[Process]:
    """The processes and threads of a rank's dump, as the rank wrapper gathered it."""
    processes: list[Process] = []
    pid, command, threads, frames, current = None, "", [], None, False

    def close_thread():
        nonlocal frames
        if frames is not None:
            threads.append(Thread(current, tuple(frames)))
        frames = None

    def close_process():
        nonlocal threads
        close_thread()
        if pid is not None or threads:
            processes.append(Process(pid, command, tuple(threads)))
        threads = []

    for line in text.splitlines():
        if m := _PROCESS_RE.match(line):
            close_process()
            pid, command = int(m.group(1)), m.group(2)
        elif m := _THREAD_RE.match(line):
            close_thread()
            frames, current = [], m.group(1) == "Current thread"
        elif (m := _FRAME_RE.match(line)) and frames is not None:
            frames.append(Frame(m.group(1), int(m.group(2)), m.group(3)))
    close_process()
    return processes


def main_thread(processes: Sequence[Process]) -> Optional[Thread]:
    """The rank's main thread: in its first dumped process, the thread running a module's top level (the script),
    else the one the dump ran on, else the first."""
    for process in processes:
        if not process.threads:
            continue
        for thread in process.threads:
            if thread.frames and thread.frames[-1].function == "<module>":
                return thread
        return next((t for t in process.threads if t.current), process.threads[0])
    return None


def place(thread: Optional[Thread]) -> Optional[Frame]:
    """The frame that says where the thread is: the innermost of the user's code, else the innermost."""
    if thread is None or not thread.frames:
        return None
    return next((f for f in thread.frames if not f.library), thread.frames[0])


def waits_in_collective(thread: Optional[Thread]) -> bool:
    """Whether the thread's innermost frames are a collective's wait (Horovod, torch.distributed, mpi4py)."""
    if thread is None:
        return False
    return any(
        any(part in f.file for part in _COLLECTIVE_FILES) and _COLLECTIVE_FUNCS.match(f.function)
        for f in thread.frames[:4]
    )


@dataclasses.dataclass
class RankView:
    """What the watchdog knew of a rank when it called the hang."""

    rank: int
    host: str
    step: Optional[int] = None
    phase: Optional[str] = None
    silent_s: Optional[float] = None  # since its wrapper was last heard, when that is past the timeout
    state: Optional[str] = None  # the process state letter (ranklink.STATES)
    exited: Optional[int] = None  # its exit status, when it had ended
    stacks: Optional[str] = None  # its dump (the watchdog fills it in before the hang is told)

    @functools.cached_property
    def thread(self) -> Optional[Thread]:
        """Its main thread, from its dump: parsed once, when the hang is told."""
        return main_thread(parse_stacks(self.stacks or ""))

    @property
    def waiting(self) -> bool:
        """Waiting on the other ranks: in a collective phase, or (a phase that does not say: a script that only
        reports its steps) by its stack. A collective called where the phase is work of its own (a hook) is the
        odd one out, not a wait like the others'."""
        if _named_phase(self):
            return self.phase in COLLECTIVE_PHASES
        return waits_in_collective(self.thread)


@dataclasses.dataclass
class Hang:
    timeout: float  # the bound that was passed
    auto: bool  # derived (--hang-timeout auto), not given
    ranks: list[RankView]  # every rank the watchdog heard of
    stuck: list[int]  # the ranks past the bound (silent or without progress)

    def culprits(self) -> list[int]:
        views = {v.rank: v for v in self.ranks}
        stuck = [views[r] for r in self.stuck]
        for test in (lambda v: v.silent_s is not None, lambda v: v.state in STOPPED):
            found = [v.rank for v in stuck if test(v)]
            if found:
                return found
        working = [v.rank for v in stuck if not v.waiting]
        if working and len(working) < len(stuck):
            return working
        if stuck and not working:  # each rank past the bound waits on the others: a rank busy elsewhere, not yet
            # past it (it got there later), holds them up
            busy = [v.rank for v in self.ranks if v.rank not in self.stuck and v.exited is None and not v.waiting]
            if busy:
                return sorted(busy)
        groups: dict[Optional[Frame], list[int]] = {}
        for v in stuck:
            groups.setdefault(place(v.thread), []).append(v.rank)
        if len(groups) > 1:
            smallest = min(len(g) for g in groups.values())
            if sum(len(g) == smallest for g in groups.values()) < len(groups):
                return sorted(r for g in groups.values() if len(g) == smallest for r in g)
        return working or [v.rank for v in stuck]


def _at(v: RankView) -> str:
    return f" at step {v.step}" if v.step is not None and v.step >= 0 else ""


def _named_phase(v: RankView) -> bool:
    """The rank's phase says more than that it is somewhere in a step (a script that only reports its steps)."""
    return bool(v.phase) and v.phase not in ("step", "start")


def _culprit_words(v: RankView) -> str:
    who = f"rank {v.rank} ({v.host})"
    if v.silent_s is not None:
        last = f", last seen in {v.phase}{_at(v)}" if v.phase else ""
        return f"{who}: no word from its host for {v.silent_s:.0f} s (the host or its link is down?){last}"
    if v.state in (*STOPPED, "D"):
        return f"{who} is {STATES[v.state]}" + (f", in {v.phase}" if _named_phase(v) else "") + _at(v)
    frame = place(v.thread)
    where = f" is in {frame}" if frame else " gave no stack"
    phase = f" ({v.phase}{_at(v)})" if _named_phase(v) else _at(v)
    return f"{who}{where}{phase}"


def _others_words(views: Sequence[RankView]) -> list[str]:
    """The other ranks, grouped by what they were doing: `ranks 0, 2 wait in allreduce at step 812`."""
    groups: dict[tuple[str, str], list[int]] = {}
    for v in views:
        if v.exited is not None:
            key = ("exited", f"with status {v.exited}")
        elif v.phase in COLLECTIVE_PHASES:
            key = ("wait", f"in {v.phase}{_at(v)}")
        else:
            frame = place(v.thread)
            key = ("wait" if v.waiting else "be", f"in {frame or v.phase or 'start-up'}{_at(v)}")
        groups.setdefault(key, []).append(v.rank)
    return [f"{ranks_words(ranks)} {_VERBS[verb][len(ranks) > 1]} {rest}" for (verb, rest), ranks in groups.items()]


_VERBS = {"wait": ("waits", "wait"), "be": ("is", "are"), "exited": ("exited", "exited")}


def describe(hang: Hang, stacks_where: Optional[str] = None) -> str:
    """The report's line: `hang: rank 1 (node2) is in __getitem__ (my_data.py:42) (data at step 12); ranks 0, 2
    wait in allreduce at step 12 (no progress for 30 s: --hang-timeout 30); every rank's stacks: DIR/rank.R.stacks`."""
    culprits = hang.culprits()
    views = sorted(hang.ranks, key=lambda v: v.rank)
    parts = [_culprit_words(v) for v in views if v.rank in culprits]
    parts += _others_words([v for v in views if v.rank not in culprits])
    bound = f"--hang-timeout {hang.timeout:g}" + (" (auto)" if hang.auto else "")
    text = f"hang: {'; '.join(parts)} (no progress for {hang.timeout:g} s: {bound})"
    if stacks_where:
        text += f"; every rank's stacks: {stacks_where}"
    return text
